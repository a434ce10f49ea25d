//! One domain: its view of its nodes and sensors, its engine, and the task that
//! decides for it. Everything that touches a domain goes through its inbox, so
//! decisions and reconfigures of one domain never run at the same time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use decision_engines::{
    Control, DecisionEngine, EngineConfig, Instance, LaunchFailures, LaunchSpec, Reading, State,
};
use epu_core::bus::Bus;
use epu_core::clock::SharedClock;
use epu_core::store::{Store, StoreExt};
use epu_core::wire::{Envelope, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    Deployable, NodeRecord, ProvisionRequest, ReconfigureRequest, SensorInfo, TerminateNodesRequest,
};
use epu_model::{Health, NodeState};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::metrics::ControllerMetrics;
use crate::policy::DomainPolicy;

/// Store trees the controller owns.
pub(crate) const DOMAINS_TREE: &str = "domains";
pub(crate) const LAUNCHES_TREE: &str = "launches";
pub(crate) const FAILURES_TREE: &str = "launch_failures";

/// The var that carries a unique instance's key through the provisioner and back.
pub const UNIQUE_KEY_VAR: &str = "unique_key";

/// How long terminal nodes stay visible to `describe_domain`.
const KEEP_TERMINAL: chrono::TimeDelta = chrono::TimeDelta::seconds(300);
/// A stored launch not yet acknowledged by the provisioner is sent again after this.
const RESEND_LAUNCH_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(15);
/// Decisions remembered per domain for `inspect decisions`.
const KEEP_DECISIONS: usize = 50;

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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub domain: String,
    pub engine: String,
    pub launched: Vec<String>,
    pub destroyed: Vec<String>,
    pub reasons: Vec<String>,
    pub dry_run: bool,
    pub desired: u64,
}

#[derive(Clone, Debug)]
struct NodeView {
    record: NodeRecord,
    health: Health,
    jobs: Option<u32>,
}

pub(crate) enum DomainMsg {
    Node(Box<NodeRecord>),
    Sensors(Box<SensorInfo>),
    Reconfigure(
        Box<ReconfigureRequest>,
        oneshot::Sender<Result<Value, ReplyError>>,
    ),
    Describe(oneshot::Sender<Value>),
    Summary(oneshot::Sender<Value>),
    Remove(oneshot::Sender<Result<Value, ReplyError>>),
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

    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> DomainMsg,
    ) -> Result<T, ReplyError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(make(tx)) {
            return Err(ReplyError::not_found("the domain was removed"));
        }
        rx.await
            .map_err(|_| ReplyError::not_found("the domain was removed"))
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
}

impl Domain {
    pub fn new(
        shared: Arc<Shared>,
        policy: DomainPolicy,
        engine: Box<dyn DecisionEngine>,
        known: Vec<NodeRecord>,
    ) -> Self {
        let failures = shared
            .store
            .get_json::<LaunchFailures>(FAILURES_TREE, &policy.name)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut d = Domain {
            shared,
            policy,
            engine,
            nodes: BTreeMap::new(),
            backlog: None,
            failures,
            decisions: VecDeque::new(),
            desired: 0,
        };
        for r in known {
            d.apply_node(r);
        }
        // Launches stored but not yet seen from the provisioner are part of the
        // domain's capacity: show them as REQUESTING so nothing is launched twice.
        for (_, p) in d.pending_launches() {
            for id in &p.node_ids {
                if !d.nodes.contains_key(id) {
                    let rec = d.placeholder(id, &p.launch_id, &p.vars, p.created);
                    d.nodes.insert(
                        id.clone(),
                        NodeView {
                            record: rec,
                            health: Health::Unknown,
                            jobs: None,
                        },
                    );
                }
            }
        }
        d
    }

