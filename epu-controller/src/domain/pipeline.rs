//! One decision of a domain, as a pipeline:
//!
//! 1. **observe** — [`observe`]: the engine's [`State`] from the domain's memory and
//!    the clock's now (pure).
//! 2. **decide** — the engine's call; an engine error ends the decision (logged
//!    `decision_failed`, nothing else happens). [`plan`] turns the intents into what
//!    is carried out (pure: nothing in dry run) and the desired size.
//! 3. **act** — [`Domain::act`]: each launch is stored (the intent log) and shown as
//!    REQUESTING placeholders *before* `provision` is sent; a launch whose store
//!    write fails is neither shown nor sent. Destroys mark the nodes TERMINATING and
//!    send `terminate_nodes` (the mark is undone if the send fails).
//! 4. **remember** — a decision that asked for a change is logged (`event =
//!    "decision"`) and kept for `inspect decisions` ([`decision_record`], pure).
//! 5. **metrics** — gauges, counters and the decision's duration.
//!
//! A paused domain does not decide at all: the engine is not called.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use decision_engines::{
    Control, EngineConfig, Instance, LaunchFailures, LaunchIntent, LaunchSpec, Reading, State,
};
use epu_core::store::StoreExt;
use epu_core::wire::{Envelope, Op, Service};
use epu_model::messages::{Deployable, ProvisionRequest, TerminateNodesRequest};
use epu_model::NodeState;
use serde_json::Value;
use uuid::Uuid;

use super::{
    launch_key, pending_launches, store_failed, DecisionRecord, Domain, NodeView, PendingLaunch,
    Shared, KEEP_DECISIONS, LAUNCHES_TREE, RESEND_LAUNCH_AFTER, RESEND_TERMINATE_AFTER,
    UNIQUE_KEY_VAR,
};

/// The one-shot failpoint (`epu_core::failpoint`) between storing a launch and
/// sending its `provision`.
pub(crate) const FAILPOINT_AFTER_STORE: &str = "controller_after_store_before_send";

/// What one decision carries out, decided without IO.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Plan {
    /// Instances the domain wants after this decision: its capacity, less the
    /// capacity destroyed, plus the launches (dry run or not).
    pub desired: u64,
    /// Healthy RUNNING instances now.
    pub running: usize,
    /// The engine asked for a change: the decision is counted, logged, remembered.
    pub changed: bool,
    /// Launches to carry out (none in dry run).
    pub launches: Vec<LaunchIntent>,
    /// Instances to terminate (none in dry run).
    pub destroys: Vec<String>,
}

