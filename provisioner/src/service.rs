//! The provisioner service: node records, launches, terminations, reconciliation, and
//! the bus handler.
//!
//! # How a launch goes
//!
//! 1. `provision` is checked ([`validate_request`]); a known launch id answers with the
//!    existing nodes and launches nothing.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use epu_core::backoff::{retry, Backoff};
use epu_core::bus::{Bus, Handler, Incoming, Server};
use epu_core::clock::SharedClock;
use epu_core::config::Transport;
use epu_core::store::{SharedStore, StoreError};
use epu_core::telemetry::{events, Health, Metrics};
use epu_core::wire::{Envelope, ErrorCode, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    Deployable, DescribeIaasReply, DescribeNodesReply, DescribeNodesRequest, EnableRequest,
    FailReason, IaasInstance, NodeRecord, ProvisionReply, ProvisionRequest, TerminateAllReply,
    TerminateAllRequest, TerminateNodesReply, TerminateNodesRequest,
};
use epu_model::NodeState;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::config::{Failpoint, ProvisionerConfig};
use crate::driver::local::{LocalDriver, LocalSettings};
use crate::driver::sim::{SimDriver, SimSettings};
use crate::driver::{
    DriverEvent, Drivers, IaasDriver, IaasError, IaasErrorKind, InstanceRef, InstanceState,
    LaunchOutcome, LaunchRequest, ListedInstance, TerminateOutcome,
};
use crate::error::ProvisionerError;
use crate::metrics::ProvisionerMetrics;
use crate::record::{
    apply, awaits_launch, launch_key, node_key, parse_subscriber, validate_request, StoredLaunch,
    StoredNode, Update, META_ENABLED, TREE,
};

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

/// Builds the drivers a config turns on (`local`, `sim`, and `ec2` when its section is
/// present).
pub async fn drivers_from_config(
    cfg: &ProvisionerConfig,
    clock: SharedClock,
) -> Result<Drivers, ProvisionerError> {
    cfg.validate()?;
    let mut drivers = Drivers::new();
    if cfg.drivers.local.enabled {
        let mut env = BTreeMap::new();
        match cfg.bus.transport {
            Transport::Amqp => {
                env.insert("EPU_BUS__TRANSPORT".to_string(), "amqp".to_string());
                let url = match &cfg.drivers.local.worker_amqp_url {
                    Some(s) => s.expose().to_string(),
                    None => cfg.bus.amqp_url.clone(),
                };
                env.insert("EPU_BUS__AMQP_URL".to_string(), url);
            }
            Transport::Local => {
                env.insert("EPU_BUS__TRANSPORT".to_string(), "local".to_string());
            }
        }
        if let Some(hb) = cfg.drivers.local.heartbeat_interval_secs {
            env.insert("EPU_HEARTBEAT__INTERVAL_SECS".to_string(), hb.to_string());
        }
        drivers.insert(Arc::new(LocalDriver::new(
            cfg.run.clone(),
            LocalSettings {
                run_dir: cfg.run_dir.clone(),
                terminate_grace: cfg.terminate_grace()?,
                poll_interval: cfg.poll_interval()?,
                worker_env: env,
            },
        )));
    }
    if cfg.drivers.sim.enabled {
        drivers.insert(Arc::new(SimDriver::new(
            clock,
            SimSettings {
                boot_secs: cfg.drivers.sim.boot_secs,
                failure_rate: cfg.drivers.sim.failure_rate,
                seed: cfg.drivers.sim.seed,
            },
        )));
    }
    if let Some(ec2) = &cfg.drivers.ec2 {
        #[cfg(feature = "ec2")]
        {
            let driver = crate::driver::ec2::Ec2Driver::from_config(ec2, &cfg.bus).await?;
            drivers.insert(Arc::new(driver));
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = ec2;
            return Err(ProvisionerError::Driver {
                driver: "ec2",
                message: "this build has no ec2 driver; rebuild with `--features ec2` or remove [drivers.ec2]".into(),
            });
        }
    }
    Ok(drivers)
}

// ---------------------------------------------------------------------------------------
// state

#[derive(Default)]
struct State {
    nodes: HashMap<String, StoredNode>,
    launches: HashMap<String, StoredLaunch>,
    enabled: bool,
    /// Launches whose IaaS call is being made (they may still produce instances).
    in_flight: HashSet<String>,
    /// Node id → when the IaaS was first seen not to list its instance.
    missing_since: HashMap<String, DateTime<Utc>>,
    /// Node id (or `zombie:<iaas id>`) → when its termination was last sent.
    last_terminate: HashMap<String, tokio::time::Instant>,
    /// Exits that came before the launch result recorded the instance.
    early_exits: HashMap<String, (String, String)>,
    counts: [i64; 11],
    terminate_all_pending: bool,
}

impl State {
    fn remaining(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| !n.record.state.is_terminal())
            .count()
    }

    /// The launch ids that may still produce instances, and the nodes that wait for one.
    fn protected(&self) -> (HashSet<String>, HashSet<String>) {
        let mut launches: HashSet<String> = self.in_flight.iter().cloned().collect();
        let mut nodes = HashSet::new();
        for n in self.nodes.values() {
            if awaits_launch(&n.record) {
                launches.insert(n.record.launch_id.clone());
                nodes.insert(n.record.node_id.clone());
            }
        }
        (launches, nodes)
    }
}

struct Outgoing {
    to: Service,
    record: NodeRecord,
}

struct Inner {
    /// This provisioner, for the background tasks its methods start.
    this: std::sync::Weak<Inner>,
    /// `drivers.local.allowed_commands`.
    allowed_commands: Option<Vec<String>>,
    run: RunName,
    bus: Arc<dyn Bus>,
    store: SharedStore,
    clock: SharedClock,
    drivers: Drivers,
    metrics: Metrics,
    m: ProvisionerMetrics,
    health: Health,
    state: tokio::sync::Mutex<State>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    failpoint: Mutex<Option<(Failpoint, FailpointAction)>>,
    failpoint_hit: watch::Sender<Option<Failpoint>>,
    tasks: Mutex<JoinSet<()>>,
    started: AtomicBool,
    stopping: watch::Sender<bool>,
    backoff: Backoff,
    max_attempts: u32,
    poll_interval: Duration,
    grace: TimeDelta,
    resend_after: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn idx(s: NodeState) -> usize {
    s as usize
}

fn reason_str(r: Option<FailReason>) -> String {
    r.and_then(|r| serde_json::to_value(r).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The provisioner. Cheap to clone. See the crate docs for how to run it.
#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("run", &self.inner.run)
            .field("drivers", &self.inner.drivers)
            .finish_non_exhaustive()
    }
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
        config.validate()?;
        let m = ProvisionerMetrics::register(&metrics)?;
        let poll_interval = config.poll_interval()?;
        let grace = TimeDelta::from_std(config.disappear_grace()?).unwrap_or(TimeDelta::MAX);
        let terminate_grace = config.terminate_grace()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let backoff = Backoff::new(
            Duration::from_millis(config.iaas_retry.initial_ms),
            Duration::from_millis(config.iaas_retry.max_ms),
        );
        let failpoint = config.failpoint.map(|f| (f, FailpointAction::Exit));
        let inner = Arc::new_cyclic(|this| Inner {
            this: this.clone(),
            allowed_commands: config.drivers.local.allowed_commands.clone(),
            run: config.run.clone(),
            max_attempts: config.iaas_retry.max_attempts,
            bus,
            store,
            clock,
            drivers,
            metrics,
            m,
            health: Health::new(),
            state: tokio::sync::Mutex::new(State::default()),
            outbox: tx,
            outbox_rx: Mutex::new(Some(rx)),
            failpoint: Mutex::new(failpoint),
            failpoint_hit: watch::channel(None).0,
            tasks: Mutex::new(JoinSet::new()),
            started: AtomicBool::new(false),
            stopping: watch::channel(false).0,
            backoff,
            poll_interval,
            grace,
            resend_after: (terminate_grace + poll_interval * 2).max(Duration::from_secs(10)),
        });
        Ok(Provisioner { inner })
    }