    pub fn spawn(self) -> DomainHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.run(rx));
        DomainHandle { tx }
    }

    fn name(&self) -> &str {
        &self.policy.name
    }

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
                            let r = self.remove().await;
                            let _ = reply.send(r);
                            return;
                        }
                        other => {
                            if self.handle(other).await && due.is_none() {
                                due = Some(tokio::time::Instant::now() + self.shared.debounce);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    due = None;
                    self.decide().await;
                }
                _ = tick.tick() => {
                    self.resend_stale_launches().await;
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
        }
    }

    /// A node update from the provisioner; dropped unless it moves the node forward.
    fn apply_node(&mut self, record: NodeRecord) -> bool {
        let previous = self.nodes.get(&record.node_id).map(|n| n.record.state);
        if previous.is_some_and(|p| record.state <= p) {
            return false;
        }
        let at = record.since().unwrap_or_else(|| self.shared.clock.now());
        if self.failures.observe(previous, record.state, at) {
            let _ = self
                .shared
                .store
                .put_json(FAILURES_TREE, &self.policy.name, &self.failures);
        }
        // The provisioner knows this launch now; the stored intent has done its job.
        let key = launch_key(&self.policy.name, &record.launch_id);
        if let Ok(Some(_)) = self.shared.store.get(LAUNCHES_TREE, &key) {
            let _ = self.shared.store.delete(LAUNCHES_TREE, &key);
        }
        tracing::debug!(domain = %self.policy.name, node_id = %record.node_id, state = %record.state, "node update");
        match self.nodes.get_mut(&record.node_id) {
            Some(view) => view.record = record,
            None => {
                self.nodes.insert(
                    record.node_id.clone(),
                    NodeView {
                        record,
                        health: Health::Unknown,
                        jobs: None,
                    },
                );
            }
        }
        true
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

    fn state(&self) -> State {
        let mut s = State::new(self.policy.name.clone(), self.shared.clock.now());
        for view in self.nodes.values() {
            let r = &view.record;
            if r.state.is_terminal() {
                continue;
            }
            let launched = r.launched_at().unwrap_or(s.now);
            let mut i = Instance::new(r.node_id.clone(), r.state, launched)
                .with_health(view.health)
                .with_busy(view.jobs);
            if let Some(k) = r.vars.get(UNIQUE_KEY_VAR) {
                i = i.with_unique_key(k.clone());
            }
            s.instances.push(i);
        }
        s.sensors.backlog = self.backlog;
        s.launch_failures = self.failures;
        s
    }

    async fn decide(&mut self) {
        if self.policy.paused {
            return;
        }
        let started = Instant::now();
        let state = self.state();
        let mut control = Control::new();
        let engine_name = self.policy.engine.clone();
        if let Err(e) = self.engine.decide(&state, &mut control) {
            tracing::error!(event = "decision_failed", domain = %self.policy.name, engine = %engine_name, error = %e, "the engine could not decide");
            return;
        }
        let capacity: Vec<&Instance> = state.capacity().collect();
        let destroyed_capacity = capacity
            .iter()
            .filter(|i| control.destroys().contains(&i.id))
            .count();
        self.desired =
            (capacity.len() - destroyed_capacity) as u64 + u64::from(control.launch_count());
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let domain_name = self.policy.name.clone();
        let labels = [domain_name.as_str(), engine_name.as_str()];
        m.desired
            .with_label_values(&[self.name()])
            .set(self.desired as i64);
        let running = state
            .instances
            .iter()
            .filter(|i| i.state == NodeState::Running && !i.is_unhealthy())
            .count();
        m.actual
            .with_label_values(&[self.name()])
            .set(running as i64);
        if control.is_empty() {
            m.decision_seconds
                .with_label_values(&[engine_name.as_str()])
                .observe(started.elapsed().as_secs_f64());
            return;
        }
        m.decisions.with_label_values(&labels).inc();
        let dry_run = self.policy.dry_run;
        let mut launched = Vec::new();
        if !dry_run {
            for intent in control.launches() {
                match self.launch(intent.count, &intent.spec).await {
                    Ok(ids) => launched.extend(ids),
                    Err(e) => {
                        tracing::error!(domain = %self.policy.name, error = %e, "cannot record a launch; will decide again")
                    }
                }
            }
            let destroys: Vec<String> = control.destroys().to_vec();
            if !destroys.is_empty() {
                self.destroy(&destroys).await;
            }
        }
        m.launches
            .with_label_values(&labels)
            .inc_by(u64::from(control.launch_count()));
        m.destroys
            .with_label_values(&labels)
            .inc_by(control.destroys().len() as u64);
        let record = DecisionRecord {
            at: state.now,
            domain: self.policy.name.clone(),
            engine: engine_name.clone(),
            launched: if dry_run {
                vec![format!(
                    "({} not launched: dry run)",
                    control.launch_count()
                )]
            } else {
                launched
            },
            destroyed: control.destroys().to_vec(),
            reasons: control.reasons().to_vec(),
            dry_run,
            desired: self.desired,
        };
        tracing::info!(
            event = "decision",
            domain = %record.domain,
            engine = %record.engine,
            launch = control.launch_count(),
            destroy = record.destroyed.len(),
            desired = record.desired,
            dry_run,
            reason = %record.reasons.join("; "),
            "decided"
        );
        if self.decisions.len() >= KEEP_DECISIONS {
            self.decisions.pop_front();
        }
        self.decisions.push_back(record);
        m.decision_seconds
            .with_label_values(&[engine_name.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Stores the launch (flushed), shows its nodes as REQUESTING, then asks the
    /// provisioner. If the send fails the stored launch is sent again later.
    async fn launch(&mut self, count: u32, spec: &LaunchSpec) -> Result<Vec<String>, String> {
        let launch_id = format!("l-{}", Uuid::new_v4().simple());
        let node_ids: Vec<String> = (0..count)
            .map(|_| format!("n-{}", Uuid::new_v4().simple()))
            .collect();
        let mut vars = spec.vars.clone();
        if let Some(k) = &spec.unique_key {
            vars.insert(UNIQUE_KEY_VAR.to_string(), k.clone());
        }
        let now = self.shared.clock.now();
        let pending = PendingLaunch {
            launch_id: launch_id.clone(),
            domain: self.policy.name.clone(),
            node_ids: node_ids.clone(),
            vars,
            created: now,
            last_sent: None,
        };
        self.shared
            .store
            .put_json(
                LAUNCHES_TREE,
                &launch_key(&self.policy.name, &launch_id),
                &pending,
            )
            .map_err(|e| e.to_string())?;
        for id in &node_ids {
            let rec = self.placeholder(id, &launch_id, &pending.vars, now);
            self.nodes.insert(
                id.clone(),
                NodeView {
                    record: rec,
                    health: Health::Unknown,
                    jobs: None,
                },
            );
        }
        send_provision(&self.shared, &self.policy.deployable, pending).await;
        Ok(node_ids)
    }

    fn pending_launches(&self) -> Vec<(String, PendingLaunch)> {
        self.shared
            .store
            .scan_prefix_json::<PendingLaunch>(LAUNCHES_TREE, &format!("{}/", self.policy.name))
            .unwrap_or_default()
    }

    async fn resend_stale_launches(&mut self) {
        let now = self.shared.clock.now();
        for (_, p) in self.pending_launches() {
            let stale = p.last_sent.is_none_or(|t| now - t >= RESEND_LAUNCH_AFTER);
            if stale {
                send_provision(&self.shared, &self.policy.deployable, p).await;
            }
        }
    }

    fn forget_old_terminal(&mut self) {
        let now = self.shared.clock.now();
        self.nodes.retain(|_, v| {
            !(v.record.state.is_terminal()
                && v.record.since().is_some_and(|t| now - t > KEEP_TERMINAL))
        });
    }

    async fn destroy(&mut self, ids: &[String]) {
        let now = self.shared.clock.now();
        for id in ids {
            if let Some(v) = self.nodes.get_mut(id) {
                if v.record.state < NodeState::Terminating {
                    v.record.state = NodeState::Terminating;
                    v.record.state_times.insert(NodeState::Terminating, now);
                }
            }
        }
        let req = TerminateNodesRequest {
            node_ids: ids.to_vec(),
        };
        let env = match Envelope::with_body(
            &self.shared.run,
            Op::TerminateNodes,
            &self.shared.sender,
            &req,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode terminate_nodes");
                return;
            }
        };
        if let Err(e) = self.shared.bus.send(Service::Provisioner, &env).await {
            tracing::warn!(domain = %self.policy.name, error = %e, "terminate_nodes not sent; the next decision retries");
            // Undo the local mark so the engine sees them again.
            for id in ids {
                if let Some(v) = self.nodes.get_mut(id) {
                    v.record.state_times.remove(&NodeState::Terminating);
                    if let Some((s, _)) = v.record.state_times.iter().next_back() {
                        v.record.state = *s;
                    }
                }
            }
        } else {
            tracing::info!(event = "terminate_sent", domain = %self.policy.name, nodes = ?ids, "asked the provisioner to terminate");
        }
    }

    fn reconfigure(&mut self, req: ReconfigureRequest) -> Result<Value, ReplyError> {
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
            self.policy.engine_conf = current.merged(&partial).as_map().clone();
        }
        if let Some(d) = req.dry_run {
            self.policy.dry_run = d;
        }
        if let Some(p) = req.paused {
            self.policy.paused = p;
        }
        self.shared
            .store
            .put_json(DOMAINS_TREE, &self.policy.name, &self.policy)
            .map_err(|e| ReplyError::internal(format!("cannot persist the new config: {e}")))?;
        let conf = Value::Object(self.policy.engine_conf.clone());
        tracing::info!(event = "domain_reconfigured", domain = %self.policy.name, engine_conf = %conf, dry_run = self.policy.dry_run, paused = self.policy.paused, "reconfigured");
        Ok(self.summary())
    }

    async fn remove(&mut self) -> Result<Value, ReplyError> {
        let ids: Vec<String> = self
            .nodes
            .values()
            .filter(|v| v.record.state.is_terminable())
            .map(|v| v.record.node_id.clone())
            .collect();
        if !ids.is_empty() {
            self.destroy(&ids).await;
        }
        let _ = self.shared.store.delete(DOMAINS_TREE, &self.policy.name);
        let _ = self.shared.store.delete(FAILURES_TREE, &self.policy.name);
        for (k, _) in self.pending_launches() {
            let _ = self.shared.store.delete(LAUNCHES_TREE, &k);
        }
        tracing::info!(event = "domain_removed", domain = %self.policy.name, terminating = ids.len(), "removed");
        Ok(json!({"domain": self.policy.name, "terminating": ids}))
    }

    fn counts(&self) -> (usize, usize, usize, usize) {
        let (mut running, mut pending, mut unhealthy, mut terminating) = (0, 0, 0, 0);
        for v in self.nodes.values() {
            let s = v.record.state;
            let sick = v.health.is_unhealthy() || s == NodeState::RunningFailed;
            if s.is_terminal() {
                continue;
            }
            if sick {
                unhealthy += 1;
            } else if s == NodeState::Running {
                running += 1;
            } else if s.is_booting() {
                pending += 1;
            } else if s == NodeState::Terminating {
                terminating += 1;
            }
        }
        (running, pending, unhealthy, terminating)
    }

    fn summary(&self) -> Value {
        let (running, pending, unhealthy, terminating) = self.counts();
        let report = self.engine.report();
        json!({
            "domain": self.policy.name,
            "engine": self.policy.engine,
            "engine_state": report.state,
            "desired": self.desired,
            "running": running,
            "pending": pending,
            "unhealthy": unhealthy,
            "terminating": terminating,
            "backlog": self.backlog.as_ref().map(|r| r.value),
            "dry_run": self.policy.dry_run,
            "paused": self.policy.paused,
            "engine_conf": self.policy.engine_conf,
        })
    }

    fn describe(&self) -> Value {
        let mut v = self.summary();
        let nodes: Vec<Value> = self
            .nodes
            .values()
            .map(|n| {
                json!({
                    "node_id": n.record.node_id,
                    "domain": n.record.domain,
                    "state": n.record.state,
                    "health": n.health,
                    "jobs": n.jobs,
                    "iaas_id": n.record.iaas_id,
                    "launch_id": n.record.launch_id,
                    "driver": n.record.driver,
                    "reason": n.record.reason,
                    "since": n.record.since(),
                })
            })
            .collect();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("report".into(), json!(self.engine.report()));
            obj.insert("policy".into(), json!(self.policy));
            obj.insert("nodes".into(), Value::Array(nodes));
            obj.insert("decisions".into(), json!(self.decisions));
        }
        v
    }
}