/// The engine's view of the domain at `now`: every node that is not terminal,
/// the backlog, the launch failures.
pub(super) fn observe<'a>(
    domain: &str,
    nodes: impl IntoIterator<Item = &'a NodeView>,
    backlog: Option<Reading>,
    failures: LaunchFailures,
    now: DateTime<Utc>,
) -> State {
    let mut s = State::new(domain.to_string(), now);
    for view in nodes {
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
    s.sensors.backlog = backlog;
    s.launch_failures = failures;
    s
}

/// What to carry out of the engine's `control` on `state`.
pub(super) fn plan(state: &State, control: &Control, dry_run: bool) -> Plan {
    let capacity: Vec<&Instance> = state.capacity().collect();
    let destroyed_capacity = capacity
        .iter()
        .filter(|i| control.destroys().contains(&i.id))
        .count();
    let desired = (capacity.len() - destroyed_capacity) as u64 + u64::from(control.launch_count());
    let running = state
        .instances
        .iter()
        .filter(|i| i.state == NodeState::Running && !i.is_unhealthy())
        .count();
    let (launches, destroys) = if dry_run {
        (Vec::new(), Vec::new())
    } else {
        (control.launches().to_vec(), control.destroys().to_vec())
    };
    Plan {
        desired,
        running,
        changed: !control.is_empty(),
        launches,
        destroys,
    }
}

/// The decision as it is logged and remembered. `launched`: the node ids actually
/// launched (a dry run says how many were not).
pub(super) fn decision_record(
    state: &State,
    engine: &str,
    control: &Control,
    plan: &Plan,
    dry_run: bool,
    launched: Vec<String>,
) -> DecisionRecord {
    DecisionRecord {
        at: state.now,
        domain: state.domain.clone(),
        engine: engine.to_string(),
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
        desired: plan.desired,
    }
}

/// Keeps the last `keep` decisions.
pub(super) fn remember(
    decisions: &mut VecDeque<DecisionRecord>,
    record: DecisionRecord,
    keep: usize,
) {
    while decisions.len() >= keep.max(1) {
        decisions.pop_front();
    }
    decisions.push_back(record);
}

/// The intent stored for one launch: the spec's vars with its unique key.
pub(super) fn pending_launch(
    domain: &str,
    launch_id: String,
    node_ids: Vec<String>,
    spec: &LaunchSpec,
    now: DateTime<Utc>,
) -> PendingLaunch {
    let mut vars = spec.vars.clone();
    if let Some(k) = &spec.unique_key {
        vars.insert(UNIQUE_KEY_VAR.to_string(), k.clone());
    }
    PendingLaunch {
        launch_id,
        domain: domain.to_string(),
        node_ids,
        vars,
        created: now,
        last_sent: None,
    }
}

/// A stored launch is sent again when it was never sent, or not for a while.
pub(super) fn resend_due(p: &PendingLaunch, now: DateTime<Utc>) -> bool {
    p.last_sent.is_none_or(|t| now - t >= RESEND_LAUNCH_AFTER)
}

/// The partial config that puts `current` back after `partial` was laid over it:
/// each key of `partial` gets its old value, or `null` (removed) if it had none.
pub(super) fn undo_partial(current: &EngineConfig, partial: &EngineConfig) -> EngineConfig {
    partial
        .keys()
        .map(|k| (k, current.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

impl Domain {
    /// One decision: observe → decide → act → remember → metrics.
    pub(super) async fn decide(&mut self) {
        if self.policy.paused || self.removing {
            return;
        }
        let started = Instant::now();
        let state = observe(
            &self.policy.name,
            self.nodes.values(),
            self.backlog,
            self.failures,
            self.shared.clock.now(),
        );
        let mut control = Control::new();
        if let Err(e) = self.engine.decide(&state, &mut control) {
            tracing::error!(event = "decision_failed", domain = %self.policy.name, engine = %self.policy.engine, error = %e, "the engine could not decide");
            return;
        }
        let dry_run = self.policy.dry_run;
        let plan = plan(&state, &control, dry_run);
        self.desired = plan.desired;
        let launched = self.act(&plan).await;
        if plan.changed {
            let record = decision_record(
                &state,
                &self.policy.engine,
                &control,
                &plan,
                dry_run,
                launched,
            );
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
            remember(&mut self.decisions, record, KEEP_DECISIONS);
        }
        self.record_metrics(&plan, &control, started.elapsed());
    }

    /// Carries out the plan's launches, then its destroys; the node ids launched.
    async fn act(&mut self, plan: &Plan) -> Vec<String> {
        let mut launched = Vec::new();
        for intent in &plan.launches {
            if let Some(ids) = self.launch(intent.count, &intent.spec).await {
                launched.extend(ids);
            }
        }
        if !plan.destroys.is_empty() {
            self.destroy(&plan.destroys).await;
        }
        launched
    }

    fn record_metrics(&self, plan: &Plan, control: &Control, elapsed: Duration) {
        let m = &self.shared.metrics;
        let domain = self.policy.name.as_str();
        let engine = self.policy.engine.as_str();
        m.desired
            .with_label_values(&[domain])
            .set(plan.desired as i64);
        m.actual
            .with_label_values(&[domain])
            .set(plan.running as i64);
        if plan.changed {
            let labels = [domain, engine];
            m.decisions.with_label_values(&labels).inc();
            m.launches
                .with_label_values(&labels)
                .inc_by(u64::from(control.launch_count()));
            m.destroys
                .with_label_values(&labels)
                .inc_by(control.destroys().len() as u64);
        }
        m.decision_seconds
            .with_label_values(&[engine])
            .observe(elapsed.as_secs_f64());
    }

    /// Stores the launch (flushed), shows its nodes as REQUESTING, then asks the
    /// provisioner; the new node ids. If the store write fails nothing changes and
    /// nothing is sent (`None`): the next decision sees the same capacity and decides
    /// again. If the send fails the stored launch is sent again later.
    async fn launch(&mut self, count: u32, spec: &LaunchSpec) -> Option<Vec<String>> {
        let launch_id = format!("l-{}", Uuid::new_v4().simple());
        let node_ids: Vec<String> = (0..count)
            .map(|_| format!("n-{}", Uuid::new_v4().simple()))
            .collect();
        let now = self.shared.clock.now();
        let pending = pending_launch(&self.policy.name, launch_id, node_ids, spec, now);
        let key = launch_key(&self.policy.name, &pending.launch_id);
        if let Err(e) = self.shared.store.put_json(LAUNCHES_TREE, &key, &pending) {
            store_failed(
                &self.shared,
                &self.policy.name,
                "record_launch",
                &e,
                "cannot record a launch: not sent; will decide again",
            );
            return None;
        }
        for id in &pending.node_ids {
            let rec = self.placeholder(id, &pending.launch_id, &pending.vars, now);
            self.nodes.insert(id.clone(), NodeView::new(rec));
        }
        let ids = pending.node_ids.clone();
        epu_core::failpoint::crash_if_armed(FAILPOINT_AFTER_STORE);
        send_provision(&self.shared, &self.policy.deployable, pending).await;
        Some(ids)
    }

    /// Sends `provision` again for stored launches the provisioner has not
    /// acknowledged. A store that cannot be read skips this round.
    pub(super) async fn resend_stale_launches(&mut self) {
        let now = self.shared.clock.now();
        let pending = match pending_launches(self.shared.store.as_ref(), &self.policy.name) {
            Ok(p) => p,
            Err(e) => {
                store_failed(
                    &self.shared,
                    &self.policy.name,
                    "read_launches",
                    &e,
                    "cannot read the stored launches; none resent this round",
                );
                return;
            }
        };
        for (_, p) in pending {
            if resend_due(&p, now) {
                send_provision(&self.shared, &self.policy.deployable, p).await;
            }
        }
    }

    /// Marks the nodes TERMINATING and asks the provisioner to terminate them; if
    /// the send fails the mark is undone so the engine sees them again. A node
    /// whose launch was never acknowledged is first taken out of its stored launch
    /// (the controller's tombstone: the launch is never resent with it); the
    /// provisioner tombstones an id it does not know, so a `provision` already on
    /// its way cannot start it. Such a node keeps its mark when the send fails: the
    /// tick sends it again.
    pub(super) async fn destroy(&mut self, ids: &[String]) {
        let cancelled = self.cancel_unsent(ids);
        let ids: Vec<String> = ids
            .iter()
            .filter(|id| !cancelled.refused.contains(*id))
            .cloned()
            .collect();
        if ids.is_empty() {
            return;
        }
        let now = self.shared.clock.now();
        for id in &ids {
            if let Some(v) = self.nodes.get_mut(id) {
                if v.record.state < NodeState::Terminating {
                    v.record.state = NodeState::Terminating;
                    v.record.state_times.insert(NodeState::Terminating, now);
                }
            }
        }
        if self.send_terminate(&ids).await {
            return;
        }
        // Undo the local mark so the engine sees them again.
        for id in ids.iter().filter(|id| !cancelled.done.contains(*id)) {
            if let Some(v) = self.nodes.get_mut(id) {
                v.record.state_times.remove(&NodeState::Terminating);
                if let Some((s, _)) = v.record.state_times.iter().next_back() {
                    v.record.state = *s;
                }
            }
        }
    }

    /// Takes the placeholders among `ids` (nodes of launches the provisioner has
    /// not acknowledged) out of their stored launches (deleted once empty).
    fn cancel_unsent(&mut self, ids: &[String]) -> Cancelled {
        let mut out = Cancelled::default();
        let unsent: Vec<&String> = ids
            .iter()
            .filter(|id| {
                self.nodes.get(*id).is_some_and(|v| {
                    v.record.revision == 0 && v.record.state == NodeState::Requesting
                })
            })
            .collect();
        if unsent.is_empty() {
            return out;
        }
        let pending = match pending_launches(self.shared.store.as_ref(), &self.policy.name) {
            Ok(p) => p,
            Err(e) => {
                store_failed(
                    &self.shared,
                    &self.policy.name,
                    "cancel_launch",
                    &e,
                    "cannot read the stored launches; their unsent nodes are not destroyed this time",
                );
                out.refused.extend(unsent.into_iter().cloned());
                return out;
            }
        };
        for (key, mut p) in pending {
            let (gone, kept): (Vec<String>, Vec<String>) = p
                .node_ids
                .iter()
                .cloned()
                .partition(|id| unsent.contains(&id));
            if gone.is_empty() {
                continue;
            }
            p.node_ids = kept;
            let written = if p.node_ids.is_empty() {
                self.shared.store.delete(LAUNCHES_TREE, &key)
            } else {
                self.shared.store.put_json(LAUNCHES_TREE, &key, &p)
            };
            match written {
                Ok(()) => {
                    tracing::info!(event = "launch_cancelled", domain = %self.policy.name, launch_id = %p.launch_id, nodes = ?gone, "unsent nodes taken out of their launch");
                    out.done.extend(gone);
                }
                Err(e) => {
                    store_failed(
                        &self.shared,
                        &self.policy.name,
                        "cancel_launch",
                        &e,
                        "cannot take unsent nodes out of their stored launch; they are not destroyed this time",
                    );
                    out.refused.extend(gone);
                }
            }
        }
        out
    }

    /// Sends `terminate_nodes` (with the domain, for tombstones); true when sent.
    async fn send_terminate(&mut self, ids: &[String]) -> bool {
        let req = TerminateNodesRequest {
            node_ids: ids.to_vec(),
            domain: Some(self.policy.name.clone()),
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
                return false;
            }
        };
        if let Err(e) = self.shared.bus.send(Service::Provisioner, &env).await {
            tracing::warn!(domain = %self.policy.name, error = %e, "terminate_nodes not sent; sent again later");
            return false;
        }
        let now = self.shared.clock.now();
        for id in ids {
            self.terminate_sent.insert(id.clone(), now);
        }
        tracing::info!(event = "terminate_sent", domain = %self.policy.name, nodes = ?ids, "asked the provisioner to terminate");
        true
    }

    /// Asks again to terminate the nodes marked TERMINATING that the provisioner
    /// has not reported terminal for a while: a lost `terminate_nodes`, or a
    /// launch that arrived after its cancel, is repaired here.
    pub(super) async fn resend_stale_terminations(&mut self) {
        let now = self.shared.clock.now();
        let due: Vec<String> = self
            .nodes
            .values()
            .filter(|v| v.record.state == NodeState::Terminating)
            .filter(|v| {
                let last = self
                    .terminate_sent
                    .get(&v.record.node_id)
                    .copied()
                    .or_else(|| v.record.since());
                last.is_none_or(|t| now - t >= RESEND_TERMINATE_AFTER)
            })
            .map(|v| v.record.node_id.clone())
            .collect();
        if !due.is_empty() {
            tracing::info!(event = "terminate_resent", domain = %self.policy.name, nodes = due.len(), "not confirmed terminated yet: asking again");
            self.send_terminate(&due).await;
        }
    }
}

/// What [`Domain::cancel_unsent`] did.
#[derive(Default)]
struct Cancelled {
    /// Taken out of their stored launch.
    done: std::collections::HashSet<String>,
    /// Could not be (the store failed): not destroyed now.
    refused: std::collections::HashSet<String>,
}

/// Sends `provision` for a stored launch and, once sent, records when (if the
/// launch is still stored: not yet acknowledged). A failed record only means it is
/// sent again sooner; the provisioner knows the launch by its id.
async fn send_provision(shared: &Shared, deployable: &Deployable, mut pending: PendingLaunch) {
    let req = ProvisionRequest {
        launch_id: pending.launch_id.clone(),
        domain: pending.domain.clone(),
        count: pending.node_ids.len() as i64,
        node_ids: pending.node_ids.clone(),
        deployable: deployable.clone(),
        vars: pending.vars.clone(),
        subscriber: None,
        check_only: false,
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
            let written = match shared.store.get(LAUNCHES_TREE, &key) {
                Ok(Some(_)) => shared.store.put_json(LAUNCHES_TREE, &key, &pending),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                store_failed(
                    shared,
                    &pending.domain,
                    "launch_sent",
                    &e,
                    "cannot record that the launch was sent; it is sent again sooner",
                );
            }
        }
        Err(e) => {
            tracing::warn!(domain = %pending.domain, launch_id = %pending.launch_id, error = %e, "provision not sent; it stays stored and is sent again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use epu_model::Health;
    use epu_testkit::records::node;

    use crate::domain::tests::{destroy, launch};

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn inst(id: &str, state: NodeState, health: Health) -> Instance {
        Instance::new(id, state, t(0)).with_health(health)
    }

    fn state(instances: Vec<Instance>) -> State {
        let mut s = State::new("web", t(100));
        s.instances = instances;
        s
    }

    fn none() -> Control {
        let mut c = Control::new();
        c.reason("steady");
        c
    }

    use Health::{Ok as Fine, ProcessError};
    use NodeState::{Requesting, Running, Started, Terminating};

    /// (name, instances, control, dry run, desired, running, changed, launches sent, destroys sent).
    type Case = (
        &'static str,
        Vec<Instance>,
        Control,
        bool,
        u64,
        usize,
        bool,
        u32,
        Vec<&'static str>,
    );

    #[test]
    fn plan_table() {
        let two = || vec![inst("a", Running, Fine), inst("b", Running, Fine)];
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("steady: nothing to do",                    two(), none(), false, 2, 2, false, 0, vec![]),
            ("reasons alone are not a change",           vec![], none(), false, 0, 0, false, 0, vec![]),
            ("launch intents are carried out",           two(), launch(3), false, 5, 2, true, 3, vec![]),
            ("dry run: launches counted, not carried",   two(), launch(3), true, 5, 2, true, 0, vec![]),
            ("dry run: destroys counted, not carried",   two(), destroy(&["a"]), true, 1, 2, true, 0, vec![]),
            ("destroy of a running node",                two(), destroy(&["a"]), false, 1, 2, true, 0, vec!["a"]),
            ("destroy of a REQUESTING placeholder",      vec![inst("a", Running, Fine), inst("p", Requesting, Health::Unknown)], destroy(&["p"]), false, 1, 1, true, 0, vec!["p"]),
            ("destroy of an unknown id: sent, desired kept", two(), destroy(&["zz"]), false, 2, 2, true, 0, vec!["zz"]),
            ("booting counts as capacity, not running",  vec![inst("a", Started, Health::Unknown)], none(), false, 1, 0, false, 0, vec![]),
            ("unhealthy: neither capacity nor running",  vec![inst("a", Running, ProcessError), inst("b", Running, Fine)], destroy(&["a"]), false, 1, 1, true, 0, vec!["a"]),
            ("terminating is not capacity",              vec![inst("a", Terminating, Fine)], launch(1), false, 1, 0, true, 1, vec![]),
        ];
        for (name, instances, control, dry_run, desired, running, changed, launches, destroys) in
            cases
        {
            let p = plan(&state(instances), &control, dry_run);
            assert_eq!(p.desired, desired, "{name}: desired");
            assert_eq!(p.running, running, "{name}: running");
            assert_eq!(p.changed, changed, "{name}: changed");
            let sent: u32 = p.launches.iter().map(|l| l.count).sum();
            assert_eq!(sent, launches, "{name}: launches carried out");
            assert_eq!(p.destroys, destroys, "{name}: destroys carried out");
        }
    }

    /// (name, control, dry run, node ids launched, `launched` as remembered).
    type RecordCase = (&'static str, Control, bool, Vec<String>, Vec<&'static str>);

    #[test]
    fn decision_record_table() {
        let s = state(vec![inst("a", Running, Fine)]);
        let ids = || vec!["n-1".to_string(), "n-2".to_string()];
        #[rustfmt::skip]
        let cases: Vec<RecordCase> = vec![
            ("launched ids are logged",         launch(2), false, ids(), vec!["n-1", "n-2"]),
            ("dry run says what it did not do", launch(2), true, vec![], vec!["(2 not launched: dry run)"]),
            ("a failed store write launched none", launch(2), false, vec![], vec![]),
        ];
        for (name, control, dry_run, launched, want) in cases {
            let p = plan(&s, &control, dry_run);
            let r = decision_record(&s, "npreserving", &control, &p, dry_run, launched);
            assert_eq!(r.launched, want, "{name}");
            assert_eq!(r.dry_run, dry_run, "{name}");
            assert_eq!(r.desired, 3, "{name}");
            assert_eq!(r.at, t(100), "{name}");
            assert_eq!(r.domain, "web", "{name}");
            assert_eq!(r.reasons, vec!["launch 2".to_string()], "{name}");
        }
    }

    fn view(id: &str, state: NodeState, since: i64, vars: &[(&str, &str)]) -> NodeView {
        let mut b = node("web", id)
            .run("r")
            .launch("l-1")
            .state(state)
            .at(t(since));
        for (k, v) in vars {
            b = b.var(k, v);
        }
        NodeView::new(b.build())
    }

    #[test]
    fn observe_shows_live_nodes_sensors_and_failures() {
        let nodes = [
            view("a", Running, 10, &[]),
            view("b", NodeState::Terminated, 20, &[]),
            view("c", Requesting, 30, &[(UNIQUE_KEY_VAR, "k1")]),
        ];
        let failures = LaunchFailures {
            consecutive: 2,
            last_at: Some(t(5)),
        };
        let s = observe(
            "web",
            &nodes,
            Some(Reading::new(7.0, t(90))),
            failures,
            t(100),
        );
        assert_eq!(s.now, t(100));
        assert_eq!(s.domain, "web");
        let ids: Vec<&str> = s.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c"], "terminal nodes are left out");
        assert_eq!(s.instances[1].unique_key.as_deref(), Some("k1"));
        assert_eq!(s.sensors.backlog.map(|r| r.value), Some(7.0));
        assert_eq!(s.launch_failures, failures);
    }

    #[test]
    fn resend_due_table() {
        let p = |last: Option<i64>| PendingLaunch {
            last_sent: last.map(t),
            ..pending_launch("web", "l-1".into(), vec![], &LaunchSpec::default(), t(0))
        };
        #[rustfmt::skip]
        let cases = [
            ("never sent",              None,     0, true),
            ("sent just now",           Some(0),  0, false),
            ("sent 14 s ago",           Some(0), 14, false),
            ("sent exactly 15 s ago",   Some(0), 15, true),
            ("sent long ago",           Some(0), 99, true),
        ];
        for (name, last, now, want) in cases {
            assert_eq!(resend_due(&p(last), t(now)), want, "{name}");
        }
    }

    #[test]
    fn pending_launch_carries_the_unique_key() {
        let spec = LaunchSpec::unique(
            "k9",
            [("color".to_string(), "red".to_string())]
                .into_iter()
                .collect(),
        );
        let p = pending_launch("web", "l-1".into(), vec!["n-1".into()], &spec, t(3));
        assert_eq!(p.vars.get(UNIQUE_KEY_VAR).map(String::as_str), Some("k9"));
        assert_eq!(p.vars.get("color").map(String::as_str), Some("red"));
        assert_eq!((p.created, p.last_sent), (t(3), None));
    }

    #[test]
    fn remember_keeps_the_last_decisions() {
        let s = state(vec![]);
        let c = launch(1);
        let p = plan(&s, &c, false);
        let mut d = VecDeque::new();
        for i in 0..5 {
            remember(
                &mut d,
                decision_record(&s, &format!("e{i}"), &c, &p, false, vec![]),
                3,
            );
        }
        let engines: Vec<&str> = d.iter().map(|r| r.engine.as_str()).collect();
        assert_eq!(engines, vec!["e2", "e3", "e4"]);
    }

    #[test]
    fn undo_partial_puts_the_old_config_back() {
        let conf = |j: Value| EngineConfig::from_json(j).expect("conf");
        #[rustfmt::skip]
        let cases = [
            ("a changed key gets its old value", serde_json::json!({"n": 3}), serde_json::json!({"n": 5})),
            ("an added key is removed",          serde_json::json!({"n": 3}), serde_json::json!({"m": 1})),
            ("a removed key comes back",         serde_json::json!({"n": 3, "m": 1}), serde_json::json!({"m": null})),
            ("untouched keys stay",              serde_json::json!({"n": 3, "k": "x"}), serde_json::json!({"n": 4})),
        ];
        for (name, current, partial) in cases {
            let (current, partial) = (conf(current), conf(partial));
            let undo = undo_partial(&current, &partial);
            assert_eq!(current.merged(&partial).merged(&undo), current, "{name}");
        }
    }
}
