//! The controller process: what `epu-controller` and your own controller binaries run.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use decision_engines::Registry;
use epu_core::clock::SystemClock;
use epu_core::service::{run_service, shutdown_signal, ServiceBasics};

use crate::service::SENDER;
use crate::{load_policies, Controller, ControllerConfig, ControllerDeps, ControllerSetup};

/// The EPU controller: keeps every domain at the size its policy wants.
///
/// Settings come from the config file, then from EPU_* environment variables
/// (EPU_BUS__AMQP_URL, EPU_BUS__SECRET, EPU_TELEMETRY__LOG_FORMAT=json, ...).
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// The controller's config file (TOML or YAML).
    #[arg(long, short)]
    pub config: PathBuf,
}

/// Runs a controller process with the engines of `registry`: parses the command
/// line, loads config and policies, connects, serves until SIGINT/SIGTERM.
/// Your own controller binary with your own engines is `main` calling this.
pub async fn main_with(registry: Registry) -> anyhow::Result<()> {
    let args = Args::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg: ControllerConfig = epu_core::config::load(Some(&args.config), &env)?;
    let policies = load_policies(&cfg.policies, &registry, cfg.run.as_str())?;
    let basics =
        ServiceBasics::start(SENDER, &cfg.run, &cfg.bus, &cfg.telemetry, &cfg.store).await?;
    let controller = Controller::new(
        ControllerSetup {
            run: cfg.run.clone(),
            policies,
            timing: cfg.timing.clone(),
        },
        ControllerDeps {
            bus: basics.bus,
            store: basics.store,
            clock: SystemClock::shared(),
            metrics: basics.metrics,
            readiness: basics.health,
            registry,
        },
    )?;
    run_service(&controller, shutdown_signal()).await?;
    Ok(())
}
