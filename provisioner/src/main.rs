//! `provisioner --config FILE`: the provisioner as its own process, over RabbitMQ.
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
use epu_core::telemetry::{init_tracing, spawn_http, Metrics};
use provisioner::{drivers_from_config, Provisioner, ProvisionerConfig};

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
    init_tracing(&cfg.telemetry)?;
    let clock = SystemClock::shared();
    let drivers = drivers_from_config(&cfg, clock.clone()).await?;
    if args.check {
        println!("{cfg:#?}");
        println!("drivers: {}", drivers.names().join(", "));
        return Ok(());
    }

    let metrics = Metrics::new();
    let bus_metrics = BusMetrics::register(metrics.registry())?;
    let opts = bus_options(&cfg.bus, "provisioner", bus_metrics);
    let bus = connect_bus(&cfg.bus, &cfg.run, opts)
        .await
        .context("cannot connect the bus")?;
    let store = Arc::new(
        SledStore::open(&cfg.store.path)
            .with_context(|| format!("cannot open the store at {}", cfg.store.path.display()))?,
    );
    let http_addr = cfg.telemetry.http_addr;
    let prov = Provisioner::with_metrics(cfg, bus, store, clock, drivers, metrics.clone())?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = match http_addr {
        Some(addr) => {
            let mut rx = stop_rx.clone();
            let (_bound, task) = spawn_http(addr, metrics, prov.health().clone(), async move {
                let _ = rx.changed().await;
            })
            .await?;
            Some(task)
        }
        None => None,
    };
    prov.run(shutdown_signal()).await?;
    let _ = stop_tx.send(true);
    if let Some(task) = http {
        let _ = task.await;
    }
    Ok(())
}
