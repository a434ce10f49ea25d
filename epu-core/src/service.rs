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
    opts.with_queue_type(cfg.queue_type)
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
    /// is started ([`Service::start`] raises it).
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

/// The one lifecycle of every epu service (provisioner, controller, sensor
/// aggregator): built with `X::new(config, deps)`, [`start`](Self::start)ed into
/// a running value that owns every task the service spawned, and
/// [`stop`](Running::stop)ped through that value. Readiness is raised in one
/// place, `start`, once the service answers on its queue, and lowered in one,
/// `stop`, before anything stops; so `/readyz` and the `ready` of a status
/// reply mean the same for every service, in its own process or in the
/// standalone host.
#[async_trait::async_trait]
pub trait Service: Send + Sync {
    /// The name it has on the bus and in logs (`provisioner`, …).
    const NAME: &'static str;
    type Running: Running;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Its readiness flag.
    fn readiness(&self) -> &crate::telemetry::Health;

    /// Starts the service's tasks and serves its queue; returns once it answers.
    /// Implementations do this; callers use [`start`](Self::start).
    async fn serve(&self) -> Result<Self::Running, Self::Error>;

    /// Serves, then raises readiness.
    async fn start(&self) -> Result<Self::Running, Self::Error> {
        let running = self.serve().await?;
        self.readiness().set_ready(true);
        tracing::info!(
            event = crate::telemetry::events::SERVICE_READY,
            service = Self::NAME,
            "ready"
        );
        Ok(running)
    }
}

/// A started service: dropping it leaves its tasks running, so stop it.
#[async_trait::async_trait]
pub trait Running: Send + Sized {
    /// The readiness flag of the service it runs.
    fn readiness(&self) -> &crate::telemetry::Health;

    /// Stops serving, then ends every task the service started (bounded).
    /// Implementations do this; callers use [`stop`](Self::stop).
    async fn halt(self);

    /// Lowers readiness, then halts.
    async fn stop(self) {
        self.readiness().set_ready(false);
        self.halt().await;
    }
}

/// Runs `service` until `shutdown` resolves: start, wait, stop.
pub async fn run_service<S, F>(service: &S, shutdown: F) -> Result<(), S::Error>
where
    S: Service,
    F: std::future::Future<Output = ()> + Send,
{
    let running = service.start().await?;
    shutdown.await;
    running.stop().await;
    Ok(())
}

/// Waits up to `within` for every task of `set` to end, then aborts the rest
/// (logging that `what` did not finish): how a running service ends its tasks.
pub async fn join_within(
    mut set: tokio::task::JoinSet<()>,
    within: std::time::Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!("{what} did not finish in {within:?}; stopping them");
                set.abort_all();
                while set.join_next().await.is_some() {}
                return;
            }
        }
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;
    use crate::telemetry::Health;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counting {
        ready: Health,
        started: Arc<AtomicUsize>,
        stopped: Arc<AtomicUsize>,
        fail: bool,
    }

    struct CountingRunning {
        ready: Health,
        stopped: Arc<AtomicUsize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused to start")]
    struct Refused;

    #[async_trait::async_trait]
    impl Service for Counting {
        const NAME: &'static str = "counting";
        type Running = CountingRunning;
        type Error = Refused;
        fn readiness(&self) -> &Health {
            &self.ready
        }
        async fn serve(&self) -> Result<CountingRunning, Refused> {
            if self.fail {
                return Err(Refused);
            }
            assert!(!self.ready.is_ready(), "ready before serving");
            self.started.fetch_add(1, Ordering::SeqCst);
            Ok(CountingRunning {
                ready: self.ready.clone(),
                stopped: self.stopped.clone(),
            })
        }
    }

    #[async_trait::async_trait]
    impl Running for CountingRunning {
        fn readiness(&self) -> &Health {
            &self.ready
        }
        async fn halt(self) {
            assert!(!self.ready.is_ready(), "still ready while halting");
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn run_service_is_ready_between_start_and_stop_only() {
        let svc = Counting::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let seen = svc.ready.clone();
        let started = svc.started.clone();
        let watcher = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while !seen.is_ready() {
                assert!(tokio::time::Instant::now() < until, "never became ready");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(started.load(Ordering::SeqCst), 1, "ready before start");
            let _ = tx.send(());
        });
        run_service(&svc, async {
            let _ = rx.await;
        })
        .await
        .expect("runs");
        watcher.await.expect("watcher");
        assert!(!svc.ready.is_ready(), "still ready after stop");
        assert_eq!(svc.stopped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn join_within_waits_for_tasks_then_aborts_the_stuck_ones() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        let d = done.clone();
        set.spawn(async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        set.spawn(std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        join_within(set, std::time::Duration::from_millis(200), "test tasks").await;
        let took = started.elapsed();
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "the quick task ran to its end"
        );
        assert!(
            took >= std::time::Duration::from_millis(200),
            "returned before the deadline: {took:?}"
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "the stuck task was not aborted: {took:?}"
        );
    }

    #[tokio::test]
    async fn a_service_that_cannot_start_is_never_ready() {
        let svc = Counting {
            fail: true,
            ..Counting::default()
        };
        let r = run_service(&svc, std::future::ready(())).await;
        assert!(r.is_err());
        assert!(!svc.ready.is_ready());
        assert_eq!(svc.stopped.load(Ordering::SeqCst), 0);
    }
}
