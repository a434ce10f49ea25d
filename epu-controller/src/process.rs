//! The controller process: what `epu-controller` and your own controller binaries run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use decision_engines::Registry;
use epu_core::bus::BusMetrics;
use epu_core::clock::SystemClock;
use epu_core::service::{bus_options, connect_bus, shutdown_signal};
use epu_core::store::SledStore;
use epu_core::telemetry::{init_tracing, spawn_http, Health, Metrics};

use crate::{load_policies, Controller, ControllerConfig};

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
    init_tracing(&cfg.telemetry)?;
    let policies = load_policies(&cfg.policies, &registry)?;
    let metrics = Metrics::new();
    let health = Health::new();
    if let Some(addr) = cfg.telemetry.http_addr {
        let (_bound, _task) = spawn_http(
            addr,
            metrics.clone(),
            health.clone(),
            std::future::pending::<()>(),
        )
        .await?;
    }
    let store = SledStore::open(&cfg.store.path)
        .with_context(|| format!("opening the store at {}", cfg.store.path.display()))?;
    let bus_metrics = BusMetrics::register(metrics.registry())?;
    let bus = connect_bus(
        &cfg.bus,
        &cfg.run,
        bus_options(&cfg.bus, "epu-controller", bus_metrics),
    )
    .await?;
    let (_controller, server) = Controller::start(
        cfg.run.clone(),
        bus,
        Arc::new(store),
        SystemClock::shared(),
        &metrics,
        health.clone(),
        registry,
        policies,
        cfg.timing.clone(),
    )
    .await?;
    tracing::info!(event = "service_started", service = "controller", run = %cfg.run, "controller running");
    shutdown_signal().await;
    health.set_ready(false);
    server.stop().await;
    tracing::info!(
        event = "service_stopped",
        service = "controller",
        "controller stopped"
    );
    Ok(())
}
