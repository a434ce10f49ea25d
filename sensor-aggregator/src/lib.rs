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
//! * **Node knowledge** comes from the provisioner's change feed: every
//!   `nodes_poll_secs` (default 2 s) `describe_nodes` asks for the records changed
//!   since the last revision applied, 1000 a page, following `more` (an unchanged
//!   fleet: one request, no records). A `full` answer (the first poll, a provisioner
//!   with a new store, or one that pruned past the aggregator's revision) is read to
//!   its end, and a tracked node it did not name is gone. A node that heartbeats but
//!   that the provisioner has not told about is asked about by id, once. A node the
//!   provisioner does not know is not reported (its jobs still count toward its
//!   domain's backlog while it is healthy). When the provisioner does not answer,
//!   the revision is kept and the next poll retries.
//! * **Health** per node: see [`health`] — one pure function, table-tested.
//! * **Domain settings** (health thresholds, work queue) are the domain policy's
//!   `health` and `sensors` ([`HealthPolicy`], [`SensorPolicy`], shared with the
//!   controller through `epu_model::health`): from the config (written from the
//!   policies at launch) or [`Aggregator::set_domain`]; for any other domain that has
//!   nodes (one added with `add_domain` later), asked of the controller with
//!   `describe_domain` ([`learn`]; the defaults until it answers).
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
//! use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, DomainSensors};
//! let run = epu_core::wire::RunName::new("demo")?;
//! let mut config = AggregatorConfig::new(run);
//! config.domains.push(DomainSensors::new("workers"));
//! let aggregator = Aggregator::new(
//!     config,
//!     AggregatorDeps {
//!         bus: Arc::new(bus.view(BusOptions::new("sensor-aggregator"))),
//!         store,
//!         clock: epu_core::clock::SystemClock::shared(),
//!         metrics: epu_core::telemetry::Metrics::new(),
//!         readiness: epu_core::telemetry::Health::new(),
//!     },
//! )?;
//! let running = aggregator.start().await?;      // serving and ready; returns at once
//! aggregator.set_domain(DomainSensors::new("more"))?; // add a domain at runtime
//! running.stop().await;                          // not ready, then a final flush of last-heard times
//! # Ok(()) }
//! ```
//!
//! It follows the one service lifecycle ([`epu_core::service::Service`]):
//! [`Aggregator::start`] raises readiness once it serves, [`RunningAggregator::stop`]
//! lowers it before anything stops, and `epu_core::service::run_service` runs it
//! until a shutdown future completes.
#![forbid(unsafe_code)]

pub mod config;
mod handlers;
pub mod health;
pub mod learn;
pub mod metrics;
mod nodes;
mod persist;
pub mod queue;
mod queues;
mod report;
mod service;
pub mod tracker;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use epu_core::bus::{Bus, BusError};
use epu_core::clock::SharedClock;
use epu_core::store::{Store, StoreError};
use epu_core::telemetry::Metrics;
use epu_core::wire::RunName;
use epu_model::messages::{Heartbeat, SensorInfo};
use tokio::sync::{watch, Notify};

pub use crate::config::{AggregatorConfig, ConfigError, DomainSensors};
pub use crate::health::{judge, Thresholds};
use crate::metrics::AggregatorMetrics;
use crate::queue::Brokers;
use crate::queues::{Probe, QueueEntry};
use crate::report::build_reading;
pub use crate::service::RunningAggregator;
use crate::tracker::Tracker;
pub use epu_model::health::{HealthPolicy, Secs, SensorPolicy};

/// The `sender` of the aggregator's envelopes, and its name as a service.
pub const SENDER: &str = "sensor-aggregator";

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

/// What an aggregator runs on.
pub struct AggregatorDeps {
    /// AMQP, or a `LocalBus` view in the standalone host.
    pub bus: Arc<dyn Bus>,
    /// Where last-heard times are kept across restarts.
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// The registry its metrics go to (served with the bus's).
    pub metrics: Metrics,
    /// Its readiness flag (`/readyz`): raised by `start`, lowered by `stop`.
    pub readiness: epu_core::telemetry::Health,
}

/// The sensor aggregator. Cheap to clone. Build with [`Aggregator::new`], then
/// [`Aggregator::start`] (or [`Aggregator::run`] until a shutdown future completes).
#[derive(Clone)]
pub struct Aggregator {
    inner: Arc<Inner>,
}

/// The aggregator's state, shared by its tasks.
struct Inner {
    run: RunName,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    clock: SharedClock,
    metrics: AggregatorMetrics,
    readiness: epu_core::telemetry::Health,
    default_broker: String,
    request_timeout: Duration,
    nodes_poll: Duration,
    info_interval: Duration,
    persist_interval: Duration,
    domains: Mutex<BTreeMap<String, DomainSensors>>,
    /// Settings taken from the controller for domains not in `domains` ([`learn`]).
    learner: learn::Learner,
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
            .field("run", &self.inner.run)
            .finish_non_exhaustive()
    }
}

