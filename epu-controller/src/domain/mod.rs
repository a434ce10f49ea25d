//! One domain: its view of its nodes and sensors, its engine, and the task that
//! decides for it. Everything that touches a domain goes through its inbox, so
//! decisions and reconfigures of one domain never run at the same time.
//!
//! [`Domain::run`] is the task's loop: messages from the inbox change the domain's
//! memory (and schedule a debounced decision), the tick resends stale launches,
//! forgets old terminal nodes and decides. One decision is the pipeline in
//! [`pipeline`]: observe → decide → act → remember → metrics.
//!
//! **The store is the intent log.** A launch is stored before `provision` is sent,
//! and nothing changes in memory when a store write fails: the failure is logged
//! (`event = "store_failed"`) and counted (`epu_controller_store_errors_total`),
//! and what it was for is not done (the launch is not sent, the config not
//! changed, the domain not removed). A failed read when the domain starts is an
//! error for the caller ([`DomainError`]), never an empty store.

mod pipeline;
#[cfg(test)]
mod tests;
mod view;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use decision_engines::{DecisionEngine, EngineConfig, LaunchFailures, Reading};
use epu_core::bus::Bus;
use epu_core::clock::SharedClock;
use epu_core::store::{Store, StoreError, StoreExt};
use epu_core::wire::{ReplyError, RunName};
use epu_model::messages::{
    DomainDescription, DomainSummary, NodeRecord, ReconfigureRequest, RemoveDomainReply, SensorInfo,
};
use epu_model::{Health, NodeState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::ControllerMetrics;
use crate::policy::DomainPolicy;

/// Store trees the controller owns.
pub(crate) const DOMAINS_TREE: &str = "domains";
pub(crate) const LAUNCHES_TREE: &str = "launches";
pub(crate) const FAILURES_TREE: &str = "launch_failures";
/// Domains being removed (their policy), until the provisioner has confirmed
/// every node of theirs terminal.
pub(crate) const REMOVING_TREE: &str = "removing";

/// The var that carries a unique instance's key through the provisioner and back.
pub const UNIQUE_KEY_VAR: &str = "unique_key";

/// How long terminal nodes stay visible to `describe_domain`.
const KEEP_TERMINAL: chrono::TimeDelta = chrono::TimeDelta::seconds(300);
/// A stored launch not yet acknowledged by the provisioner is sent again after this.
const RESEND_LAUNCH_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(15);
/// A node asked to terminate and not yet reported terminal is asked again after
/// this, until the provisioner confirms.
const RESEND_TERMINATE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
/// A launch failure or success older than this does not count toward backoff
/// when it is first seen (a restart's listing, a full resync): it is history.
const RECENT: chrono::TimeDelta = chrono::TimeDelta::seconds(600);
/// Decisions remembered per domain for `inspect decisions`.
const KEEP_DECISIONS: usize = 50;

/// Errors starting a domain.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The domain's intent log could not be read back.
    #[error("cannot read domain {domain:?}'s {what} from the controller's store: {source}. The domain is not started without them, because it could launch twice")]
    Recover {
        /// The domain.
        domain: String,
        /// What was being read: "launch failures", "pending launches".
        what: &'static str,
        /// What the store said.
        #[source]
        source: StoreError,
    },
}

/// What every domain task shares.
pub(crate) struct Shared {
    pub run: RunName,
    pub sender: String,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    pub metrics: ControllerMetrics,
    pub tick: Duration,
    pub debounce: Duration,
}

/// A launch the controller decided on, stored before `provision` is sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PendingLaunch {
    pub launch_id: String,
    pub domain: String,
    pub node_ids: Vec<String>,
    pub vars: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    pub last_sent: Option<DateTime<Utc>>,
}

/// A decision, as `inspect decisions` shows it.
pub use epu_model::messages::DecisionRecord;

#[derive(Clone, Debug)]
pub(crate) struct NodeView {
    record: NodeRecord,
    health: Health,
    jobs: Option<u32>,
}

