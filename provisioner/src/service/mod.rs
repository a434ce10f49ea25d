//! The provisioner service: node records, launches, terminations, reconciliation, and
//! the bus handler.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Provisioner`], [`RunningProvisioner`]: construction, start, stop, the public API |
//! | `handlers.rs` | the bus `Handler` (one function per op) and the read-only ops |
//! | `launch.rs` | `provision` and driving a launch to the IaaS and back |
//! | `terminate.rs` | `terminate_nodes`, `terminate_all`, sending terminations and killing zombies |
//! | `reconcile.rs` | recovery on start, the poll loop, driver events, the pure `plan` |
//! | `state.rs` | the in-memory `State`, the store commit, the `instance_info` sender |
//!
//! # How a launch goes
//!
//! 1. `provision` is checked ([`validate_request`](crate::record::validate_request)); a
//!    known launch id answers with the existing nodes and launches nothing.
//! 2. The launch (with a fresh idempotency token) and its nodes in REQUESTING are written
//!    to the store in one atomic, flushed batch. *Then* the reply goes out and the IaaS is
//!    called in the background.
//! 3. The driver's answer moves the nodes to REQUESTED (with their IaaS ids) and on to
//!    PENDING or RUNNING. Throttling, timeouts and 5xx are retried with
//!    `epu_core::backoff::retry` (nodes show ERROR_RETRYING); other errors fail the nodes
//!    with their reason.
//!
//! Every state change is stored first, then published to the node's subscriber as
//! `instance_info`, in order, by one sender task.
//!
//! # Reconciliation
//!
//! On start: the records are loaded; drivers *adopt* the instances the store knows (the
//! local driver re-attaches to live workers and reports dead ones); launches with nodes
//! still waiting for an instance are re-driven with their original tokens; terminations
//! of TERMINATING nodes are sent again. Then, every `poll_interval_secs`, each driver's
//! instances of the run are listed and compared with the records:
//!
//! * a known instance's state moves its node forward (PENDING → RUNNING, …);
//! * an instance the IaaS reports terminated fails its node (TERMINATED if it was asked);
//! * a node whose instance is not listed for `disappear_grace_secs` is FAILED with
//!   NODE_DISAPPEARED;
//! * a live instance of the run that no record claims — and that no launch still in
//!   progress may claim — is a zombie and is terminated;
//! * a TERMINATING node whose instance is still alive gets its termination sent again.
//!
//! The comparison is one pure function of (records, listing, memory, now), with every
//! time read from the provisioner's clock; see `reconcile.rs`.

mod handlers;
mod launch;
mod prune;
mod reconcile;
mod state;
mod terminate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::TimeDelta;
use epu_core::backoff::Backoff;
use epu_core::bus::{Bus, Handler, Server};
use epu_core::clock::SharedClock;
use epu_core::service::{join_within, run_service, Running, Service};
use epu_core::store::SharedStore;
use epu_core::telemetry::{events, Health, Metrics};
use epu_core::wire::{ReplyError, RunName, Service as BusService};
use epu_model::messages::{
    DescribeIaasReply, DescribeNodesReply, DescribeNodesRequest, DumpStateReply, EnableReply,
    ProvisionReply, ProvisionRequest, ProvisionerStatus, TerminateAllReply, TerminateNodesReply,
    TerminateNodesRequest,
};
use epu_model::NodeState;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Failpoint, ProvisionerConfig};
use crate::driver::{Drivers, IaasError};
use crate::error::ProvisionerError;
use crate::metrics::ProvisionerMetrics;

/// Kept at its old path: the drivers are built in [`crate::driver`] now.
pub use crate::driver::drivers_from_config;

use handlers::ProvisionerHandler;
use reconcile::Rules;
use state::{Outbox, State};

/// The name the provisioner sends as (`sender` of its envelopes).
pub const SENDER: &str = "provisioner";

/// What a failpoint does when reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailpointAction {
    /// `std::process::exit(137)`: the binary's crash tests.
    Exit,
    /// The task stops for good and [`Provisioner::failpoint_reached`] says so: library
    /// tests then drop the provisioner with [`RunningProvisioner::abort`].
    Halt,
}

/// The shared core of a [`Provisioner`]: everything its tasks and handlers use.
struct Inner {
    settings: Settings,
    deps: Deps,
    /// Records, launches and the reconciler's memory. Held across a commit, so the
    /// store and memory change together and updates are published in order.
    state: tokio::sync::Mutex<State>,
    outbox: Outbox,
    failpoints: Failpoints,
    life: Lifecycle,
}

