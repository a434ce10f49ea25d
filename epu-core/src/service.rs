//! What every service binary does at its edges: connect its bus from config, wait
//! for a shutdown signal. Kept here so the three services start the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bus::amqp::AmqpBus;
use crate::bus::{Bus, BusError, BusMetrics, BusOptions};
use crate::config::{BusConfig, Transport};
use crate::wire::RunName;

/// Bus options from the `[bus]` section.
pub fn bus_options(cfg: &BusConfig, sender: &str, metrics: BusMetrics) -> BusOptions {
    let mut opts = BusOptions::new(sender).with_metrics(metrics);
    if let Some(secret) = &cfg.secret {
        opts = opts.with_secret(secret.expose().as_bytes());
    }
    opts.prefetch = cfg.prefetch;
    opts.publish_timeout = cfg.publish_timeout();
    opts
}

/// Connects the bus a separate service process uses. The local transport exists
/// only inside the standalone host, which hands its services a `LocalBus` itself.
pub async fn connect_bus(
    cfg: &BusConfig,
    run: &RunName,
    opts: BusOptions,
) -> Result<Arc<dyn Bus>, BusError> {
    match cfg.transport {
        Transport::Amqp => Ok(Arc::new(AmqpBus::connect(&cfg.amqp_url, run.clone(), opts).await?)),
        Transport::Local => Err(BusError::Unsupported(
            "use the local transport from a separate process; run the services in the standalone host (`epumgmt launch` with a standalone plan) or set bus.transport = \"amqp\"",
        )),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A bare command name (`epu-agent`) is looked for first beside the running
/// executable — epu's binaries are installed (and built by cargo) side by side —
/// then on `PATH`. A name with a `/` is used as given.
pub fn resolve_command(command: &str) -> PathBuf {
    if !command.contains('/') {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            let beside = dir.join(command);
            if beside.is_file() {
                return beside;
            }
            // Test binaries live one level down (target/debug/deps).
            if let Some(up) = dir.parent() {
                let beside = up.join(command);
                if dir.file_name().is_some_and(|n| n == "deps") && beside.is_file() {
                    return beside;
                }
            }
        }
    }
    PathBuf::from(command)
}

/// What a service process sets up before its own work: tracing, the
/// `/metrics` `/healthz` `/readyz` server, its store, and its bus (whose
/// counters go to the same registry). One implementation for every binary.
pub struct ServiceBasics {
    pub metrics: crate::telemetry::Metrics,
    pub health: crate::telemetry::Health,
    pub store: Arc<crate::store::SledStore>,
    pub bus: Arc<dyn Bus>,
}

/// Why a service could not set itself up.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("opening the store at {path}: {source}")]
    Store {
        path: PathBuf,
        source: crate::store::StoreError,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl ServiceBasics {
    /// Sets up tracing, the HTTP server (when `telemetry.http_addr` is set), the
    /// store and the bus, in that order. Readiness stays false until the service
    /// raises it.
    pub async fn start(
        sender: &str,
        run: &RunName,
        bus: &BusConfig,
        telemetry: &crate::config::TelemetryConfig,
        store: &crate::config::StoreConfig,
    ) -> Result<Self, ServiceError> {
        crate::telemetry::init_tracing(telemetry)?;
        let metrics = crate::telemetry::Metrics::new();
        let health = crate::telemetry::Health::new();
        if let Some(addr) = telemetry.http_addr {
            // Served for the life of the process.
            let (_bound, _task) = crate::telemetry::spawn_http(
                addr,
                metrics.clone(),
                health.clone(),
                std::future::pending::<()>(),
            )
            .await?;
        }
        let opened =
            crate::store::SledStore::open(&store.path).map_err(|source| ServiceError::Store {
                path: store.path.clone(),
                source,
            })?;
        let bus_metrics = BusMetrics::register(metrics.registry())?;
        let bus = connect_bus(bus, run, bus_options(bus, sender, bus_metrics)).await?;
        Ok(ServiceBasics {
            metrics,
            health,
            store: Arc::new(opened),
            bus,
        })
    }
}