impl NodeView {
    fn new(record: NodeRecord) -> Self {
        NodeView {
            record,
            health: Health::Unknown,
            jobs: None,
        }
    }
}

pub(crate) enum DomainMsg {
    Node(Box<NodeRecord>),
    /// A full listing of the provisioner's records named these of the domain's
    /// nodes: the others it held are gone (placeholders of unacknowledged
    /// launches excepted).
    Listed(HashSet<String>),
    Sensors(Box<SensorInfo>),
    Reconfigure(
        Box<ReconfigureRequest>,
        oneshot::Sender<Result<DomainSummary, ReplyError>>,
    ),
    Describe(oneshot::Sender<DomainDescription>),
    Summary(oneshot::Sender<DomainSummary>),
    Remove(oneshot::Sender<Result<RemoveDomainReply, ReplyError>>),
}

/// The controller's handle on a running domain task.
#[derive(Clone)]
pub(crate) struct DomainHandle {
    pub tx: mpsc::UnboundedSender<DomainMsg>,
}

impl DomainHandle {
    pub fn send(&self, msg: DomainMsg) -> bool {
        self.tx.send(msg).is_ok()
    }

    /// Asks the domain's task and waits for its answer, at most `within`: a
    /// domain busy deciding (a slow provisioner, a slow store) is an
    /// `unavailable` answer, never a request that hangs.
    pub async fn ask<T>(
        &self,
        within: Duration,
        make: impl FnOnce(oneshot::Sender<T>) -> DomainMsg,
    ) -> Result<T, ReplyError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(make(tx)) {
            return Err(ReplyError::not_found("the domain was removed"));
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ReplyError::not_found("the domain was removed")),
            Err(_) => Err(ReplyError::new(
                epu_core::wire::ErrorCode::Unavailable,
                format!(
                    "the domain did not answer within {} s (busy deciding); try again",
                    within.as_secs_f64()
                ),
            )),
        }
    }
}

pub(crate) struct Domain {
    shared: Arc<Shared>,
    policy: DomainPolicy,
    engine: Box<dyn DecisionEngine>,
    nodes: BTreeMap<String, NodeView>,
    backlog: Option<Reading>,
    failures: LaunchFailures,
    decisions: VecDeque<DecisionRecord>,
    desired: u64,
    /// When `terminate_nodes` was last sent for a node not yet terminal.
    terminate_sent: HashMap<String, DateTime<Utc>>,
    /// Removed: no more decisions; terminating every node until the provisioner
    /// confirms, then the task ends.
    removing: bool,
}

/// Whether `next` is later news of a node than `prev`: never a state before the
/// one held (the controller's own TERMINATING mark stays until the provisioner
/// reports TERMINATING or later); from the provisioner's feed, a higher revision;
/// the first record from the feed after a placeholder; else a later state.
pub(crate) fn newer(prev: &NodeRecord, next: &NodeRecord) -> bool {
    if next.state < prev.state {
        return false;
    }
    match (prev.revision, next.revision) {
        (_, 0) => next.state > prev.state,
        (0, _) => true,
        (p, n) => n > p,
    }
}

/// Whether a node's change to `state` at `at` counts toward the launch-failure
/// backoff: only a change after the last failure counted (a restart's listing
/// does not count again what the stored count holds) and, for a node first seen,
/// only a recent one (old history is not a fresh failure).
pub(crate) fn counts_toward_backoff(
    failures: &LaunchFailures,
    first_seen: bool,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    failures.last_at.is_none_or(|last| at > last) && (!first_seen || now - at <= RECENT)
}

