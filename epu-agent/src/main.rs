//! `epu-agent [--settings FILE] [--heartbeat-interval SECS] [--jobs-file PATH] -- COMMAND [ARGS...]`
//! (see the library docs for the settings, the jobs file and what ends the agent).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use epu_agent::settings::{parse_interval, read_settings_file};
use epu_agent::{AgentSettings, SettingsConnector};
use epu_core::config::TelemetryConfig;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Runs a worker's command and heartbeats for it to the run's sensor aggregator.
///
/// Settings come from the environment (EPU_NODE_ID, EPU_RUN, EPU_DOMAIN, and
/// EPU_AMQP_URL or EPU_RUN_DIR; EPU_HEARTBEAT_INTERVAL) or from --settings FILE
/// with KEY=VALUE lines of the same keys (the environment wins).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A file of KEY=VALUE settings lines (EC2 user data).
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Seconds between heartbeats (overrides EPU_HEARTBEAT_INTERVAL).
    #[arg(long, value_parser = parse_interval)]
    heartbeat_interval: Option<std::time::Duration>,
    /// The jobs file to give the worker as EPU_JOBS_FILE (default: a temporary file).
    #[arg(long)]
    jobs_file: Option<PathBuf>,
    /// The worker's command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let file = match &args.settings {
        Some(path) => read_settings_file(path)?,
        None => HashMap::new(),
    };
    let mut settings = AgentSettings::resolve(&env, &file)?;
    if let Some(i) = args.heartbeat_interval {
        settings.heartbeat_interval = i;
    }
    if let Some(p) = args.jobs_file {
        settings.jobs_file = Some(p);
    }
    epu_core::telemetry::init_tracing(&TelemetryConfig {
        log_format: settings.log_format,
        ..TelemetryConfig::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let code = rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        // Listen before the worker starts, so no signal finds the default action.
        for (kind, sig) in [
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::hangup(), Signal::SIGHUP),
        ] {
            let mut stream = signal(kind).with_context(|| format!("listening for {sig}"))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        tracing::info!(
            event = "agent_started",
            node_id = %settings.node_id,
            run = %settings.run,
            domain = %settings.domain,
            transport = ?settings.transport,
            interval_ms = settings.heartbeat_interval.as_millis() as u64,
            "epu-agent starting"
        );
        let connector = Arc::new(SettingsConnector::new(&settings));
        let code = epu_agent::run(settings, args.command, rx, connector).await?;
        anyhow::Ok(code)
    })?;
    // Do not wait on a stuck stderr write or the like: the worker is done.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code)
}