    /// The registry its metrics are in.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Its readiness flag (raised once it serves).
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    pub fn run_name(&self) -> &RunName {
        &self.inner.run
    }

    pub fn drivers(&self) -> &Drivers {
        &self.inner.drivers
    }

    /// Test hook: act at `at` as `action` says (the config's `failpoint` means `Exit`).
    pub fn set_failpoint(&self, at: Failpoint, action: FailpointAction) {
        *lock(&self.inner.failpoint) = Some((at, action));
    }

    /// Which failpoint a `Halt` stopped at, if any.
    pub fn failpoint_reached(&self) -> watch::Receiver<Option<Failpoint>> {
        self.inner.failpoint_hit.subscribe()
    }

    /// Loads the store, reconciles, serves `provision` & co. on the bus, and starts the
    /// poll loop. Returns once serving.
    pub async fn start(&self) -> Result<RunningProvisioner, ProvisionerError> {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return Err(ProvisionerError::AlreadyStarted);
        }
        let inner = &self.inner;
        inner.load().await?;

        // Driver events: exits, at once.
        for (name, driver) in inner.drivers.iter() {
            if let Some(mut rx) = driver.take_events() {
                let me = inner.clone();
                let name = name.clone();
                let mut stopping = inner.stopping.subscribe();
                inner.spawn(async move {
                    loop {
                        tokio::select! {
                            ev = rx.recv() => match ev {
                                Some(ev) => me.on_event(&name, ev).await,
                                None => return,
                            },
                            _ = stopping.changed() => return,
                        }
                    }
                });
            }
        }

        // Re-adopt what the store says exists.
        let (adopt, redrive, resend) = {
            let st = inner.state.lock().await;
            let mut adopt: BTreeMap<String, Vec<InstanceRef>> = BTreeMap::new();
            let mut resend: BTreeMap<String, Vec<InstanceRef>> = BTreeMap::new();
            for n in st.nodes.values() {
                let rec = &n.record;
                let Some(id) = &rec.iaas_id else { continue };
                let r = InstanceRef {
                    node_id: rec.node_id.clone(),
                    iaas_id: id.clone(),
                    incarnation: n.incarnation.clone(),
                };
                if rec.state == NodeState::Terminating {
                    resend
                        .entry(rec.driver.clone())
                        .or_default()
                        .push(r.clone());
                }
                if !rec.state.is_terminal() {
                    adopt.entry(rec.driver.clone()).or_default().push(r);
                }
            }
            let mut redrive: Vec<String> = Vec::new();
            for l in st.launches.values() {
                let pending = l.node_ids.iter().any(|id| {
                    st.nodes.get(id).is_some_and(|n| {
                        awaits_launch(&n.record)
                            || (n.record.iaas_id.is_none()
                                && n.record.state == NodeState::Terminating)
                    })
                });
                if pending {
                    redrive.push(l.launch_id.clone());
                }
            }
            (adopt, redrive, resend)
        };
        for (driver, refs) in adopt {
            if let Some(d) = inner.drivers.get(&driver) {
                d.adopt(&refs).await;
            }
        }
        if !redrive.is_empty() {
            tracing::info!(
                launches = redrive.len(),
                "re-driving launches left unfinished by the last run"
            );
            let mut st = inner.state.lock().await;
            for id in &redrive {
                st.in_flight.insert(id.clone());
            }
        }
        for id in redrive {
            let me = inner.clone();
            inner.spawn(async move { me.drive_launch(id).await });
        }
        for (driver, refs) in resend {
            let me = inner.clone();
            inner.spawn(async move { me.terminate_instances(&driver, refs).await });
        }

        // instance_info sender.
        if let Some(rx) = lock(&inner.outbox_rx).take() {
            let me = inner.clone();
            inner.spawn(async move { me.send_loop(rx).await });
        }

        // The poll loop.
        let me = inner.clone();
        inner.spawn(async move { me.poll_loop().await });