impl Domain {
    /// A domain over `known` (its nodes as the provisioner reported them) and what
    /// the store remembers of it: its launch failures, and its launches stored but
    /// not yet seen from the provisioner (shown as REQUESTING so nothing is launched
    /// twice). A store that cannot be read is an error, not an empty log.
    pub fn new(
        shared: Arc<Shared>,
        policy: DomainPolicy,
        engine: Box<dyn DecisionEngine>,
        known: Vec<NodeRecord>,
    ) -> Result<Self, DomainError> {
        let recover = |what: &'static str| {
            let domain = policy.name.clone();
            move |source| DomainError::Recover {
                domain,
                what,
                source,
            }
        };
        let failures = shared
            .store
            .get_json::<LaunchFailures>(FAILURES_TREE, &policy.name)
            .map_err(recover("launch failures"))?
            .unwrap_or_default();
        let pending = pending_launches(shared.store.as_ref(), &policy.name)
            .map_err(recover("pending launches"))?;
        let mut d = Domain {
            shared,
            policy,
            engine,
            nodes: BTreeMap::new(),
            backlog: None,
            failures,
            decisions: VecDeque::new(),
            desired: 0,
            terminate_sent: HashMap::new(),
            removing: false,
        };
        for r in known {
            d.apply_node(r);
        }
        for (_, p) in pending {
            for id in &p.node_ids {
                if !d.nodes.contains_key(id) {
                    let rec = d.placeholder(id, &p.launch_id, &p.vars, p.created);
                    d.nodes.insert(id.clone(), NodeView::new(rec));
                }
            }
        }
        Ok(d)
    }

    /// Starts the domain's task in `tasks` (its owner ends it by closing the
    /// inbox, or aborts it).
    pub(crate) fn spawn_in(self, tasks: &mut tokio::task::JoinSet<()>) -> DomainHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(self.run(rx));
        DomainHandle { tx }
    }

    /// The domain's task: applies inbox messages (a change schedules a decision
    /// after the debounce), and on every tick resends stale launches, forgets old
    /// terminal nodes and decides. Ends when the inbox closes or the domain is
    /// removed.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<DomainMsg>) {
        let mut tick = tokio::time::interval(self.shared.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
        loop {
            let wake =
                due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    match msg {
                        DomainMsg::Remove(reply) => {
                            // A removal the store refused changed nothing: keep serving.
                            let r = self.remove().await;
                            let _ = reply.send(r);
                        }
                        other => {
                            if self.handle(other).await && due.is_none() {
                                due = Some(tokio::time::Instant::now() + self.shared.debounce);
                            }
                        }
                    }
                    if self.removing && self.finish_removal() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    due = None;
                    self.decide().await;
                }
                _ = tick.tick() => {
                    if self.removing {
                        self.terminate_leftovers().await;
                        if self.finish_removal() {
                            return;
                        }
                        continue;
                    }
                    self.resend_stale_launches().await;
                    self.resend_stale_terminations().await;
                    self.forget_old_terminal();
                    self.decide().await;
                }
            }
        }
    }

    /// Applies a message; true when the domain's state changed (a decision is due).
    async fn handle(&mut self, msg: DomainMsg) -> bool {
        match msg {
            DomainMsg::Node(r) => self.apply_node(*r),
            DomainMsg::Listed(ids) => self.apply_listing(&ids),
            DomainMsg::Sensors(s) => self.apply_sensors(*s),
            DomainMsg::Reconfigure(req, reply) => {
                let r = self.reconfigure(*req);
                let changed = r.is_ok();
                let _ = reply.send(r);
                changed
            }
            DomainMsg::Describe(reply) => {
                let _ = reply.send(self.describe());
                false
            }
            DomainMsg::Summary(reply) => {
                let _ = reply.send(self.summary());
                false
            }
            DomainMsg::Remove(_) => false,
        }
    }

    fn placeholder(
        &self,
        id: &str,
        launch_id: &str,
        vars: &BTreeMap<String, String>,
        at: DateTime<Utc>,
    ) -> NodeRecord {
        let mut times = BTreeMap::new();
        times.insert(NodeState::Requesting, at);
        NodeRecord {
            node_id: id.to_string(),
            launch_id: launch_id.to_string(),
            domain: self.policy.name.clone(),
            run: self.shared.run.to_string(),
            driver: self.policy.deployable.driver().to_string(),
            iaas_id: None,
            addresses: vec![],
            state: NodeState::Requesting,
            reason: None,
            reason_detail: None,
            state_times: times,
            vars: vars.clone(),
            revision: 0,
        }
    }

    /// A node update from the provisioner; dropped unless it moves the node forward.
    ///
    /// The update itself is always applied (it is the provisioner's truth, not the
    /// controller's intent); the launch-failure count changes only if its store
    /// write succeeds, and an acknowledged launch whose stored intent cannot be
    /// deleted stays stored (it is resent; the provisioner knows its launch id).
    fn apply_node(&mut self, record: NodeRecord) -> bool {
        let held = self.nodes.get(&record.node_id).map(|n| &n.record);
        if held.is_some_and(|p| !newer(p, &record)) {
            return false;
        }
        let previous = held.map(|p| p.state);
        let now = self.shared.clock.now();
        let at = record.since().unwrap_or(now);
        if previous.is_none() && record.state.is_terminal() && now - at > KEEP_TERMINAL {
            // History (a restart's listing, a full resync): nothing to show or count.
            self.forget_launch(&record.launch_id);
            return false;
        }
        if record.state.is_terminal() {
            self.terminate_sent.remove(&record.node_id);
        }
        let mut failures = self.failures;
        if counts_toward_backoff(&failures, previous.is_none(), at, now)
            && previous != Some(record.state)
            && failures.observe(previous, record.state, at)
        {
            match self
                .shared
                .store
                .put_json(FAILURES_TREE, &self.policy.name, &failures)
            {
                Ok(()) => self.failures = failures,
                Err(e) => store_failed(
                    &self.shared,
                    &self.policy.name,
                    "launch_failures",
                    &e,
                    "the launch-failure count was not stored; it keeps its old value",
                ),
            }
        }
        // The provisioner knows this launch now; the stored intent has done its job.
        self.forget_launch(&record.launch_id);
        tracing::debug!(domain = %self.policy.name, node_id = %record.node_id, state = %record.state, "node update");
        match self.nodes.get_mut(&record.node_id) {
            Some(view) => view.record = record,
            None => {
                self.nodes
                    .insert(record.node_id.clone(), NodeView::new(record));
            }
        }
        true
    }

    /// Deletes the stored intent of a launch the provisioner has acknowledged.
    fn forget_launch(&self, launch_id: &str) {
        let key = launch_key(&self.policy.name, launch_id);
        let stored = match self.shared.store.get(LAUNCHES_TREE, &key) {
            Ok(v) => v.is_some(),
            Err(e) => {
                store_failed(
                    &self.shared,
                    &self.policy.name,
                    "forget_launch",
                    &e,
                    "cannot read the stored launch; it stays stored and may be resent",
                );
                return;
            }
        };
        if stored {
            if let Err(e) = self.shared.store.delete(LAUNCHES_TREE, &key) {
                store_failed(
                    &self.shared,
                    &self.policy.name,
                    "forget_launch",
                    &e,
                    "cannot delete the acknowledged launch; it stays stored and may be resent",
                );
            }
        }
    }

    /// A full listing named `listed` of the domain's nodes: every other node it
    /// holds is gone from the provisioner (pruned, or a provisioner with a new
    /// store), except the placeholders of launches not yet acknowledged.
    fn apply_listing(&mut self, listed: &HashSet<String>) -> bool {
        let before = self.nodes.len();
        self.nodes.retain(|id, v| {
            let placeholder = v.record.revision == 0;
            listed.contains(id) || placeholder
        });
        let dropped = before - self.nodes.len();
        if dropped > 0 {
            tracing::info!(event = "nodes_forgotten", domain = %self.policy.name, dropped, "the provisioner's full listing no longer names these nodes");
        }
        dropped > 0
    }

    fn apply_sensors(&mut self, info: SensorInfo) -> bool {
        let mut changed = false;
        if let Some(b) = info.backlog {
            let value = b.total as f64;
            if self.backlog.as_ref().is_none_or(|r| r.value != value) {
                changed = true;
            }
            self.backlog = Some(Reading::new(value, b.at));
        }
        for h in info.nodes {
            if let Some(view) = self.nodes.get_mut(&h.node_id) {
                if view.health != h.health {
                    tracing::info!(event = "node_health", domain = %self.policy.name, node_id = %h.node_id, health = %h.health, previous = %view.health, "health changed");
                    view.health = h.health;
                    changed = true;
                }
                if view.jobs != h.jobs {
                    view.jobs = h.jobs;
                    changed = true;
                }
            }
        }
        changed
    }

    fn forget_old_terminal(&mut self) {
        let now = self.shared.clock.now();
        self.nodes.retain(|_, v| {
            !(v.record.state.is_terminal()
                && v.record.since().is_some_and(|t| now - t > KEEP_TERMINAL))
        });
    }

    /// Applies a reconfiguration: the engine validates the merged config, the new
    /// policy is stored, and only then does the domain's policy change. If the store
    /// write fails the engine is put back to its old config.
    fn reconfigure(&mut self, req: ReconfigureRequest) -> Result<DomainSummary, ReplyError> {
        let mut next = self.policy.clone();
        let mut undo = None;
        if !req.engine_conf.is_empty() {
            let partial = EngineConfig::from_json(Value::Object(req.engine_conf.clone()))
                .map_err(|e| ReplyError::bad_request(e.to_string()))?;
            self.engine.reconfigure(&partial).map_err(|e| {
                ReplyError::bad_request(format!(
                    "{e}; domain {:?} keeps its old config",
                    self.policy.name
                ))
            })?;
            let current = EngineConfig::from_json(Value::Object(self.policy.engine_conf.clone()))
                .unwrap_or_default();
            undo = Some(pipeline::undo_partial(&current, &partial));
            next.engine_conf = current.merged(&partial).as_map().clone();
        }
        if let Some(d) = req.dry_run {
            next.dry_run = d;
        }
        if let Some(p) = req.paused {
            next.paused = p;
        }
        if let Err(e) = self.shared.store.put_json(DOMAINS_TREE, &next.name, &next) {
            store_failed(
                &self.shared,
                &self.policy.name,
                "reconfigure",
                &e,
                "the new config was not stored; the domain keeps its old config",
            );
            if let Some(undo) = undo {
                if let Err(u) = self.engine.reconfigure(&undo) {
                    tracing::error!(event = "engine_undo_failed", domain = %self.policy.name, error = %u, "the engine refused its old config back");
                }
            }
            return Err(ReplyError::internal(format!(
                "cannot persist the new config: {e}; domain {:?} keeps its old config",
                self.policy.name
            )));
        }
        self.policy = next;
        let conf = Value::Object(self.policy.engine_conf.clone());
        tracing::info!(event = "domain_reconfigured", domain = %self.policy.name, engine_conf = %conf, dry_run = self.policy.dry_run, paused = self.policy.paused, "reconfigured");
        Ok(self.summary())
    }

    /// Removes the domain: forgets it in the store, then terminates its nodes.
    ///
    /// The domain's record is deleted first; if that (or reading its pending
    /// launches) fails, nothing was terminated and the domain keeps running. Once
    /// it is deleted the removal stands: leftover launch failures and pending
    /// launches that cannot be deleted are logged and counted.
    async fn remove(&mut self) -> Result<RemoveDomainReply, ReplyError> {
        let refused = |shared: &Shared, name: &str, e: StoreError| {
            store_failed(
                shared,
                name,
                "remove",
                &e,
                "the domain was not removed; it keeps running",
            );
            ReplyError::internal(format!(
                "cannot remove domain {name:?} from the controller's store: {e}; it keeps running, remove it again once the store works"
            ))
        };
        if self.removing {
            return Err(ReplyError::not_found(format!(
                "domain {:?} is already being removed",
                self.policy.name
            )));
        }
        let launches = pending_launches(self.shared.store.as_ref(), &self.policy.name)
            .map_err(|e| refused(&self.shared, &self.policy.name, e))?;
        // The removal is recorded before the domain is forgotten, so a restart
        // goes on terminating its nodes instead of leaving them unmanaged.
        self.shared
            .store
            .put_json(REMOVING_TREE, &self.policy.name, &self.policy)
            .map_err(|e| refused(&self.shared, &self.policy.name, e))?;
        self.shared
            .store
            .delete(DOMAINS_TREE, &self.policy.name)
            .map_err(|e| refused(&self.shared, &self.policy.name, e))?;
        self.removing = true;
        let leftovers = std::iter::once((FAILURES_TREE, self.policy.name.clone()))
            .chain(launches.into_iter().map(|(k, _)| (LAUNCHES_TREE, k)));
        for (tree, key) in leftovers {
            if let Err(e) = self.shared.store.delete(tree, &key) {
                store_failed(
                    &self.shared,
                    &self.policy.name,
                    "remove",
                    &e,
                    "a removed domain's record was left in the store",
                );
            }
        }
        let ids: Vec<String> = self
            .nodes
            .values()
            .filter(|v| v.record.state.is_terminable())
            .map(|v| v.record.node_id.clone())
            .collect();
        if !ids.is_empty() {
            self.destroy(&ids).await;
        }
        tracing::info!(event = "domain_removed", domain = %self.policy.name, terminating = ids.len(), "removed; terminating its nodes until the provisioner confirms");
        Ok(RemoveDomainReply {
            domain: self.policy.name.clone(),
            terminating: ids,
        })
    }
}