/// What the config fixes at construction.
struct Settings {
    run: RunName,
    /// `drivers.local.allowed_commands`.
    allowed_commands: Option<Vec<String>>,
    /// The IaaS retry schedule (`iaas_retry`) and its attempt limit.
    backoff: Backoff,
    max_attempts: u32,
    poll_interval: Duration,
    /// The reconciler's thresholds (`disappear_grace_secs`, the resend interval).
    rules: Rules,
    /// `record_retention_secs`: how long a terminal record is kept.
    retention: TimeDelta,
}

/// What the provisioner is built over.
struct Deps {
    bus: Arc<dyn Bus>,
    store: SharedStore,
    clock: SharedClock,
    drivers: Drivers,
    /// The registry the metrics are in (served with the bus's).
    registry: Metrics,
    metrics: ProvisionerMetrics,
}

/// Test hooks: where to stop or exit, and where a `Halt` stopped.
struct Failpoints {
    armed: Mutex<Option<(Failpoint, FailpointAction)>>,
    hit: watch::Sender<Option<Failpoint>>,
}

/// The running service: its background tasks, readiness and stop signal.
struct Lifecycle {
    /// This provisioner, for the background tasks its methods start.
    this: Weak<Inner>,
    tasks: Mutex<JoinSet<()>>,
    started: AtomicBool,
    stopping: watch::Sender<bool>,
    health: Health,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The provisioner. Cheap to clone. See the crate docs for how to run it.
#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("run", &self.inner.settings.run)
            .field("drivers", &self.inner.deps.drivers)
            .finish_non_exhaustive()
    }
}

/// What a provisioner runs on.
pub struct ProvisionerDeps {
    pub bus: Arc<dyn Bus>,
    pub store: SharedStore,
    pub clock: SharedClock,
    pub drivers: Drivers,
    /// The registry its metrics go to (served with the bus's).
    pub metrics: Metrics,
    /// Its readiness flag (`/readyz`).
    pub readiness: Health,
}

/// A started provisioner: serving its queue, polling, reacting to driver events.
pub struct RunningProvisioner {
    provisioner: Provisioner,
    server: Option<Server>,
}

impl Provisioner {
    /// A provisioner over `bus`, `store` and `drivers`, with its own metrics registry.
    pub fn new(
        config: ProvisionerConfig,
        bus: Arc<dyn Bus>,
        store: SharedStore,
        clock: SharedClock,
        drivers: Drivers,
    ) -> Result<Self, ProvisionerError> {
        Self::with_metrics(config, bus, store, clock, drivers, Metrics::new())
    }

    /// The same, registering its metrics in `metrics` (to serve them with the bus's).
    pub fn with_metrics(
        config: ProvisionerConfig,
        bus: Arc<dyn Bus>,
        store: SharedStore,
        clock: SharedClock,
        drivers: Drivers,
        metrics: Metrics,
    ) -> Result<Self, ProvisionerError> {
        Self::from_parts(
            config,
            ProvisionerDeps {
                bus,
                store,
                clock,
                drivers,
                metrics,
                readiness: Health::new(),
            },
        )
    }

    /// A provisioner from its config and everything it runs on.
    pub fn from_parts(
        config: ProvisionerConfig,
        deps: ProvisionerDeps,
    ) -> Result<Self, ProvisionerError> {
        let ProvisionerDeps {
            bus,
            store,
            clock,
            drivers,
            metrics,
            readiness,
        } = deps;
        config.validate()?;
        let m = ProvisionerMetrics::register(&metrics)?;
        let poll_interval = config.poll_interval()?;
        let grace = TimeDelta::from_std(config.disappear_grace()?).unwrap_or(TimeDelta::MAX);
        let terminate_grace = config.terminate_grace()?;
        let resend_after = (terminate_grace + poll_interval * 2).max(Duration::from_secs(10));
        let backoff = Backoff::new(
            Duration::from_millis(config.iaas_retry.initial_ms),
            Duration::from_millis(config.iaas_retry.max_ms),
        );
        let failpoint = config.failpoint.map(|f| (f, FailpointAction::Exit));
        let retention = TimeDelta::from_std(config.record_retention()?).unwrap_or(TimeDelta::MAX);
        let inner = Arc::new_cyclic(|this| Inner {
            settings: Settings {
                run: config.run.clone(),
                allowed_commands: config.drivers.local.allowed_commands.clone(),
                backoff,
                max_attempts: config.iaas_retry.max_attempts,
                poll_interval,
                rules: Rules {
                    grace,
                    resend_after: TimeDelta::from_std(resend_after).unwrap_or(TimeDelta::MAX),
                },
                retention,
            },
            deps: Deps {
                bus,
                store,
                clock,
                drivers,
                registry: metrics,
                metrics: m,
            },
            state: tokio::sync::Mutex::new(State::default()),
            outbox: Outbox::new(),
            failpoints: Failpoints {
                armed: Mutex::new(failpoint),
                hit: watch::channel(None).0,
            },
            life: Lifecycle {
                this: this.clone(),
                tasks: Mutex::new(JoinSet::new()),
                started: AtomicBool::new(false),
                stopping: watch::channel(false).0,
                health: readiness,
            },
        });
        Ok(Provisioner { inner })
    }