        let handler: Arc<dyn Handler> = Arc::new(ProvisionerHandler {
            inner: inner.clone(),
        });
        let server = inner.bus.serve(Service::Provisioner, handler).await?;
        inner.health.set_ready(true);
        let (nodes, enabled) = {
            let st = inner.state.lock().await;
            (st.nodes.len(), st.enabled)
        };
        tracing::info!(
            event = events::SERVICE_STARTED,
            service = "provisioner",
            run = %inner.run,
            nodes,
            enabled,
            drivers = ?inner.drivers.names(),
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
        F: std::future::Future<Output = ()>,
    {
        let running = self.start().await?;
        shutdown.await;
        running.stop().await;
        Ok(())
    }

    // ---- operations, callable in-process as well as over the bus

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
    pub async fn enable(&self) -> Result<Value, ReplyError> {
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

    /// `dump_state`.
    pub async fn dump_state(&self) -> Value {
        self.inner.dump_state().await
    }

    /// `status`: service, run, readiness, enabled flag, node counts by state.
    pub async fn status(&self) -> Value {
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
}

impl RunningProvisioner {
    pub fn provisioner(&self) -> &Provisioner {
        &self.provisioner
    }

    /// Graceful stop: stop taking messages, let launches in progress finish (up to 10 s;
    /// what is cut off is re-driven at the next start), send the queued `instance_info`,
    /// stop the tasks. Workers and instances keep running.
    pub async fn stop(mut self) {
        let inner = &self.provisioner.inner;
        inner.health.set_ready(false);
        tracing::info!(event = events::SERVICE_STOPPING, service = "provisioner", run = %inner.run);
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let _ = inner.stopping.send(true);
        let mut set = std::mem::take(&mut *lock(&inner.tasks));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("provisioner tasks did not finish in 10 s; stopping them");
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }

    /// Crash, for tests: stop taking messages and kill every task at once, with no
    /// draining. Whatever was not stored is lost, as in a real crash.
    pub async fn abort(mut self) {
        let inner = &self.provisioner.inner;
        inner.health.set_ready(false);
        let _ = inner.stopping.send(true);
        let mut set = std::mem::take(&mut *lock(&inner.tasks));
        set.abort_all();
        while set.join_next().await.is_some() {}
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// the engine room

impl Inner {
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut set = lock(&self.tasks);
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }

    async fn store_batch(&self, items: Vec<(String, Vec<u8>)>) -> Result<(), ProvisionerError> {
        if items.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_batch(TREE, &items))
            .await
            .map_err(|e| ProvisionerError::Task(e.to_string()))??;
        Ok(())
    }

    async fn load(&self) -> Result<(), ProvisionerError> {
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            use epu_core::store::StoreExt;
            let nodes = store.scan_prefix_json::<StoredNode>(TREE, "node/")?;
            let launches = store.scan_prefix_json::<StoredLaunch>(TREE, "launch/")?;
            let enabled = store.get_json::<bool>(TREE, META_ENABLED)?;
            Ok::<_, StoreError>((nodes, launches, enabled))
        })
        .await
        .map_err(|e| ProvisionerError::Task(e.to_string()))??;
        let (nodes, launches, enabled) = loaded;
        let mut st = self.state.lock().await;
        st.enabled = enabled.unwrap_or(true);
        for (_, n) in nodes {
            st.counts[idx(n.record.state)] += 1;
            st.nodes.insert(n.record.node_id.clone(), n);
        }
        for (_, l) in launches {
            st.launches.insert(l.launch_id.clone(), l);
        }
        self.m.set_node_counts(&st.counts);
        self.m.enabled.set(i64::from(st.enabled));
        tracing::info!(
            nodes = st.nodes.len(),
            launches = st.launches.len(),
            enabled = st.enabled,
            "loaded the provisioner's records"
        );
        Ok(())
    }

    /// Applies `updates` (and writes `extra` items) in one flushed batch, then queues an
    /// `instance_info` for every node that changed. Nothing changes in memory if the
    /// write fails.
    async fn commit(
        &self,
        st: &mut State,
        updates: Vec<Update>,
        extra: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ProvisionerError> {
        let now = self.clock.now();
        let mut working: HashMap<String, StoredNode> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut publish: Vec<(Service, NodeRecord, bool)> = Vec::new();
        for u in &updates {
            if !working.contains_key(&u.node_id) {
                let Some(n) = st.nodes.get(&u.node_id) else {
                    tracing::debug!(node_id = %u.node_id, "update for an unknown node dropped");
                    continue;
                };
                working.insert(u.node_id.clone(), n.clone());
                order.push(u.node_id.clone());
            }
            let Some(cur) = working.get_mut(&u.node_id) else {
                continue;
            };
            let a = apply(cur, u, now);
            if a.any() {
                publish.push((cur.subscriber, cur.record.clone(), a.state));
            } else if let Some(s) = u.state {
                tracing::debug!(node_id = %u.node_id, state = %s, current = %cur.record.state, "duplicate or out-of-order state dropped");
            }
        }
        if publish.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let changed: HashSet<&str> = publish.iter().map(|(_, r, _)| r.node_id.as_str()).collect();
        let mut items = extra;
        for id in &order {
            if !changed.contains(id.as_str()) {
                continue;
            }
            if let Some(n) = working.get(id) {
                let bytes = serde_json::to_vec(n).map_err(|source| StoreError::Encode {
                    tree: TREE.to_string(),
                    key: node_key(id),
                    source,
                })?;
                items.push((node_key(id), bytes));
            }
        }
        self.store_batch(items).await?;
        for id in order {
            if !changed.contains(id.as_str()) {
                continue;
            }
            if let Some(n) = working.remove(&id) {
                if let Some(old) = st.nodes.get(&id) {
                    st.counts[idx(old.record.state)] -= 1;
                }
                st.counts[idx(n.record.state)] += 1;
                if n.record.state.is_terminal() {
                    st.missing_since.remove(&id);
                    st.early_exits.remove(&id);
                }
                st.nodes.insert(id, n);
            }
        }
        self.m.set_node_counts(&st.counts);
        // Only state changes are published: a subscriber drops a report that is not
        // later than what it has, so fact-only changes (an id, addresses) ride along with
        // the node's next state.
        for (to, record, state_changed) in publish {
            if state_changed {
                log_state(&record);
                let _ = self.outbox.send(Outgoing { to, record });
            }
        }
        if st.terminate_all_pending && st.remaining() == 0 {
            st.terminate_all_pending = false;
            tracing::info!(event = events::TERMINATE_ALL_DONE, run = %self.run, "terminate_all: nothing of the run is left");
        }
        Ok(())
    }

    /// Commits in chunks (a poll of 100,000 nodes must not hold them all twice over in
    /// memory) and logs a failed write; the poll reports the world again next time.
    async fn commit_logged(&self, st: &mut State, mut updates: Vec<Update>) {
        const CHUNK: usize = 4096;
        while !updates.is_empty() {
            let rest = updates.split_off(updates.len().min(CHUNK));
            if let Err(e) = self.commit(st, updates, Vec::new()).await {
                tracing::error!(error = %e, "cannot store node updates; they are retried at the next poll");
            }
            updates = rest;
        }
    }

    async fn failpoint(&self, at: Failpoint) {
        let fp = *lock(&self.failpoint);
        if let Some((p, action)) = fp {
            if p == at {
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
                        self.failpoint_hit.send_replace(Some(at));
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    /// One `terminate` call, timed, retried on retryable errors with the shared backoff.
    async fn terminate_with_retry(
        &self,
        drv: &dyn IaasDriver,
        chunk: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError> {
        retry(
            &self.backoff,
            self.max_attempts,
            |e: &IaasError| e.is_retryable(),
            || async move {
                self.timed(drv.name(), "terminate", drv.terminate(chunk))
                    .await
            },
        )
        .await
    }

    async fn timed<T, F>(&self, driver: &str, call: &str, fut: F) -> Result<T, IaasError>
    where
        F: std::future::Future<Output = Result<T, IaasError>>,
    {
        let started = tokio::time::Instant::now();
        let r = fut.await;
        self.m
            .iaas_latency
            .with_label_values(&[driver, call])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            self.m.iaas_error(driver, call, e.kind);
            tracing::warn!(driver, call, class = e.kind.label(), error = %e, "IaaS call failed");
        }
        r
    }

    // ---- provision

    async fn provision(&self, req: ProvisionRequest) -> Result<ProvisionReply, ReplyError> {
        validate_request(&req).map_err(ReplyError::bad_request)?;
        let subscriber = match &req.subscriber {
            Some(s) => parse_subscriber(s).map_err(ReplyError::bad_request)?,
            None => Service::Controller,
        };
        if let (Deployable::Local(l), Some(allowed)) = (&req.deployable, &self.allowed_commands) {
            if !allowed.contains(&l.command) {
                return Err(ReplyError::bad_request(format!(
                    "command {:?} is not in drivers.local.allowed_commands",
                    l.command
                )));
            }
        }
        let driver = req.deployable.driver();
        let mut st = self.state.lock().await;
        if let Some(existing) = st.launches.get(&req.launch_id) {
            let nodes: Vec<NodeRecord> = existing
                .node_ids
                .iter()
                .filter_map(|id| st.nodes.get(id).map(|n| n.record.clone()))
                .collect();
            tracing::info!(launch_id = %req.launch_id, "provision with a known launch id: launching nothing, answering with its nodes");
            return Ok(ProvisionReply {
                launch_id: req.launch_id,
                nodes,
            });
        }
        if self.drivers.get(driver).is_none() {
            return Err(ReplyError::bad_request(format!(
                "driver {driver:?} is not enabled in this provisioner (enabled: {})",
                self.drivers.names().join(", ")
            )));
        }
        let node_ids: Vec<String> = if req.node_ids.is_empty() {
            (0..req.count).map(|_| Uuid::new_v4().to_string()).collect()
        } else {
            req.node_ids.clone()
        };
        for id in &node_ids {
            if let Some(n) = st.nodes.get(id) {
                return Err(ReplyError::conflict(format!(
                    "node id {id:?} already belongs to launch {:?}",
                    n.record.launch_id
                )));
            }
        }
        let now = self.clock.now();
        let enabled = st.enabled;
        let state = if enabled {
            NodeState::Requesting
        } else {
            NodeState::Rejected
        };
        let launch = StoredLaunch {
            launch_id: req.launch_id.clone(),
            domain: req.domain.clone(),
            token: Uuid::new_v4().simple().to_string(),
            deployable: req.deployable.clone(),
            node_ids: node_ids.clone(),
            vars: req.vars.clone(),
            subscriber,
            requested_at: now,
        };
        let mut nodes = Vec::with_capacity(node_ids.len());
        for id in &node_ids {
            let mut times = BTreeMap::new();
            times.insert(state, now);
            nodes.push(StoredNode {
                record: NodeRecord {
                    node_id: id.clone(),
                    launch_id: req.launch_id.clone(),
                    domain: req.domain.clone(),
                    run: self.run.to_string(),
                    driver: driver.to_string(),
                    iaas_id: None,
                    addresses: Vec::new(),
                    state,
                    reason: (!enabled).then_some(FailReason::ProvisionerDisabled),
                    reason_detail: (!enabled).then(|| {
                        "the provisioner is disabled (terminate_all); send enable to provision again"
                            .to_string()
                    }),
                    state_times: times,
                    vars: req.vars.clone(),
                },
                subscriber,
                incarnation: None,
            });
        }
        let mut items = Vec::with_capacity(nodes.len() + 1);
        let encode_err = |key: String, source| {
            ReplyError::internal(
                StoreError::Encode {
                    tree: TREE.to_string(),
                    key,
                    source,
                }
                .to_string(),
            )
        };
        let lkey = launch_key(&launch.launch_id);
        let lbytes = serde_json::to_vec(&launch).map_err(|e| encode_err(lkey.clone(), e))?;
        items.push((lkey, lbytes));
        for n in &nodes {
            let key = node_key(&n.record.node_id);
            let bytes = serde_json::to_vec(n).map_err(|e| encode_err(key.clone(), e))?;
            items.push((key, bytes));
        }
        // Write-ahead: the launch and its nodes are durable before the IaaS hears of it.
        self.store_batch(items).await.map_err(|e| {
            tracing::error!(error = %e, launch_id = %req.launch_id, "cannot store a launch");
            ReplyError::internal(format!("cannot store the launch: {e}"))
        })?;
        let mut records = Vec::with_capacity(nodes.len());
        for n in nodes {
            st.counts[idx(n.record.state)] += 1;
            records.push(n.record.clone());
            log_state(&n.record);
            let _ = self.outbox.send(Outgoing {
                to: subscriber,
                record: n.record.clone(),
            });
            st.nodes.insert(n.record.node_id.clone(), n);
        }
        self.m.set_node_counts(&st.counts);
        st.launches.insert(launch.launch_id.clone(), launch);
        if enabled {
            tracing::info!(
                event = "launch_requested",
                launch_id = %req.launch_id,
                domain = %req.domain,
                driver,
                count = req.count,
                "launch stored; asking the IaaS"
            );
            st.in_flight.insert(req.launch_id.clone());
        } else {
            self.m
                .launches
                .with_label_values(&[driver, "rejected"])
                .inc();
            tracing::warn!(
                event = "launch_rejected",
                launch_id = %req.launch_id,
                domain = %req.domain,
                reason = "PROVISIONER_DISABLED",
                "provision while disabled: nodes REJECTED"
            );
        }
        drop(st);
        if enabled {
            if let Some(me) = self.me() {
                let id = req.launch_id.clone();
                self.spawn(async move { me.drive_launch(id).await });
            }
        }
        Ok(ProvisionReply {
            launch_id: req.launch_id,
            nodes: records,
        })
    }

    /// An `Arc` of self, for background tasks (`None` only while being dropped).
    fn me(&self) -> Option<Arc<Inner>> {
        self.this.upgrade()
    }

    async fn drive_launch(self: Arc<Self>, launch_id: String) {
        self.drive_launch_inner(&launch_id).await;
        self.state.lock().await.in_flight.remove(&launch_id);
    }

    async fn drive_launch_inner(&self, launch_id: &str) {
        let (launch, pending, unlaunched_terminating) = {
            let st = self.state.lock().await;
            let Some(l) = st.launches.get(launch_id).cloned() else {
                return;
            };
            let mut pending = Vec::new();
            let mut cancelled = Vec::new();
            for id in &l.node_ids {
                if let Some(n) = st.nodes.get(id) {
                    if awaits_launch(&n.record) {
                        pending.push(id.clone());
                    } else if n.record.iaas_id.is_none() && n.record.state == NodeState::Terminating
                    {
                        cancelled.push(id.clone());
                    }
                }
            }
            (l, pending, cancelled)
        };
        if !unlaunched_terminating.is_empty() {
            let mut st = self.state.lock().await;
            let ups = unlaunched_terminating
                .iter()
                .map(|id| {
                    Update::state(id, NodeState::Terminated)
                        .with_detail("terminated before an instance was launched")
                })
                .collect();
            self.commit_logged(&mut st, ups).await;
        }
        if pending.is_empty() {
            return;
        }
        self.failpoint(Failpoint::AfterStoreBeforeIaas).await;
        let driver_name = launch.deployable.driver();
        let Some(driver) = self.drivers.get(driver_name).cloned() else {
            let e = IaasError::bad_request(format!("driver {driver_name:?} is not enabled"));
            self.fail_launch(&launch, &pending, &e).await;
            return;
        };
        let req = LaunchRequest {
            run: self.run.clone(),
            launch_id: launch.launch_id.clone(),
            token: launch.token.clone(),
            domain: launch.domain.clone(),
            node_ids: pending.clone(),
            deployable: launch.deployable.clone(),
            vars: launch.vars.clone(),
        };
        let me: &Inner = self;
        let req_ref = &req;
        let drv: &dyn IaasDriver = driver.as_ref();
        let pending_ref = &pending;
        let result: Result<LaunchOutcome, IaasError> = retry(
            &self.backoff,
            self.max_attempts,
            |e: &IaasError| e.is_retryable(),
            || async move {
                if me.launch_cancelled(pending_ref).await {
                    return Err(IaasError::new(
                        IaasErrorKind::Cancelled,
                        "every node of the launch was terminated before it launched",
                    ));
                }
                let r = me.timed(drv.name(), "launch", drv.launch(req_ref)).await;
                if let Err(e) = &r {
                    if e.is_retryable() {
                        me.mark_retrying(pending_ref, e).await;
                    }
                }
                r
            },
        )
        .await;
        self.failpoint(Failpoint::AfterIaasBeforeStore).await;
        match result {
            Ok(outcome) => self.record_launch(&launch, drv.name(), outcome).await,
            Err(e) => self.fail_launch(&launch, &pending, &e).await,
        }
    }

    async fn launch_cancelled(&self, pending: &[String]) -> bool {
        let st = self.state.lock().await;
        pending.iter().all(|id| {
            st.nodes
                .get(id)
                .is_none_or(|n| n.record.state >= NodeState::Terminating)
        })
    }

    async fn mark_retrying(&self, pending: &[String], e: &IaasError) {
        let mut st = self.state.lock().await;
        let ups = pending
            .iter()
            .map(|id| Update::state(id, NodeState::ErrorRetrying).with_detail(e.detail()))
            .collect();
        self.commit_logged(&mut st, ups).await;
    }

    async fn record_launch(&self, launch: &StoredLaunch, driver: &str, outcome: LaunchOutcome) {
        let mut st = self.state.lock().await;
        let mut ups = Vec::new();
        for inst in &outcome.instances {
            ups.push(Update {
                iaas_id: Some(inst.iaas_id.clone()),
                incarnation: inst.incarnation.clone(),
                addresses: Some(inst.addresses.clone()),
                ..Update::state(&inst.node_id, NodeState::Requested)
            });
            match inst.state {
                InstanceState::Pending => {
                    ups.push(Update::state(&inst.node_id, NodeState::Pending))
                }
                InstanceState::Running => {
                    ups.push(Update::state(&inst.node_id, NodeState::Running))
                }
                // The poll settles these.
                InstanceState::Stopping | InstanceState::Terminated => {}
            }
        }
        for (id, e) in &outcome.failed {
            ups.push(failure_update(&st, id, e));
        }
        let launched = outcome.instances.len() as u64;
        self.commit_logged(&mut st, ups).await;
        self.m
            .nodes_launched
            .with_label_values(&[driver])
            .inc_by(launched);
        let outcome_label = if outcome.failed.is_empty() {
            "ok"
        } else {
            "failed"
        };
        self.m
            .launches
            .with_label_values(&[driver, outcome_label])
            .inc();
        tracing::info!(
            event = events::NODE_LAUNCH_REQUESTED,
            launch_id = %launch.launch_id,
            domain = %launch.domain,
            driver,
            launched,
            failed = outcome.failed.len(),
            "the IaaS launched the batch"
        );
        // Exits that raced ahead of this record, and terminations asked meanwhile.
        let mut ups = Vec::new();
        let mut to_terminate = Vec::new();
        for inst in &outcome.instances {
            if let Some((iaas, detail)) = st.early_exits.remove(&inst.node_id) {
                if iaas == inst.iaas_id {
                    if let Some(n) = st.nodes.get(&inst.node_id) {
                        if let Some(u) = exit_update(n.record.state, &inst.node_id, &detail) {
                            ups.push(u);
                        }
                    }
                }
            }
            if let Some(n) = st.nodes.get(&inst.node_id) {
                if n.record.state == NodeState::Terminating
                    && n.record.iaas_id.as_deref() == Some(inst.iaas_id.as_str())
                {
                    to_terminate.push(InstanceRef {
                        node_id: inst.node_id.clone(),
                        iaas_id: inst.iaas_id.clone(),
                        incarnation: inst.incarnation.clone(),
                    });
                }
            }
        }
        self.commit_logged(&mut st, ups).await;
        drop(st);
        if !to_terminate.is_empty() {
            self.terminate_instances(driver, to_terminate).await;
        }
    }

    async fn fail_launch(&self, launch: &StoredLaunch, pending: &[String], e: &IaasError) {
        let driver = launch.deployable.driver();
        self.m.launches.with_label_values(&[driver, "failed"]).inc();
        tracing::warn!(
            event = "launch_failed",
            launch_id = %launch.launch_id,
            domain = %launch.domain,
            driver,
            class = e.kind.label(),
            reason = %reason_str(Some(e.kind.fail_reason())),
            error = %e,
            "launch failed"
        );
        let mut st = self.state.lock().await;
        let ups = pending
            .iter()
            .map(|id| failure_update(&st, id, e))
            .collect();
        self.commit_logged(&mut st, ups).await;
    }

    // ---- events

    async fn on_event(&self, driver: &str, ev: DriverEvent) {
        match ev {
            DriverEvent::Exited {
                node_id,
                iaas_id,
                incarnation,
                detail,
            } => {
                let mut st = self.state.lock().await;
                let Some(n) = st.nodes.get(&node_id) else {
                    tracing::debug!(driver, node_id = %node_id, "exit of an unknown node ignored");
                    return;
                };
                match &n.record.iaas_id {
                    None => {
                        if awaits_launch(&n.record) || n.record.state == NodeState::Terminating {
                            st.early_exits.insert(node_id, (iaas_id, detail));
                        }
                        return;
                    }
                    Some(id) if *id != iaas_id => return,
                    Some(_) => {}
                }
                if let (Some(a), Some(b)) = (&n.incarnation, &incarnation) {
                    if a != b {
                        return;
                    }
                }
                if let Some(u) = exit_update(n.record.state, &node_id, &detail) {
                    self.commit_logged(&mut st, vec![u]).await;
                }
            }
        }
    }

    // ---- terminate

    /// Sends terminations (with retries) and records the instances that are gone.
    async fn terminate_instances(&self, driver_name: &str, refs: Vec<InstanceRef>) {
        let Some(driver) = self.drivers.get(driver_name).cloned() else {
            tracing::warn!(driver = driver_name, "cannot terminate: driver not enabled");
            return;
        };
        {
            let mut st = self.state.lock().await;
            let now = tokio::time::Instant::now();
            for r in &refs {
                st.last_terminate.insert(r.node_id.clone(), now);
            }
        }
        for chunk in refs.chunks(1000) {
            self.m
                .terminations
                .with_label_values(&[driver_name])
                .inc_by(chunk.len() as u64);
            tracing::info!(
                event = events::NODE_TERMINATE_REQUESTED,
                driver = driver_name,
                count = chunk.len(),
                node_ids = ?chunk.iter().take(20).map(|r| r.node_id.as_str()).collect::<Vec<_>>(),
                "asking the IaaS to terminate"
            );
            let res = self.terminate_with_retry(driver.as_ref(), chunk).await;
            match res {
                Ok(outcomes) => {
                    let mut st = self.state.lock().await;
                    let mut ups = Vec::new();
                    for (r, o) in chunk.iter().zip(outcomes) {
                        if o == TerminateOutcome::Gone {
                            if let Some(n) = st.nodes.get(&r.node_id) {
                                if n.record.state == NodeState::Terminating {
                                    ups.push(Update::state(&r.node_id, NodeState::Terminated));
                                }
                            }
                        }
                    }
                    self.commit_logged(&mut st, ups).await;
                }
                Err(e) => {
                    tracing::warn!(driver = driver_name, error = %e, "terminate failed; the poll sends it again");
                }
            }
        }
    }

    async fn terminate_zombies(&self, driver_name: &str, zombies: Vec<InstanceRef>) {
        let Some(driver) = self.drivers.get(driver_name).cloned() else {
            return;
        };
        {
            let mut st = self.state.lock().await;
            let now = tokio::time::Instant::now();
            for z in &zombies {
                st.last_terminate
                    .insert(format!("zombie:{}", z.iaas_id), now);
            }
        }
        for z in &zombies {
            tracing::warn!(
                event = events::ZOMBIE_TERMINATED,
                driver = driver_name,
                iaas_id = %z.iaas_id,
                node_id = %z.node_id,
                run = %self.run,
                "an instance of this run that no record claims: terminating it"
            );
        }
        self.m
            .zombies
            .with_label_values(&[driver_name])
            .inc_by(zombies.len() as u64);
        self.m
            .terminations
            .with_label_values(&[driver_name])
            .inc_by(zombies.len() as u64);
        for chunk in zombies.chunks(1000) {
            let res = self.terminate_with_retry(driver.as_ref(), chunk).await;
            if let Err(e) = res {
                tracing::warn!(driver = driver_name, error = %e, "zombie terminate failed; the poll tries again");
            }
        }
    }

    async fn terminate_nodes(
        &self,
        req: TerminateNodesRequest,
    ) -> Result<TerminateNodesReply, ReplyError> {
        let mut st = self.state.lock().await;
        let mut terminating = Vec::new();
        let mut unknown = Vec::new();
        let mut ups = Vec::new();
        for id in req.node_ids {
            match st.nodes.get(&id) {
                None => unknown.push(id),
                Some(n) => {
                    if n.record.state.is_terminable() {
                        ups.push(Update::state(&id, NodeState::Terminating));
                    }
                    terminating.push(id);
                }
            }
        }
        self.commit(&mut st, ups, Vec::new())
            .await
            .map_err(|e| ReplyError::internal(format!("cannot store the terminations: {e}")))?;
        let by_driver = self.after_terminating(&mut st, &terminating).await;
        drop(st);
        tracing::info!(
            count = terminating.len(),
            unknown = unknown.len(),
            "terminate_nodes"
        );
        if let Some(me) = self.me() {
            self.spawn(async move {
                for (driver, refs) in by_driver {
                    me.terminate_instances(&driver, refs).await;
                }
            });
        }
        Ok(TerminateNodesReply {
            terminating,
            unknown,
        })
    }

    /// For nodes now TERMINATING: the instances to terminate by driver (skipping those
    /// sent recently), and TERMINATED for nodes that never got an instance and never will.
    async fn after_terminating(
        &self,
        st: &mut State,
        ids: &[String],
    ) -> BTreeMap<String, Vec<InstanceRef>> {
        let mut by_driver: BTreeMap<String, Vec<InstanceRef>> = BTreeMap::new();
        let mut ups = Vec::new();
        let now = tokio::time::Instant::now();
        for id in ids {
            let Some(n) = st.nodes.get(id) else { continue };
            if n.record.state != NodeState::Terminating {
                continue;
            }
            match &n.record.iaas_id {
                Some(iaas) => {
                    let recent = st
                        .last_terminate
                        .get(id)
                        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1));
                    if !recent {
                        by_driver
                            .entry(n.record.driver.clone())
                            .or_default()
                            .push(InstanceRef {
                                node_id: id.clone(),
                                iaas_id: iaas.clone(),
                                incarnation: n.incarnation.clone(),
                            });
                    }
                }
                None => {
                    if !st.in_flight.contains(&n.record.launch_id) {
                        ups.push(
                            Update::state(id, NodeState::Terminated)
                                .with_detail("terminated before an instance was launched"),
                        );
                    }
                }
            }
        }
        self.commit_logged(st, ups).await;
        by_driver
    }

    async fn terminate_all(&self) -> Result<TerminateAllReply, ReplyError> {
        let mut st = self.state.lock().await;
        let was_enabled = st.enabled;
        let mut ups = Vec::new();
        let mut ids = Vec::new();
        for n in st.nodes.values() {
            let s = n.record.state;
            if s.is_terminable() {
                ups.push(Update::state(&n.record.node_id, NodeState::Terminating));
            }
            if s.is_terminable() || s == NodeState::Terminating {
                ids.push(n.record.node_id.clone());
            }
        }
        let flag = serde_json::to_vec(&false).unwrap_or_else(|_| b"false".to_vec());
        self.commit(&mut st, ups, vec![(META_ENABLED.to_string(), flag)])
            .await
            .map_err(|e| ReplyError::internal(format!("cannot store terminate_all: {e}")))?;
        st.enabled = false;
        self.m.enabled.set(0);
        let by_driver = self.after_terminating(&mut st, &ids).await;
        let remaining = st.remaining();
        st.terminate_all_pending = remaining > 0;
        drop(st);
        tracing::warn!(
            event = events::TERMINATE_ALL_STARTED,
            run = %self.run,
            was_enabled,
            remaining,
            "terminate_all: provisioning disabled, terminating everything of the run"
        );
        if let Some(me) = self.me() {
            self.spawn(async move {
                for (driver, refs) in by_driver {
                    me.terminate_instances(&driver, refs).await;
                }
                // Sweep the IaaS for anything of the run the records do not name.
                me.reconcile_once().await;
            });
        }
        Ok(TerminateAllReply {
            disabled: true,
            remaining,
        })
    }

    async fn enable(&self) -> Result<Value, ReplyError> {
        let mut st = self.state.lock().await;
        let flag = serde_json::to_vec(&true).unwrap_or_else(|_| b"true".to_vec());
        self.commit(&mut st, Vec::new(), vec![(META_ENABLED.to_string(), flag)])
            .await
            .map_err(|e| ReplyError::internal(format!("cannot store enable: {e}")))?;
        st.enabled = true;
        st.terminate_all_pending = false;
        self.m.enabled.set(1);
        tracing::info!(event = events::PROVISIONER_ENABLED, run = %self.run, "provisioning enabled");
        Ok(json!({"enabled": true}))
    }

    // ---- describe

    async fn describe_nodes(&self, req: &DescribeNodesRequest) -> DescribeNodesReply {
        let st = self.state.lock().await;
        let wanted: HashSet<&str> = req.node_ids.iter().map(String::as_str).collect();
        let mut nodes: Vec<NodeRecord> = st
            .nodes
            .values()
            .map(|n| &n.record)
            .filter(|r| req.domain.as_deref().is_none_or(|d| d == r.domain))
            .filter(|r| wanted.is_empty() || wanted.contains(r.node_id.as_str()))
            .filter(|r| !req.live_only || !r.state.is_terminal())
            .cloned()
            .collect();
        nodes.sort_by(|a, b| (a.launched_at(), &a.node_id).cmp(&(b.launched_at(), &b.node_id)));
        DescribeNodesReply {
            enabled: st.enabled,
            nodes,
        }
    }

    /// Every instance each driver lists for this run: the IaaS's word, not the store's.
    async fn describe_iaas(&self) -> DescribeIaasReply {
        let mut instances = Vec::new();
        let mut errors = Vec::new();
        for (name, driver) in self.drivers.iter() {
            match driver.list(&self.run).await {
                Ok(listed) => {
                    for l in listed {
                        instances.push(IaasInstance {
                            driver: name.clone(),
                            iaas_id: l.iaas_id.clone(),
                            node_id: l.node_id.clone(),
                            state: l.state.as_str().to_string(),
                            alive: l.is_alive(),
                        });
                    }
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        DescribeIaasReply { instances, errors }
    }

    async fn dump_state(&self) -> Value {
        #[derive(Serialize)]
        struct LaunchSummary<'a> {
            launch_id: &'a str,
            domain: &'a str,
            driver: &'a str,
            node_ids: &'a [String],
            requested_at: DateTime<Utc>,
            in_flight: bool,
        }
        let st = self.state.lock().await;
        let mut nodes: Vec<&NodeRecord> = st.nodes.values().map(|n| &n.record).collect();
        nodes.sort_by(|a, b| (a.launched_at(), &a.node_id).cmp(&(b.launched_at(), &b.node_id)));
        let mut launches: Vec<LaunchSummary<'_>> = st
            .launches
            .values()
            .map(|l| LaunchSummary {
                launch_id: &l.launch_id,
                domain: &l.domain,
                driver: l.deployable.driver(),
                node_ids: &l.node_ids,
                requested_at: l.requested_at,
                in_flight: st.in_flight.contains(&l.launch_id),
            })
            .collect();
        launches.sort_by(|a, b| (a.requested_at, a.launch_id).cmp(&(b.requested_at, b.launch_id)));
        json!({
            "run": self.run.as_str(),
            "enabled": st.enabled,
            "drivers": self.drivers.names(),
            "counts": counts_json(&st.counts),
            "launches": launches,
            "nodes": nodes,
        })
    }

    async fn status(&self) -> Value {
        let st = self.state.lock().await;
        json!({
            "service": "provisioner",
            "run": self.run.as_str(),
            "ready": self.health.is_ready(),
            "enabled": st.enabled,
            "drivers": self.drivers.names(),
            "nodes": counts_json(&st.counts),
        })
    }

    // ---- the loops

    async fn send_loop(&self, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(m) => self.publish(m).await,
                    None => return,
                },
                _ = stopping.changed() => {
                    // Drain what is queued, then stop.
                    let drain = async {
                        while let Ok(m) = rx.try_recv() {
                            self.publish(m).await;
                        }
                    };
                    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
                        tracing::warn!("gave up sending queued instance_info at shutdown");
                    }
                    return;
                }
            }
        }
    }

    async fn publish(&self, m: Outgoing) {
        let env = match Envelope::with_body(&self.run, Op::InstanceInfo, SENDER, &m.record) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode instance_info");
                return;
            }
        };
        if let Err(e) = self.bus.send(m.to, &env).await {
            tracing::warn!(
                node_id = %m.record.node_id,
                state = %m.record.state,
                to = %m.to,
                error = %e,
                "cannot send instance_info; the subscriber can catch up with describe_nodes"
            );
        }
    }

    async fn poll_loop(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            self.reconcile_once().await;
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = stopping.changed() => return,
            }
        }
    }

    async fn reconcile_once(&self) {
        for (name, driver) in self.drivers.iter() {
            let listed = match self.timed(name, "list", driver.list(&self.run)).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(driver = %name, error = %e, "cannot list the IaaS; reconciling next time");
                    continue;
                }
            };
            let (terminate, zombies) = {
                let mut st = self.state.lock().await;
                let plan = self.plan(&mut st, name, &listed);
                self.commit_logged(&mut st, plan.updates).await;
                (plan.terminate, plan.zombies)
            };
            if !terminate.is_empty() {
                self.terminate_instances(name, terminate).await;
            }
            if !zombies.is_empty() {
                self.terminate_zombies(name, zombies).await;
            }
        }
    }

    /// Compares one driver's listing with the records (see the module docs).
    fn plan(&self, st: &mut State, driver: &str, listed: &[ListedInstance]) -> Plan {
        let now = self.clock.now();
        let tnow = tokio::time::Instant::now();
        let by_id: HashMap<&str, &ListedInstance> =
            listed.iter().map(|i| (i.iaas_id.as_str(), i)).collect();
        let (protected_launches, awaiting_nodes) = st.protected();
        let mut plan = Plan::default();
        let mut known: HashSet<&str> = HashSet::new();
        let mut seen: Vec<String> = Vec::new();
        let mut missing: Vec<String> = Vec::new();
        let due = |st_last: &HashMap<String, tokio::time::Instant>, key: &str| {
            st_last
                .get(key)
                .is_none_or(|t| tnow.duration_since(*t) >= self.resend_after)
        };
        for n in st.nodes.values() {
            let rec = &n.record;
            if rec.driver != driver {
                continue;
            }
            let Some(id) = rec.iaas_id.as_deref() else {
                continue;
            };
            known.insert(id);
            let inst = by_id
                .get(id)
                .copied()
                .filter(|i| match (&i.incarnation, &n.incarnation) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                });
            let node_id = rec.node_id.as_str();
            let r = || InstanceRef {
                node_id: node_id.to_string(),
                iaas_id: id.to_string(),
                incarnation: n.incarnation.clone(),
            };
            match inst {
                Some(i) if i.is_alive() => {
                    seen.push(node_id.to_string());
                    if rec.state.is_terminal() || rec.state == NodeState::Terminating {
                        if due(&st.last_terminate, node_id) {
                            if rec.state.is_terminal() {
                                tracing::warn!(node_id, iaas_id = id, state = %rec.state, "the instance of a finished node is still alive; terminating it");
                            }
                            plan.terminate.push(r());
                        }
                        continue;
                    }
                    let target = match i.state {
                        InstanceState::Pending => NodeState::Pending,
                        InstanceState::Running => NodeState::Running,
                        InstanceState::Stopping => NodeState::RunningFailed,
                        InstanceState::Terminated => continue,
                    };
                    let mut u = Update::state(node_id, target);
                    if target == NodeState::RunningFailed {
                        u.detail = Some(
                            "the IaaS reports the instance stopping or stopped without being asked"
                                .into(),
                        );
                    }
                    u.addresses = Some(i.addresses.clone());
                    if target > rec.state
                        || (!i.addresses.is_empty() && i.addresses != rec.addresses)
                    {
                        plan.updates.push(u);
                    }
                }
                Some(i) => {
                    seen.push(node_id.to_string());
                    if rec.state == NodeState::Terminating {
                        plan.updates
                            .push(Update::state(node_id, NodeState::Terminated));
                    } else if !rec.state.is_terminal() {
                        plan.updates.push(match &i.failure {
                            Some(f) => Update::failed(node_id, f.reason, f.detail.clone()),
                            None => Update::failed(
                                node_id,
                                FailReason::NodeDisappeared,
                                "the IaaS reports the instance terminated; the provisioner did not ask",
                            ),
                        });
                    }
                }
                None => {
                    if rec.state.is_terminal() {
                        seen.push(node_id.to_string());
                    } else if rec.state == NodeState::Terminating {
                        seen.push(node_id.to_string());
                        plan.updates.push(
                            Update::state(node_id, NodeState::Terminated)
                                .with_detail("no longer listed by the IaaS"),
                        );
                    } else {
                        missing.push(node_id.to_string());
                    }
                }
            }
        }
        for id in seen {
            st.missing_since.remove(&id);
        }
        for id in missing {
            let since = *st.missing_since.entry(id.clone()).or_insert(now);
            if now - since >= self.grace {
                plan.updates.push(Update::failed(
                    &id,
                    FailReason::NodeDisappeared,
                    format!(
                        "not listed by the IaaS for {} s (disappear_grace_secs)",
                        (now - since).num_seconds()
                    ),
                ));
                st.missing_since.remove(&id);
            }
        }
        for i in listed {
            if !i.is_alive() || known.contains(i.iaas_id.as_str()) {
                continue;
            }
            let claimed = i
                .launch_id
                .as_ref()
                .is_some_and(|l| protected_launches.contains(l))
                || i.node_id
                    .as_ref()
                    .is_some_and(|n| awaiting_nodes.contains(n));
            if claimed {
                continue;
            }
            if !due(&st.last_terminate, &format!("zombie:{}", i.iaas_id)) {
                continue;
            }
            plan.zombies.push(InstanceRef {
                node_id: i.node_id.clone().unwrap_or_default(),
                iaas_id: i.iaas_id.clone(),
                incarnation: i.incarnation.clone(),
            });
        }
        plan
    }
}