async fn send_provision(shared: &Shared, deployable: &Deployable, mut pending: PendingLaunch) {
    let req = ProvisionRequest {
        launch_id: pending.launch_id.clone(),
        domain: pending.domain.clone(),
        count: pending.node_ids.len() as i64,
        node_ids: pending.node_ids.clone(),
        deployable: deployable.clone(),
        vars: pending.vars.clone(),
        subscriber: None,
    };
    let env = match Envelope::with_body(&shared.run, Op::Provision, &shared.sender, &req) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode provision");
            return;
        }
    };
    match shared.bus.send(Service::Provisioner, &env).await {
        Ok(()) => {
            tracing::info!(event = "provision_sent", domain = %pending.domain, launch_id = %pending.launch_id, count = pending.node_ids.len(), "asked the provisioner to launch");
            pending.last_sent = Some(shared.clock.now());
            let key = launch_key(&pending.domain, &pending.launch_id);
            // Only update the record if it is still pending (not yet acknowledged).
            if let Ok(Some(_)) = shared.store.get(LAUNCHES_TREE, &key) {
                let _ = shared.store.put_json(LAUNCHES_TREE, &key, &pending);
            }
        }
        Err(e) => {
            tracing::warn!(domain = %pending.domain, launch_id = %pending.launch_id, error = %e, "provision not sent; it stays stored and is sent again");
        }
    }
}

pub(crate) fn launch_key(domain: &str, launch_id: &str) -> String {
    format!("{domain}/{launch_id}")
}
