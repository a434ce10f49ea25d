//! `sensor-aggregator --config FILE`: the run's sensor aggregator as a process.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use epu_core::clock::SystemClock;
use epu_core::service::{run_service, shutdown_signal, ServiceBasics};
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, SENDER};

/// The sensor aggregator: gathers heartbeats and queue depths, judges worker
/// health, and forwards readings to the controller.
///
/// Settings come from the config file, then from EPU_* environment variables
/// (EPU_BUS__AMQP_URL, EPU_NODES_POLL_SECS, EPU_TELEMETRY__LOG_FORMAT=json, ...).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The aggregator's config file (TOML or YAML).
    #[arg(long, short)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg: AggregatorConfig = epu_core::config::load(Some(&args.config), &env)?;
    cfg.validate()?;
    let basics =
        ServiceBasics::start(SENDER, &cfg.run, &cfg.bus, &cfg.telemetry, &cfg.store).await?;
    let aggregator = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: basics.bus,
            store: basics.store,
            clock: SystemClock::shared(),
            metrics: basics.metrics,
            readiness: basics.health,
        },
    )?;
    run_service(&aggregator, shutdown_signal()).await?;
    tracing::info!(
        event = "service_stopped",
        service = SENDER,
        "sensor aggregator stopped"
    );
    Ok(())
}