impl Aggregator {
    /// Builds an aggregator from its config and what it runs on, registering its
    /// metrics in `deps.metrics`. Nothing runs yet.
    pub fn new(config: AggregatorConfig, deps: AggregatorDeps) -> Result<Self, AggregatorError> {
        let AggregatorDeps {
            bus,
            store,
            clock,
            metrics,
            readiness,
        } = deps;
        config.validate()?;
        let metrics = AggregatorMetrics::register(metrics.registry())?;
        let mut tracker = Tracker::new(Thresholds::default());
        let mut domains = BTreeMap::new();
        for d in &config.domains {
            tracker.set_policy(&d.name, d.thresholds());
            domains.insert(d.name.clone(), d.clone());
        }
        let (stop, _) = watch::channel(false);
        let inner = Inner {
            run: config.run.clone(),
            bus,
            store,
            clock,
            metrics,
            readiness,
            default_broker: config.bus.amqp_url.clone(),
            request_timeout: config.bus.request_timeout(),
            nodes_poll: config.nodes_poll(),
            info_interval: config.sensor_info_interval(),
            persist_interval: config.persist_interval(),
            domains: Mutex::new(domains),
            learner: learn::Learner::default(),
            tracker: Mutex::new(tracker),
            queues: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            brokers: Brokers::new(),
            notify: Notify::new(),
            stop,
            started: Mutex::new(None),
        };
        Ok(Aggregator {
            inner: Arc::new(inner),
        })
    }

    pub fn run_name(&self) -> &RunName {
        &self.inner.run
    }

    /// Its readiness flag (raised once it serves, lowered when it stops).
    pub fn health(&self) -> &epu_core::telemetry::Health {
        &self.inner.readiness
    }

    /// Adds a domain's sensor settings, or replaces them (its queue probe restarts
    /// when the aggregator is running). Takes effect at the next judgement.
    pub fn set_domain(&self, domain: DomainSensors) -> Result<(), AggregatorError> {
        let inner = &self.inner;
        domain.validate()?;
        {
            // Domains before tracker, as the learner takes them: set settings win.
            let mut domains = lock(&inner.domains);
            lock(&inner.tracker).set_policy(&domain.name, domain.thresholds());
            domains.insert(domain.name.clone(), domain.clone());
        }
        inner.learner.forget(&domain.name);
        inner.stop_probe(&domain.name);
        if domain.queue.is_none() {
            lock(&inner.queues).remove(&domain.name);
        }
        if lock(&inner.started).is_some() && !*inner.stop.borrow() {
            inner.start_probe(&domain);
        }
        tracing::info!(event = "sensor_domain_set", domain = %domain.name, settings = ?domain, "domain sensor settings set");
        inner.notify.notify_one();
        Ok(())
    }

    /// Stops watching a domain's queue and forgets its settings (while the
    /// provisioner still reports nodes of it, they are judged with the defaults until
    /// the controller describes the domain: [`learn`]).
    pub fn remove_domain(&self, name: &str) -> bool {
        let inner = &self.inner;
        let removed = lock(&inner.domains).remove(name).is_some();
        inner.learner.forget(name);
        lock(&inner.tracker).remove_policy(name);
        inner.stop_probe(name);
        lock(&inner.queues).remove(name);
        inner.notify.notify_one();
        removed
    }

    /// The configured domains.
    pub fn domains(&self) -> Vec<DomainSensors> {
        lock(&self.inner.domains).values().cloned().collect()
    }

    /// Records one heartbeat now (what the `heartbeat` handler does).
    pub fn record_heartbeat(&self, hb: Heartbeat) {
        self.inner.record_heartbeat(hb)
    }

    /// Nodes tracked in memory.
    pub fn tracked_nodes(&self) -> usize {
        self.inner.tracked_nodes()
    }

    /// The reading the controller would get for `domain` now (judged now).
    pub fn reading(&self, domain: &str) -> SensorInfo {
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut tracker = lock(&inner.tracker);
        tracker.sweep(now);
        let queues = lock(&inner.queues);
        build_reading(domain, &tracker, queues.get(domain), now)
    }
}

impl Inner {
    fn record_heartbeat(&self, hb: Heartbeat) {
        self.metrics.heartbeats.inc();
        let now = self.clock.now();
        let changed = lock(&self.tracker).heartbeat(hb, now);
        if changed {
            self.notify.notify_one();
        }
    }

    fn tracked_nodes(&self) -> usize {
        lock(&self.tracker).len()
    }
}
