//! `sensor-aggregator --config FILE`: the run's sensor aggregator as a process.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use epu_core::bus::BusMetrics;
use epu_core::clock::SystemClock;
use epu_core::service::{bus_options, connect_bus, shutdown_signal};
use epu_core::store::SledStore;
use epu_core::telemetry::{init_tracing, spawn_http, Health, Metrics};
use sensor_aggregator::{Aggregator, AggregatorConfig, SENDER};

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
    init_tracing(&cfg.telemetry)?;
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
        bus_options(&cfg.bus, SENDER, bus_metrics),
    )
    .await?;
    let run = cfg.run.clone();
    let aggregator = Aggregator::new(cfg, bus, Arc::new(store), SystemClock::shared(), &metrics)?;
    let running = aggregator.start().await?;
    health.set_ready(true);
    shutdown_signal().await;
    tracing::info!(event = "service_stopping", service = SENDER, run = %run, "stopping");
    health.set_ready(false);
    running.stop().await;
    tracing::info!(
        event = "service_stopped",
        service = SENDER,
        "sensor aggregator stopped"
    );
    Ok(())
}