#[derive(Default)]
struct Plan {
    updates: Vec<Update>,
    terminate: Vec<InstanceRef>,
    zombies: Vec<InstanceRef>,
}

fn failure_update(st: &State, node_id: &str, e: &IaasError) -> Update {
    let terminating = st
        .nodes
        .get(node_id)
        .is_some_and(|n| n.record.state == NodeState::Terminating);
    if terminating || e.kind == IaasErrorKind::Cancelled {
        Update::state(node_id, NodeState::Terminated)
            .with_detail(format!("terminated before it launched ({})", e.detail()))
    } else {
        Update::failed(node_id, e.kind.fail_reason(), e.detail())
    }
}

fn exit_update(state: NodeState, node_id: &str, detail: &str) -> Option<Update> {
    if state == NodeState::Terminating {
        Some(Update::state(node_id, NodeState::Terminated).with_detail(detail))
    } else if state.is_terminal() {
        None
    } else {
        Some(Update::failed(node_id, FailReason::ProcessExited, detail))
    }
}

fn log_state(rec: &NodeRecord) {
    tracing::info!(
        event = events::NODE_STATE,
        node_id = %rec.node_id,
        domain = %rec.domain,
        launch_id = %rec.launch_id,
        driver = %rec.driver,
        iaas_id = rec.iaas_id.as_deref().unwrap_or(""),
        state = %rec.state,
        reason = %reason_str(rec.reason),
        reason_detail = rec.reason_detail.as_deref().unwrap_or(""),
        "node state"
    );
}