    /// The registry its metrics are in.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.deps.registry
    }

    /// Its readiness flag (raised once it serves).
    pub fn health(&self) -> &Health {
        &self.inner.life.health
    }

    pub fn run_name(&self) -> &RunName {
        &self.inner.settings.run
    }

    pub fn drivers(&self) -> &Drivers {
        &self.inner.deps.drivers
    }

    /// Test hook: act at `at` as `action` says (the config's `failpoint` means `Exit`).
    pub fn set_failpoint(&self, at: Failpoint, action: FailpointAction) {
        *lock(&self.inner.failpoints.armed) = Some((at, action));
    }

    /// Which failpoint a `Halt` stopped at, if any.
    pub fn failpoint_reached(&self) -> watch::Receiver<Option<Failpoint>> {
        self.inner.failpoints.hit.subscribe()
    }

    /// Loads the store, reconciles, serves `provision` & co. on the bus, and starts the
    /// poll loop. Returns once serving (the [`Service`] lifecycle; readiness is raised
    /// there).
    pub async fn start(&self) -> Result<RunningProvisioner, ProvisionerError> {
        <Self as Service>::start(self).await
    }

    async fn serve_queue(&self) -> Result<RunningProvisioner, ProvisionerError> {
        let inner = &self.inner;
        if inner.life.started.swap(true, Ordering::SeqCst) {
            return Err(ProvisionerError::AlreadyStarted);
        }
        inner.load().await?;
        inner.watch_driver_events();
        inner.recover().await;

        if let Some(rx) = inner.outbox.take_receiver() {
            let me = inner.clone();
            inner.spawn(async move { me.send_loop(rx).await });
        }
        let me = inner.clone();
        inner.spawn(async move { me.poll_loop().await });

        let handler: Arc<dyn Handler> = Arc::new(ProvisionerHandler {
            inner: inner.clone(),
        });
        let server = inner
            .deps
            .bus
            .serve(BusService::Provisioner, handler)
            .await?;
        let (nodes, enabled) = {
            let st = inner.state.lock().await;
            (st.nodes.len(), st.enabled)
        };
        tracing::info!(
            event = events::SERVICE_STARTED,
            service = "provisioner",
            run = %inner.settings.run,
            nodes,
            enabled,
            drivers = ?inner.deps.drivers.names(),
            "provisioner serving"
        );
        Ok(RunningProvisioner {
            provisioner: self.clone(),
            server: Some(server),
        })
    }

    /// Starts, runs until `shutdown` completes, then stops gracefully.
    pub async fn run<F>(&self, shutdown: F) -> Result<(), ProvisionerError>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        run_service(self, shutdown).await
    }

    /// `provision`.
    pub async fn provision(&self, req: ProvisionRequest) -> Result<ProvisionReply, ReplyError> {
        self.inner.provision(req).await
    }

    /// `terminate_nodes`.
    pub async fn terminate_nodes(
        &self,
        req: TerminateNodesRequest,
    ) -> Result<TerminateNodesReply, ReplyError> {
        self.inner.terminate_nodes(req).await
    }

    /// `terminate_all`.
    pub async fn terminate_all(&self) -> Result<TerminateAllReply, ReplyError> {
        self.inner.terminate_all().await
    }

    /// `enable`.
    pub async fn enable(&self) -> Result<EnableReply, ReplyError> {
        self.inner.enable().await
    }

    /// `describe_nodes`.
    pub async fn describe_nodes(&self, req: DescribeNodesRequest) -> DescribeNodesReply {
        self.inner.describe_nodes(&req).await
    }

    /// `describe_iaas`: the instances the IaaS lists for this run.
    pub async fn describe_iaas(&self) -> DescribeIaasReply {
        self.inner.describe_iaas().await
    }

    /// `dump_state` of everything (no filter).
    pub async fn dump_state(&self) -> DumpStateReply {
        self.inner
            .dump_state(&DescribeNodesRequest::default())
            .await
    }

    /// `status`: service, run, readiness, enabled flag, node counts by state.
    pub async fn status(&self) -> ProvisionerStatus {
        self.inner.status().await
    }

    /// How many node records are in each state (states with none are left out).
    pub async fn counts(&self) -> BTreeMap<NodeState, i64> {
        let st = self.inner.state.lock().await;
        NodeState::ALL
            .iter()
            .zip(st.counts.iter())
            .filter(|(_, n)| **n != 0)
            .map(|(s, n)| (*s, *n))
            .collect()
    }

    /// Lists every driver's instances once and reconciles (what the poll loop does each
    /// interval). For tests and the simulator, which move a manual clock.
    pub async fn reconcile_now(&self) {
        self.inner.reconcile_once().await;
    }

    /// Prunes terminal records older than `record_retention_secs` once (what the
    /// poll loop does every tenth of the retention); how many were deleted.
    pub async fn prune_now(&self) -> usize {
        self.inner.prune_once().await
    }
}

