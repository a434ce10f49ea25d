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
