//! The sensor aggregator: gathers worker heartbeats and work-queue depths, judges
//! each worker's health, and forwards readings (`sensor_info`) to the controller.
//!
//! # What it does
//!
//! * **Heartbeats** (`heartbeat` on the `sensor-aggregator` queue, from `epu-agent`):
//!   the latest one per node is kept with the time it was heard on the aggregator's
//!   [`Clock`](epu_core::clock::Clock). Handling one is a map update under a mutex;
//!   nothing is written to disk per heartbeat.
//! * **Last-heard times survive a restart.** Changed records are written to the
//!   [`Store`] in one `put_batch` every `persist_interval_ms` (default 1 s) and read
//!   back at start. After a crash a node's last-heard time can be up to that much
//!   older than it really was, so a silent node is declared MISSING up to that much
//!   *sooner* — never later, and a node heard before the crash is never kept healthy
//!   forever.
//! * **Node knowledge** comes from the provisioner: `describe_nodes` with
//!   `live_only` every `nodes_poll_secs` (default 2 s), plus a by-id query for nodes
//!   that left the live list (to learn when they were terminated) and for nodes
//!   that heartbeat but are not listed. A node the provisioner does not know is not
//!   reported (its jobs still count toward its domain's backlog while it is healthy).
//! * **Health** per node: see [`health`] — one pure function, table-tested.
//! * **Queue depth** per domain that names a `queue`: a passive declare every
//!   `poll_secs` on the broker the domain names ([`queue`]; the one place outside
//!   `epu_core::bus::amqp` that knows lapin). **Backlog = ready messages + the jobs the
//!   domain's healthy workers report holding** (a passive declare does not count
//!   unacked work; the RabbitMQ management API is not used).
//! * **Readings**: a domain's [`SensorInfo`] (backlog, and the health of every node
//!   the provisioner reports for it that is not gone, zombies included) goes to the
//!   controller within ~100 ms of a change (a node's health, jobs or exit code, its
//!   node list, or the queue's depth) and at least every
//!   `sensor_info_interval_secs` (default 3 s) while unchanged. A missing or
//!   unreachable queue is reported as no backlog (`backlog: null`), logged once,
//!   shown by `describe_sensors` and the `epu_sensor_queue_up` gauge.
//!
//! # In-process (the standalone host)
//!
//! ```no_run
//! # async fn f(bus: epu_core::bus::local::LocalBus, store: std::sync::Arc<epu_core::store::SledStore>) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use epu_core::bus::BusOptions;
//! use sensor_aggregator::{Aggregator, AggregatorConfig, DomainSensors};
//! let run = epu_core::wire::RunName::new("demo")?;
//! let mut config = AggregatorConfig::new(run);
//! config.domains.push(DomainSensors::new("workers"));
//! let metrics = epu_core::telemetry::Metrics::new();
//! let aggregator = Aggregator::new(
//!     config,
//!     Arc::new(bus.view(BusOptions::new("sensor-aggregator"))),
//!     store,
//!     epu_core::clock::SystemClock::shared(),
//!     &metrics,
//! )?;
//! let running = aggregator.start().await?;      // serving; returns at once
//! aggregator.set_domain(DomainSensors::new("more"))?; // add a domain at runtime
//! running.stop().await;                          // final flush of last-heard times
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod health;
pub mod metrics;
pub mod queue;
pub mod tracker;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use epu_core::bus::{Bus, BusError, Handler, Incoming, Server};
use epu_core::clock::SharedClock;
use epu_core::config::redact_url;
use epu_core::store::{Store, StoreError};
use epu_core::telemetry::Metrics;
use epu_core::wire::{Envelope, ErrorCode, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    DescribeNodesReply, DescribeNodesRequest, Heartbeat, QueueBacklog, SensorInfo,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use crate::config::{AggregatorConfig, ConfigError, DomainSensors};
pub use crate::health::{judge, HealthPolicy};
use crate::metrics::AggregatorMetrics;
use crate::queue::{Brokers, QueueProbe, QueueStatus};
use crate::tracker::{HeardRecord, Tracker, LAST_HEARD_TREE};

/// The `sender` of the aggregator's envelopes.
pub const SENDER: &str = "sensor-aggregator";
/// How often health is re-judged when nothing else wakes the reporter (time alone
/// turns nodes MISSING).
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// At most one reporting pass per this, however many changes arrive.
const MIN_PASS_GAP: Duration = Duration::from_millis(20);
/// How long one `sensor_info` send may take before the reporter moves on.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Node ids per by-id `describe_nodes` query.
const RESOLVE_CHUNK: usize = 500;

/// Errors starting or configuring the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("this aggregator was already started; build a new one")]
    AlreadyStarted,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps half-updated in
    // a way that matters more than stopping the service would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The latest measurement of a domain's queue.
#[derive(Clone, Debug)]
struct QueueEntry {
    queue: String,
    status: QueueStatus,
    at: DateTime<Utc>,
    changed: bool,
}

struct Probe {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The sensor aggregator. Build with [`Aggregator::new`], then [`Aggregator::start`]
/// (or [`Aggregator::run`] until a shutdown future completes).
pub struct Aggregator {
    run: RunName,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    clock: SharedClock,
    metrics: AggregatorMetrics,
    default_broker: String,
    request_timeout: Duration,
    nodes_poll: Duration,
    info_interval: Duration,
    persist_interval: Duration,
    domains: Mutex<BTreeMap<String, DomainSensors>>,
    tracker: Mutex<Tracker>,
    queues: Mutex<HashMap<String, QueueEntry>>,
    probes: Mutex<HashMap<String, Probe>>,
    brokers: Brokers,
    notify: Notify,
    stop: watch::Sender<bool>,
    started: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

/// A started aggregator; stop it with [`RunningAggregator::stop`].
pub struct RunningAggregator {
    aggregator: Arc<Aggregator>,
    server: Server,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAggregator {
    pub fn aggregator(&self) -> &Arc<Aggregator> {
        &self.aggregator
    }

    /// Stops consuming, stops every task, and writes the last-heard times one last time.
    pub async fn stop(self) {
        self.server.stop().await;
        let _ = self.aggregator.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.aggregator.stop_probes().await;
        self.aggregator.brokers.close().await;
    }

    /// Stops at once *without* the final write of last-heard times, as a crash would
    /// (for tests of restarts).
    pub async fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.server.stop().await;
        let _ = self.aggregator.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.aggregator.stop_probes().await;
        self.aggregator.brokers.close().await;
    }
}

/// `describe_sensors` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescribeSensorsRequest {
    /// One domain, with its node list.
    #[serde(default)]
    domain: Option<String>,
}

impl Aggregator {
    /// Builds an aggregator over `bus` (AMQP, or a `LocalBus` view in the standalone
    /// host) and `store`, registering its metrics in `metrics`. Nothing runs yet.
    pub fn new(
        config: AggregatorConfig,
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        clock: SharedClock,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, AggregatorError> {
        config.validate()?;
        let metrics = AggregatorMetrics::register(metrics.registry())?;
        let mut tracker = Tracker::new(DomainSensors::new("").health_policy());
        let mut domains = BTreeMap::new();
        for d in &config.domains {
            tracker.set_policy(&d.name, d.health_policy());
            domains.insert(d.name.clone(), d.clone());
        }
        let (stop, _) = watch::channel(false);
        Ok(Arc::new(Aggregator {
            run: config.run.clone(),
            bus,
            store,
            clock,
            metrics,
            default_broker: config.bus.amqp_url.clone(),
            request_timeout: config.bus.request_timeout(),
            nodes_poll: config.nodes_poll(),
            info_interval: config.sensor_info_interval(),
            persist_interval: config.persist_interval(),
            domains: Mutex::new(domains),
            tracker: Mutex::new(tracker),
            queues: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            brokers: Brokers::new(),
            notify: Notify::new(),
            stop,
            started: Mutex::new(None),
        }))
    }

    pub fn run_name(&self) -> &RunName {
        &self.run
    }

    /// Reads the persisted last-heard times, starts polling the provisioner and the
    /// queues, reporting and persisting, and serves the `sensor-aggregator` queue.
    /// Returns once serving.
    pub async fn start(self: &Arc<Self>) -> Result<RunningAggregator, AggregatorError> {
        {
            let mut started = lock(&self.started);
            if started.is_some() {
                return Err(AggregatorError::AlreadyStarted);
            }
            *started = Some(Instant::now());
        }
        self.restore().await?;
        let tasks = vec![
            tokio::spawn(self.clone().nodes_loop(self.stop.subscribe())),
            tokio::spawn(self.clone().report_loop(self.stop.subscribe())),
            tokio::spawn(self.clone().persist_loop(self.stop.subscribe())),
        ];
        let domains: Vec<DomainSensors> = lock(&self.domains).values().cloned().collect();
        for d in domains {
            self.start_probe(&d);
        }
        let server = self
            .bus
            .serve(
                Service::SensorAggregator,
                Arc::new(AggregatorHandler(self.clone())),
            )
            .await?;
        tracing::info!(event = "service_started", service = "sensor-aggregator", run = %self.run, "sensor aggregator serving");
        Ok(RunningAggregator {
            aggregator: self.clone(),
            server,
            tasks,
        })
    }

    /// Starts, runs until `shutdown` completes, then stops.
    pub async fn run<S>(self: Arc<Self>, shutdown: S) -> Result<(), AggregatorError>
    where
        S: Future<Output = ()> + Send,
    {
        let running = self.start().await?;
        shutdown.await;
        running.stop().await;
        Ok(())
    }

    /// Adds a domain's sensor settings, or replaces them (its queue probe restarts
    /// when the aggregator is running). Takes effect at the next judgement.
    pub fn set_domain(self: &Arc<Self>, domain: DomainSensors) -> Result<(), AggregatorError> {
        domain.validate()?;
        lock(&self.tracker).set_policy(&domain.name, domain.health_policy());
        lock(&self.domains).insert(domain.name.clone(), domain.clone());
        self.stop_probe(&domain.name);
        if domain.queue.is_none() {
            lock(&self.queues).remove(&domain.name);
        }
        if lock(&self.started).is_some() && !*self.stop.borrow() {
            self.start_probe(&domain);
        }
        tracing::info!(event = "sensor_domain_set", domain = %domain.name, settings = ?domain, "domain sensor settings set");
        self.notify.notify_one();
        Ok(())
    }

    /// Stops watching a domain's queue and forgets its settings (its nodes are then
    /// judged with the defaults while the provisioner reports them).
    pub fn remove_domain(&self, name: &str) -> bool {
        let removed = lock(&self.domains).remove(name).is_some();
        lock(&self.tracker).remove_policy(name);
        self.stop_probe(name);
        lock(&self.queues).remove(name);
        self.notify.notify_one();
        removed
    }

    /// The configured domains.
    pub fn domains(&self) -> Vec<DomainSensors> {
        lock(&self.domains).values().cloned().collect()
    }

    /// Records one heartbeat now (what the `heartbeat` handler does).
    pub fn record_heartbeat(&self, hb: Heartbeat) {
        self.metrics.heartbeats.inc();
        let now = self.clock.now();
        let changed = lock(&self.tracker).heartbeat(hb, now);
        if changed {
            self.notify.notify_one();
        }
    }

    /// Nodes tracked in memory.
    pub fn tracked_nodes(&self) -> usize {
        lock(&self.tracker).len()
    }

    /// The reading the controller would get for `domain` now (judged now).
    pub fn reading(&self, domain: &str) -> SensorInfo {
        let now = self.clock.now();
        let mut tracker = lock(&self.tracker);
        tracker.sweep(now);
        let queues = lock(&self.queues);
        build_reading(domain, &tracker, queues.get(domain), now)
    }

    // ------------------------------------------------------------------ tasks

    async fn restore(&self) -> Result<(), AggregatorError> {
        let store = self.store.clone();
        let raw = tokio::task::spawn_blocking(move || store.scan(LAST_HEARD_TREE))
            .await
            .map_err(|e| StoreError::Backend {
                op: "scan",
                tree: LAST_HEARD_TREE.to_string(),
                source: Box::new(std::io::Error::other(e.to_string())),
            })??;
        let mut records = Vec::with_capacity(raw.len());
        for (key, bytes) in raw {
            match serde_json::from_slice::<HeardRecord>(&bytes) {
                Ok(r) => records.push((key, r)),
                Err(e) => {
                    tracing::warn!(node_id = %key, error = %e, "skipping an unreadable last-heard record")
                }
            }
        }
        let n = records.len();
        lock(&self.tracker).restore(records);
        tracing::info!(
            event = "last_heard_restored",
            nodes = n,
            "restored last-heard times"
        );
        Ok(())
    }

    async fn describe_nodes(
        &self,
        req: &DescribeNodesRequest,
    ) -> Result<DescribeNodesReply, ReplyError> {
        let env = Envelope::with_body(&self.run, Op::DescribeNodes, SENDER, req)
            .map_err(|e| ReplyError::internal(e.to_string()))?;
        let v = self
            .bus
            .request(Service::Provisioner, &env, self.request_timeout)
            .await?;
        serde_json::from_value(v)
            .map_err(|e| ReplyError::internal(format!("unreadable describe_nodes reply: {e}")))
    }

    async fn poll_nodes(&self, failing: &mut bool) {
        let live = DescribeNodesRequest {
            domain: None,
            node_ids: Vec::new(),
            live_only: true,
        };
        let reply = match self.describe_nodes(&live).await {
            Ok(r) => r,
            Err(e) => {
                if *failing {
                    tracing::debug!(error = %e, "describe_nodes failed again");
                } else {
                    tracing::warn!(event = "provisioner_unavailable", error = %e, "cannot learn node states from the provisioner; retrying every poll");
                }
                *failing = true;
                return;
            }
        };
        if *failing {
            tracing::info!(
                event = "provisioner_available",
                "the provisioner answers again"
            );
        }
        *failing = false;
        let now = self.clock.now();
        let to_resolve = {
            let mut tracker = lock(&self.tracker);
            tracker.apply_records(&reply.nodes, true, now);
            tracker.to_resolve(now)
        };
        for chunk in to_resolve.chunks(RESOLVE_CHUNK) {
            let req = DescribeNodesRequest {
                domain: None,
                node_ids: chunk.to_vec(),
                live_only: false,
            };
            match self.describe_nodes(&req).await {
                Ok(r) => lock(&self.tracker).apply_resolved(&r.nodes, chunk, now),
                Err(e) => {
                    tracing::debug!(error = %e, "describe_nodes by id failed");
                    break;
                }
            }
        }
        self.notify.notify_one();
    }

    async fn nodes_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.poll_nodes(&mut failing) => {}
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.nodes_poll) => {}
            }
        }
    }

    async fn persist(&self) {
        let (items, forgotten) = lock(&self.tracker).take_dirty();
        if !items.is_empty() {
            let ids: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
            let store = self.store.clone();
            let n = items.len();
            let result =
                tokio::task::spawn_blocking(move || store.put_batch(LAST_HEARD_TREE, &items)).await;
            match result {
                Ok(Ok(())) => tracing::trace!(nodes = n, "last-heard times written"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, nodes = n, "cannot write last-heard times; retrying at the next write");
                    lock(&self.tracker).mark_dirty(ids);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the last-heard write task failed");
                    lock(&self.tracker).mark_dirty(ids);
                }
            }
        }
        if !forgotten.is_empty() {
            let store = self.store.clone();
            let result = tokio::task::spawn_blocking(move || {
                for id in &forgotten {
                    store.delete(LAST_HEARD_TREE, id)?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::warn!("cannot delete the last-heard records of forgotten nodes; they are skipped at the next start");
            }
        }
    }

    async fn persist_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = stop.changed() => true,
                _ = tokio::time::sleep(self.persist_interval) => false,
            };
            self.persist().await;
            if stopping {
                break;
            }
        }
    }

    async fn report_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last_sent: HashMap<String, Instant> = HashMap::new();
        let mut retry: HashSet<String> = HashSet::new();
        let mut last_pass: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            if let Some(gap) = last_pass.map(|t| t.elapsed()) {
                if gap < MIN_PASS_GAP {
                    tokio::time::sleep(MIN_PASS_GAP - gap).await;
                }
            }
            last_pass = Some(Instant::now());
            let readings = self.due_readings(&last_sent, &retry);
            for (info, forget) in readings {
                let name = info.domain.clone();
                match self.send_reading(&info).await {
                    Ok(()) => {
                        retry.remove(&name);
                        if forget {
                            last_sent.remove(&name);
                        } else {
                            last_sent.insert(name, Instant::now());
                        }
                    }
                    Err(e) => {
                        if retry.insert(name.clone()) {
                            tracing::warn!(domain = %name, error = %e, "cannot send sensor_info to the controller; retrying");
                        }
                    }
                }
            }
        }
    }

    /// Sweeps, then picks the readings to send: changed, or due by the interval.
    /// The bool says the domain is gone (send its empty reading once, then forget it).
    fn due_readings(
        &self,
        last_sent: &HashMap<String, Instant>,
        retry: &HashSet<String>,
    ) -> Vec<(SensorInfo, bool)> {
        let now = self.clock.now();
        let configured: BTreeSet<String> = lock(&self.domains).keys().cloned().collect();
        let mut tracker = lock(&self.tracker);
        tracker.sweep(now);
        let mut queues = lock(&self.queues);
        let mut names: BTreeSet<String> = configured.clone();
        let tracked: BTreeSet<String> = tracker.domains().into_iter().collect();
        names.extend(tracked.iter().cloned());
        names.extend(last_sent.keys().cloned());
        let mut out = Vec::new();
        for name in names {
            let node_change = tracker.take_changed(&name);
            let queue_change = queues
                .get_mut(&name)
                .is_some_and(|q| std::mem::take(&mut q.changed));
            let due = last_sent
                .get(&name)
                .is_none_or(|t| t.elapsed() >= self.info_interval);
            if !(node_change || queue_change || due || retry.contains(&name)) {
                continue;
            }
            let info = build_reading(&name, &tracker, queues.get(&name), now);
            let known = configured.contains(&name) || tracked.contains(&name);
            if !known {
                out.push((info, true));
                continue;
            }
            let silent = info.nodes.is_empty() && info.backlog.is_none();
            if silent && !configured.contains(&name) && !last_sent.contains_key(&name) {
                // Nothing to say about a domain nobody configured and nothing reported.
                continue;
            }
            self.metrics
                .backlog
                .with_label_values(&[name.as_str()])
                .set(info.backlog.as_ref().map_or(0, |b| gauge(b.total)));
            out.push((info, false));
        }
        self.metrics.tracked.set(gauge(tracker.len() as u64));
        self.metrics.nodes.reset();
        for ((domain, health), n) in tracker.counts() {
            self.metrics
                .nodes
                .with_label_values(&[domain.as_str(), health.as_str()])
                .set(gauge(n));
        }
        out
    }

    async fn send_reading(&self, info: &SensorInfo) -> Result<(), String> {
        let env = Envelope::with_body(&self.run, Op::SensorInfo, SENDER, info)
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(SEND_TIMEOUT, self.bus.send(Service::Controller, &env)).await {
            Ok(Ok(())) => {
                self.metrics.sensor_info_sent.inc();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {SEND_TIMEOUT:?}")),
        }
    }

    fn start_probe(self: &Arc<Self>, d: &DomainSensors) {
        let Some(queue) = d.queue.clone() else {
            return;
        };
        let url = d
            .broker_url
            .as_ref()
            .map(|s| s.expose().to_string())
            .unwrap_or_else(|| self.default_broker.clone());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(domain = %d.name, "cannot watch the queue outside the async runtime");
            return;
        };
        let (stop, rx) = watch::channel(false);
        let task =
            rt.spawn(
                self.clone()
                    .probe_loop(d.name.clone(), queue, url, d.poll_interval(), rx),
            );
        if let Some(old) = lock(&self.probes).insert(d.name.clone(), Probe { stop, task }) {
            let _ = old.stop.send(true);
        }
    }

    fn stop_probe(&self, domain: &str) {
        if let Some(p) = lock(&self.probes).remove(domain) {
            let _ = p.stop.send(true);
        }
    }

    async fn stop_probes(&self) {
        let probes: Vec<Probe> = lock(&self.probes).drain().map(|(_, p)| p).collect();
        for p in probes {
            let _ = p.stop.send(true);
            let _ = p.task.await;
        }
    }

    async fn probe_loop(
        self: Arc<Self>,
        domain: String,
        queue: String,
        url: String,
        period: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut global_stop = self.stop.subscribe();
        let mut probe = QueueProbe::new(&url, &queue);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(event = "queue_watch", domain = %domain, queue = %queue, broker = %redact_url(&url), "watching the domain's queue");
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = global_stop.changed() => break,
                _ = ticker.tick() => {}
            }
            let status = tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = global_stop.changed() => break,
                s = probe.measure(&self.brokers) => s,
            };
            self.record_queue(&domain, &queue, status);
        }
        probe.close().await;
    }

    fn record_queue(&self, domain: &str, queue: &str, status: QueueStatus) {
        let now = self.clock.now();
        let mut queues = lock(&self.queues);
        let previous = queues.get(domain).map(|q| q.status.clone());
        if previous.as_ref() != Some(&status) {
            let kind = |s: &QueueStatus| std::mem::discriminant(s);
            if previous.as_ref().map(kind) != Some(kind(&status)) {
                match &status {
                    QueueStatus::Ok { ready } => {
                        tracing::info!(event = "queue_measured", domain = %domain, queue = %queue, ready, "measuring the domain's queue")
                    }
                    QueueStatus::Missing => {
                        tracing::warn!(event = "queue_missing", domain = %domain, queue = %queue, "the domain's queue does not exist; reporting no backlog")
                    }
                    QueueStatus::Unreachable { error } => {
                        tracing::warn!(event = "queue_unreachable", domain = %domain, queue = %queue, error = %error, "cannot measure the domain's queue; reporting no backlog")
                    }
                }
            }
        }
        let changed = previous.as_ref() != Some(&status);
        match &status {
            QueueStatus::Ok { ready } => {
                self.metrics
                    .queue_ready
                    .with_label_values(&[domain])
                    .set(gauge(*ready));
                self.metrics.queue_up.with_label_values(&[domain]).set(1);
            }
            _ => self.metrics.queue_up.with_label_values(&[domain]).set(0),
        }
        let entry = queues.entry(domain.to_string()).or_insert(QueueEntry {
            queue: queue.to_string(),
            status: status.clone(),
            at: now,
            changed: true,
        });
        entry.queue = queue.to_string();
        entry.status = status;
        entry.at = now;
        entry.changed |= changed;
        drop(queues);
        if changed {
            self.notify.notify_one();
        }
    }

    // ------------------------------------------------------------------ operations

    fn describe_sensors(&self, req: DescribeSensorsRequest) -> Result<Value, ReplyError> {
        let now = self.clock.now();
        let domains = lock(&self.domains).clone();
        let mut tracker = lock(&self.tracker);
        tracker.sweep(now);
        let queues = lock(&self.queues);
        if let Some(name) = &req.domain {
            if !domains.contains_key(name) && !tracker.domains().contains(name) {
                return Err(ReplyError::not_found(format!(
                    "the aggregator knows no domain {name:?}"
                )));
            }
        }
        let mut names: BTreeSet<String> = domains.keys().cloned().collect();
        names.extend(tracker.domains());
        let counts = tracker.counts();
        let mut out = Vec::new();
        for name in names {
            if req.domain.as_ref().is_some_and(|d| d != &name) {
                continue;
            }
            let settings = domains.get(&name);
            let policy = tracker.policy(&name);
            let reading = build_reading(&name, &tracker, queues.get(&name), now);
            let mut by_health = serde_json::Map::new();
            for ((d, h), n) in &counts {
                if d == &name {
                    by_health.insert(h.as_str().to_string(), json!(n));
                }
            }
            let mut v = json!({
                "name": name,
                "configured": settings.is_some(),
                "queue": settings.and_then(|s| s.queue.clone()),
                "broker": settings.and_then(|s| s.queue.as_ref().map(|_| {
                    redact_url(s.broker_url.as_ref().map_or(self.default_broker.as_str(), |u| u.expose()))
                })),
                "queue_status": queues.get(&name).map(|q| json!(q.status)),
                "backlog": reading.backlog,
                "nodes": by_health,
                "boot_timeout_secs": policy.boot_timeout.as_seconds_f64(),
                "missing_timeout_secs": policy.missing_timeout.as_seconds_f64(),
                "zombie_secs": policy.zombie.as_seconds_f64(),
            });
            if req.domain.is_some() {
                v["node_list"] = json!(reading.nodes);
            }
            out.push(v);
        }
        Ok(json!({
            "run": self.run,
            "tracked_nodes": tracker.len(),
            "domains": out,
        }))
    }

    fn status(&self) -> Value {
        let started = *lock(&self.started);
        json!({
            "service": SENDER,
            "run": self.run,
            "tracked_nodes": self.tracked_nodes(),
            "domains": lock(&self.domains).keys().cloned().collect::<Vec<_>>(),
            "heartbeats_received": self.metrics.heartbeats.get(),
            "uptime_secs": started.map(|t| t.elapsed().as_secs_f64()),
        })
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn build_reading(
    domain: &str,
    tracker: &Tracker,
    queue: Option<&QueueEntry>,
    now: DateTime<Utc>,
) -> SensorInfo {
    let r = tracker.reading(domain);
    let backlog = match queue {
        Some(QueueEntry {
            queue,
            status: QueueStatus::Ok { ready },
            at,
            ..
        }) => Some(QueueBacklog {
            queue: queue.clone(),
            ready: *ready,
            busy: r.busy,
            total: ready.saturating_add(r.busy),
            at: *at,
        }),
        _ => None,
    };
    SensorInfo {
        domain: domain.to_string(),
        backlog,
        nodes: r.nodes,
        at: now,
    }
}

struct AggregatorHandler(Arc<Aggregator>);

#[async_trait]
impl Handler for AggregatorHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = msg.envelope;
        match env.op {
            Op::Heartbeat => {
                let hb: Heartbeat = env.parse_body().inspect_err(|e| {
                    self.0.metrics.heartbeats_invalid.inc();
                    tracing::warn!(event = "heartbeat_invalid", sender = %env.sender, error = %e, "ignoring a heartbeat whose body is not a heartbeat");
                })?;
                self.0.record_heartbeat(hb);
                Ok(json!({}))
            }
            Op::DescribeSensors => {
                let req: DescribeSensorsRequest = if env.body.is_null() {
                    DescribeSensorsRequest::default()
                } else {
                    env.parse_body()?
                };
                self.0.describe_sensors(req)
            }
            Op::Status => Ok(self.0.status()),
            other => Err(ReplyError::new(
                ErrorCode::UnknownOp,
                format!("the sensor aggregator does not serve {other}"),
            )),
        }
    }
}