impl RunningProvisioner {
    pub fn provisioner(&self) -> &Provisioner {
        &self.provisioner
    }

    /// Graceful stop: stop taking messages, let launches in progress finish (up to 10 s;
    /// what is cut off is re-driven at the next start), send the queued `instance_info`,
    /// stop the tasks. Workers and instances keep running.
    pub async fn stop(self) {
        <Self as Running>::stop(self).await
    }

    async fn drain_and_stop(mut self) {
        let inner = &self.provisioner.inner;
        tracing::info!(event = events::SERVICE_STOPPING, service = "provisioner", run = %inner.settings.run);
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let _ = inner.life.stopping.send(true);
        let set = std::mem::take(&mut *lock(&inner.life.tasks));
        join_within(set, Duration::from_secs(10), "provisioner tasks").await;
    }

    /// Crash, for tests: stop taking messages and kill every task at once, with no
    /// draining. Whatever was not stored is lost, as in a real crash.
    pub async fn abort(mut self) {
        let inner = &self.provisioner.inner;
        inner.life.health.set_ready(false);
        let _ = inner.life.stopping.send(true);
        let mut set = std::mem::take(&mut *lock(&inner.life.tasks));
        set.abort_all();
        while set.join_next().await.is_some() {}
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

#[async_trait::async_trait]
impl Service for Provisioner {
    const NAME: &'static str = SENDER;
    type Running = RunningProvisioner;
    type Error = ProvisionerError;

    fn readiness(&self) -> &Health {
        &self.inner.life.health
    }

    async fn serve(&self) -> Result<RunningProvisioner, ProvisionerError> {
        self.serve_queue().await
    }
}

#[async_trait::async_trait]
impl Running for RunningProvisioner {
    fn readiness(&self) -> &Health {
        &self.provisioner.inner.life.health
    }

    async fn halt(self) {
        self.drain_and_stop().await
    }
}

impl Inner {
    /// Runs `fut` as one of the provisioner's tasks (stopped or aborted with it).
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut set = lock(&self.life.tasks);
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }

    /// An `Arc` of self, for background tasks (`None` only while being dropped).
    fn me(&self) -> Option<Arc<Inner>> {
        self.life.this.upgrade()
    }

    /// Acts on the failpoint `at` if it is armed (a test hook).
    async fn failpoint(&self, at: Failpoint) {
        epu_core::failpoint::crash_if_armed(at.one_shot_name());
        let fp = *lock(&self.failpoints.armed);
        let Some((p, action)) = fp else { return };
        if p != at {
            return;
        }
        match action {
            FailpointAction::Exit => {
                tracing::error!(
                    failpoint = at.as_str(),
                    "failpoint reached: exiting abruptly (test hook)"
                );
                std::process::exit(137);
            }
            FailpointAction::Halt => {
                tracing::warn!(
                    failpoint = at.as_str(),
                    "failpoint reached: halting this task (test hook)"
                );
                self.failpoints.hit.send_replace(Some(at));
                std::future::pending::<()>().await;
            }
        }
    }

    /// One IaaS call, its latency and any error counted in the metrics and logged.
    async fn timed<T, F>(&self, driver: &str, call: &str, fut: F) -> Result<T, IaasError>
    where
        F: std::future::Future<Output = Result<T, IaasError>>,
    {
        let started = tokio::time::Instant::now();
        let r = fut.await;
        self.deps
            .metrics
            .iaas_latency
            .with_label_values(&[driver, call])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            self.deps.metrics.iaas_error(driver, call, e.kind);
            tracing::warn!(driver, call, class = e.kind.label(), error = %e, "IaaS call failed");
        }
        r
    }
}
