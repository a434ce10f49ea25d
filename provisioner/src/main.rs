//! `provisioner --config FILE`: the provisioner as its own process, over RabbitMQ.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use epu_core::clock::SystemClock;
use epu_core::service::{run_service, shutdown_signal, ServiceBasics};
use epu_core::telemetry::init_tracing;
use provisioner::service::SENDER;
use provisioner::{drivers_from_config, Provisioner, ProvisionerConfig, ProvisionerDeps};

/// The epu provisioner: launches and terminates worker instances (local processes,
/// EC2, simulated) for the run's controllers, and keeps their records.
///
/// Configuration comes from FILE (TOML or YAML) and then from EPU_* environment
/// variables: EPU_RUN sets `run`, EPU_BUS__AMQP_URL sets `bus.amqp_url`, and so on
/// (two underscores = one level of nesting). Unknown keys are refused.
///
/// Stopping the provisioner (SIGINT/SIGTERM) leaves workers running; the next start
/// re-adopts them. Use `epumgmt killrun` (terminate_all) to tear a run down.
#[derive(Parser, Debug)]
#[command(name = "provisioner", version, about, long_about)]
struct Args {
    /// The config file (*.toml, *.yaml). Without it, everything comes from EPU_*
    /// variables (at least EPU_RUN).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check the config and the drivers, print the config (secrets hidden) and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg: ProvisionerConfig = epu_core::config::load(args.config.as_deref(), &env)
        .context("cannot load the provisioner config")?;
    cfg.validate()?;
    let clock = SystemClock::shared();
    if args.check {
        init_tracing(&cfg.telemetry)?;
        let drivers = drivers_from_config(&cfg, clock.clone()).await?;
        println!("{cfg:#?}");
        println!("drivers: {}", drivers.names().join(", "));
        return Ok(());
    }
    let basics = ServiceBasics::start(SENDER, &cfg.run, &cfg.bus, &cfg.telemetry, &cfg.store)
        .await
        .context("cannot set the provisioner up")?;
    let drivers = drivers_from_config(&cfg, clock.clone()).await?;
    let prov = Provisioner::from_parts(
        cfg,
        ProvisionerDeps {
            bus: basics.bus,
            store: basics.store,
            clock,
            drivers,
            metrics: basics.metrics,
            readiness: basics.health,
        },
    )?;
    run_service(&prov, shutdown_signal()).await?;
    Ok(())
}