fn counts_json(counts: &[i64; 11]) -> Value {
    let mut m = serde_json::Map::new();
    for (i, st) in NodeState::ALL.iter().enumerate() {
        if counts[i] != 0 {
            m.insert(st.as_str().to_string(), json!(counts[i]));
        }
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------------------
// the bus handler

struct ProvisionerHandler {
    inner: Arc<Inner>,
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, ReplyError> {
    serde_json::to_value(v)
        .map_err(|e| ReplyError::internal(format!("cannot encode the reply: {e}")))
}

#[async_trait]
impl Handler for ProvisionerHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let inner = &self.inner;
        let env = &msg.envelope;
        match env.op {
            Op::Provision => {
                let req: ProvisionRequest = env.parse_body()?;
                to_value(&inner.provision(req).await?)
            }
            Op::TerminateNodes => {
                let req: TerminateNodesRequest = env.parse_body()?;
                to_value(&inner.terminate_nodes(req).await?)
            }
            Op::TerminateAll => {
                let _: TerminateAllRequest = env.parse_body()?;
                to_value(&inner.terminate_all().await?)
            }
            Op::Enable => {
                let _: EnableRequest = env.parse_body()?;
                inner.enable().await
            }
            Op::DescribeNodes => {
                let req: DescribeNodesRequest = env.parse_body()?;
                to_value(&inner.describe_nodes(&req).await)
            }
            Op::DumpState => Ok(inner.dump_state().await),
            Op::DescribeIaas => to_value(&inner.describe_iaas().await),
            Op::Status => Ok(inner.status().await),
            other => Err(ReplyError::new(
                ErrorCode::UnknownOp,
                format!("the provisioner does not serve {other}"),
            )),
        }
    }
}