impl Domain {
    /// A domain whose removal was recorded (a restart in the middle of it): it
    /// goes on terminating its nodes and never decides.
    pub(crate) fn into_removing(mut self) -> Self {
        self.removing = true;
        self
    }

    /// While removing: asks to terminate every node not yet terminal (nodes the
    /// provisioner reports later, from a launch that was on its way, included),
    /// each at most every `RESEND_TERMINATE_AFTER`.
    async fn terminate_leftovers(&mut self) {
        let fresh: Vec<String> = self
            .nodes
            .values()
            .filter(|v| v.record.state.is_terminable() && v.record.state < NodeState::Terminating)
            .map(|v| v.record.node_id.clone())
            .collect();
        if !fresh.is_empty() {
            self.destroy(&fresh).await;
        }
        self.resend_stale_terminations().await;
    }

    /// While removing: true once every node is terminal; the removal's record is
    /// then deleted (if that fails, the next start finishes it again).
    fn finish_removal(&mut self) -> bool {
        if self.nodes.values().any(|v| !v.record.state.is_terminal()) {
            return false;
        }
        if let Err(e) = self.shared.store.delete(REMOVING_TREE, &self.policy.name) {
            store_failed(
                &self.shared,
                &self.policy.name,
                "remove",
                &e,
                "the finished removal stays recorded; the next start finishes it again",
            );
        }
        tracing::info!(event = "domain_removal_done", domain = %self.policy.name, "every node of the removed domain is terminal");
        true
    }
}

/// The domain's launches stored but not yet acknowledged by the provisioner.
fn pending_launches(
    store: &dyn Store,
    domain: &str,
) -> Result<Vec<(String, PendingLaunch)>, StoreError> {
    store.scan_prefix_json::<PendingLaunch>(LAUNCHES_TREE, &format!("{domain}/"))
}

/// Logs a failed store read or write (`event = "store_failed"`) and counts it.
fn store_failed(shared: &Shared, domain: &str, op: &'static str, e: &StoreError, outcome: &str) {
    shared
        .metrics
        .store_errors
        .with_label_values(&[domain, op])
        .inc();
    tracing::error!(event = "store_failed", domain = %domain, op, error = %e, "{outcome}");
}

pub(crate) fn launch_key(domain: &str, launch_id: &str) -> String {
    format!("{domain}/{launch_id}")
}
