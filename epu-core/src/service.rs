//! What every service binary does at its edges: connect its bus from config, wait
//! for a shutdown signal. Kept here so the three services start the same way.

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
