//! Reconciliation: recovery on start, the poll loop, driver events, and the pure
//! [`plan`] that compares one driver's listing with the records.
//!
//! [`plan`] is a function of (records, driver, listing, [`Memory`], [`Rules`], now) →
//! [`Plan`]. It reads no clock and changes nothing; [`Inner::reconcile_once`] takes `now`
//! from the provisioner's clock, applies the plan's memory changes, commits its updates,
//! and sends its terminations. The rules, for each record of the driver that has an IaaS
//! id (an instance listed with another incarnation counts as not listed):
//!
//! 1. **Listed alive.** A finished or TERMINATING record: its termination is sent again
//!    if due (none sent, or the last one `resend_after` ago). Otherwise the listed state
//!    moves the node forward (PENDING, RUNNING; STOPPING → RUNNING_FAILED), and new
//!    addresses are recorded.
//! 2. **Listed terminated.** TERMINATING → TERMINATED; any other live record → FAILED,
//!    with the IaaS's failure if it gives one, else NODE_DISAPPEARED.
//! 3. **Not listed.** TERMINATING → TERMINATED; a live record is remembered as missing
//!    and FAILED with NODE_DISAPPEARED once missing for `grace` (at the first poll if
//!    the grace is zero). A finished record is left alone.
//!
//! A listed live instance that no record of the driver names is a zombie (terminated if
//! due), unless a launch that may still produce instances claims it: one in flight, or
//! one with a node still waiting for its instance (by launch id or node id), *because*
//! its launch result may not be recorded yet and terminating it would kill a node about
//! to be born.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use epu_model::messages::FailReason;
use epu_model::NodeState;

use super::state::State;
use super::Inner;
use crate::driver::{DriverEvent, InstanceRef, InstanceState, ListedInstance};
use crate::record::{awaits_launch, StoredNode, Update};

/// The reconciler's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rules {
    /// How long a live node's instance may go unlisted before it is FAILED
    /// (`disappear_grace_secs`).
    pub(super) grace: TimeDelta,
    /// How long after a termination was sent it is sent again (terminate grace plus two
    /// polls, at least 10 s).
    pub(super) resend_after: TimeDelta,
}

/// What the reconciler remembers between polls, on the provisioner's clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Memory {
    /// Node id → when the IaaS was first seen not to list its instance.
    pub(super) missing_since: HashMap<String, DateTime<Utc>>,
    /// Node id (or [`zombie_key`]) → when its termination was last sent.
    pub(super) last_terminate: HashMap<String, DateTime<Utc>>,
}

impl Memory {
    /// A termination of `key` is due: none was sent, or the last one `after` ago.
    fn due(&self, key: &str, after: TimeDelta, now: DateTime<Utc>) -> bool {
        self.last_terminate
            .get(key)
            .is_none_or(|t| now - *t >= after)
    }
}

/// The key of a zombie's termination in [`Memory::last_terminate`].
pub(super) fn zombie_key(iaas_id: &str) -> String {
    format!("zombie:{iaas_id}")
}

/// The part of [`State`] the plan reads.
#[derive(Clone, Copy)]
pub(super) struct Records<'a> {
    pub(super) nodes: &'a HashMap<String, StoredNode>,
    /// Launches whose IaaS call is being made.
    pub(super) in_flight: &'a HashSet<String>,
}

impl<'a> Records<'a> {
    pub(super) fn of(st: &'a State) -> Self {
        Records {
            nodes: &st.nodes,
            in_flight: &st.in_flight,
        }
    }

    /// The launch ids that may still produce instances, and the nodes that wait for one.
    fn claims(&self) -> (HashSet<&'a str>, HashSet<&'a str>) {
        let mut launches: HashSet<&str> = self.in_flight.iter().map(String::as_str).collect();
        let mut nodes = HashSet::new();
        for n in self.nodes.values() {
            if awaits_launch(&n.record) {
                launches.insert(n.record.launch_id.as_str());
                nodes.insert(n.record.node_id.as_str());
            }
        }
        (launches, nodes)
    }
}

/// What one poll of one driver should do (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Record changes, to commit.
    pub(super) updates: Vec<Update>,
    /// Terminations to send (again) for recorded nodes.
    pub(super) terminate: Vec<InstanceRef>,
    /// Live instances of the run that nothing claims.
    pub(super) zombies: Vec<InstanceRef>,
    /// Nodes accounted for (or failed as disappeared): forget when they went missing.
    pub(super) found: Vec<String>,
    /// Nodes not listed, within the grace: missing since now unless already missing.
    pub(super) missing: Vec<String>,
}

impl Plan {
    /// Applies the plan's changes to the reconciler's memory at `now` (the `now` it was
    /// planned at).
    pub(super) fn remember(&self, memory: &mut Memory, now: DateTime<Utc>) {
        for id in &self.found {
            memory.missing_since.remove(id);
        }
        for id in &self.missing {
            memory.missing_since.entry(id.clone()).or_insert(now);
        }
    }
}

/// Compares `driver`'s listing with the records (see the module docs). Pure: every time
/// is `now` or in `memory`.
pub(super) fn plan(
    records: Records<'_>,
    driver: &str,
    listed: &[ListedInstance],
    memory: &Memory,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Plan {
    let by_id: HashMap<&str, &ListedInstance> =
        listed.iter().map(|i| (i.iaas_id.as_str(), i)).collect();
    let mut plan = Plan::default();
    let mut known: HashSet<&str> = HashSet::new();
    for n in records.nodes.values() {
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
                plan.found.push(node_id.to_string());
                if rec.state.is_terminal() || rec.state == NodeState::Terminating {
                    if memory.due(node_id, rules.resend_after, now) {
                        plan.terminate.push(r());
                    }
                    continue;
                }
                if let Some(u) = listed_alive(n, i) {
                    plan.updates.push(u);
                }
            }
            Some(i) => {
                plan.found.push(node_id.to_string());
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
            None if rec.state.is_terminal() => plan.found.push(node_id.to_string()),
            None if rec.state == NodeState::Terminating => {
                plan.found.push(node_id.to_string());
                plan.updates.push(
                    Update::state(node_id, NodeState::Terminated)
                        .with_detail("no longer listed by the IaaS"),
                );
            }
            None => {
                let since = memory.missing_since.get(node_id).copied().unwrap_or(now);
                if now - since >= rules.grace {
                    plan.updates.push(Update::failed(
                        node_id,
                        FailReason::NodeDisappeared,
                        format!(
                            "not listed by the IaaS for {} s (disappear_grace_secs)",
                            (now - since).num_seconds()
                        ),
                    ));
                    plan.found.push(node_id.to_string());
                } else {
                    plan.missing.push(node_id.to_string());
                }
            }
        }
    }
    let (claimed_launches, awaiting_nodes) = records.claims();
    for i in listed {
        if !i.is_alive() || known.contains(i.iaas_id.as_str()) {
            continue;
        }
        let claimed = i
            .launch_id
            .as_deref()
            .is_some_and(|l| claimed_launches.contains(l))
            || i.node_id
                .as_deref()
                .is_some_and(|n| awaiting_nodes.contains(n));
        if claimed || !memory.due(&zombie_key(&i.iaas_id), rules.resend_after, now) {
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

/// The update for a live, unfinished node whose instance is listed alive: its listed
/// state if later, or its new addresses; `None` if neither.
fn listed_alive(n: &StoredNode, i: &ListedInstance) -> Option<Update> {
    let rec = &n.record;
    let target = match i.state {
        InstanceState::Pending => NodeState::Pending,
        InstanceState::Running => NodeState::Running,
        InstanceState::Stopping => NodeState::RunningFailed,
        InstanceState::Terminated => return None,
    };
    let mut u = Update::state(&rec.node_id, target);
    if target == NodeState::RunningFailed {
        u.detail =
            Some("the IaaS reports the instance stopping or stopped without being asked".into());
    }
    u.addresses = Some(i.addresses.clone());
    let moves = target > rec.state || (!i.addresses.is_empty() && i.addresses != rec.addresses);
    moves.then_some(u)
}

/// What a restart must do about the records it loaded.
#[derive(Debug, Default, PartialEq)]
struct Recovery {
    /// Instances of live records, by driver, for the drivers to re-attach to.
    adopt: BTreeMap<String, Vec<InstanceRef>>,
    /// Launches with nodes still waiting for an instance (or TERMINATING without one).
    redrive: Vec<String>,
    /// Instances of TERMINATING records, by driver, to terminate again.
    resend: BTreeMap<String, Vec<InstanceRef>>,
}

fn recovery(st: &State) -> Recovery {
    let mut out = Recovery::default();
    for n in st.nodes.values() {
        let rec = &n.record;
        let Some(id) = &rec.iaas_id else { continue };
        let r = InstanceRef {
            node_id: rec.node_id.clone(),
            iaas_id: id.clone(),
            incarnation: n.incarnation.clone(),
        };
        if rec.state == NodeState::Terminating {
            out.resend
                .entry(rec.driver.clone())
                .or_default()
                .push(r.clone());
        }
        if !rec.state.is_terminal() {
            out.adopt.entry(rec.driver.clone()).or_default().push(r);
        }
    }
    for l in st.launches.values() {
        let pending = l.node_ids.iter().any(|id| {
            st.nodes.get(id).is_some_and(|n| {
                awaits_launch(&n.record)
                    || (n.record.iaas_id.is_none() && n.record.state == NodeState::Terminating)
            })
        });
        if pending {
            out.redrive.push(l.launch_id.clone());
        }
    }
    out
}

/// A driver's exit report as an update: TERMINATED if it was asked to go, FAILED with
/// PROCESS_EXITED if not, nothing if the record is finished.
pub(super) fn exit_update(state: NodeState, node_id: &str, detail: &str) -> Option<Update> {
    if state == NodeState::Terminating {
        Some(Update::state(node_id, NodeState::Terminated).with_detail(detail))
    } else if state.is_terminal() {
        None
    } else {
        Some(Update::failed(node_id, FailReason::ProcessExited, detail))
    }
}

impl Inner {
    /// At start, after loading: drivers adopt the instances the store knows, unfinished
    /// launches are re-driven with their tokens, TERMINATING nodes are terminated again.
    pub(super) async fn recover(self: &Arc<Self>) {
        let Recovery {
            adopt,
            redrive,
            resend,
        } = recovery(&*self.state.lock().await);
        for (driver, refs) in adopt {
            if let Some(d) = self.deps.drivers.get(&driver) {
                d.adopt(&refs).await;
            }
        }
        if !redrive.is_empty() {
            tracing::info!(
                launches = redrive.len(),
                "re-driving launches left unfinished by the last run"
            );
            let mut st = self.state.lock().await;
            for id in &redrive {
                st.in_flight.insert(id.clone());
            }
        }
        for id in redrive {
            let me = self.clone();
            self.spawn(async move { me.drive_launch(id).await });
        }
        for (driver, refs) in resend {
            let me = self.clone();
            self.spawn(async move { me.terminate_instances(&driver, refs).await });
        }
    }

    /// One task per driver with events: each exit is handled at once.
    pub(super) fn watch_driver_events(self: &Arc<Self>) {
        for (name, driver) in self.deps.drivers.iter() {
            let Some(mut rx) = driver.take_events() else {
                continue;
            };
            let me = self.clone();
            let name = name.clone();
            let mut stopping = self.life.stopping.subscribe();
            self.spawn(async move {
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

    /// A driver event: an exit of the node's current instance ends the node; an exit
    /// before the launch result recorded the instance is kept for `record_launch`.
    async fn on_event(&self, driver: &str, ev: DriverEvent) {
        let DriverEvent::Exited {
            node_id,
            iaas_id,
            incarnation,
            detail,
        } = ev;
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

    /// Reconciles every `poll_interval` until the provisioner stops.
    pub(super) async fn poll_loop(self: Arc<Self>) {
        let mut stopping = self.life.stopping.subscribe();
        let mut pruned_at: Option<DateTime<Utc>> = None;
        loop {
            self.reconcile_once().await;
            // Pruning runs on the clock (a tenth of the retention, at most a minute
            // apart), so the manual clock drives it in tests.
            let now = self.deps.clock.now();
            let every = (self.settings.retention / 10).min(TimeDelta::seconds(60));
            if pruned_at.is_none_or(|t| now - t >= every) {
                self.prune_once().await;
                pruned_at = Some(now);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stopping.changed() => return,
            }
        }
    }

    /// Lists each driver's instances of the run and carries out the [`plan`].
    pub(super) async fn reconcile_once(&self) {
        let run = &self.settings.run;
        for (name, driver) in self.deps.drivers.iter() {
            let listed = match self.timed(name, "list", driver.list(run)).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(driver = %name, error = %e, "cannot list the IaaS; reconciling next time");
                    continue;
                }
            };
            let (terminate, zombies) = {
                let mut st = self.state.lock().await;
                let now = self.deps.clock.now();
                let plan = plan(
                    Records::of(&st),
                    name,
                    &listed,
                    &st.memory,
                    &self.settings.rules,
                    now,
                );
                for r in &plan.terminate {
                    if let Some(n) = st.nodes.get(&r.node_id) {
                        if n.record.state.is_terminal() {
                            tracing::warn!(node_id = %r.node_id, iaas_id = %r.iaas_id, state = %n.record.state, "the instance of a finished node is still alive; terminating it");
                        }
                    }
                }
                plan.remember(&mut st.memory, now);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use epu_core::clock::{Clock, ManualClock};
    use epu_core::wire::Service;
    use epu_model::messages::Deployable;
    use std::time::Duration;

    use crate::driver::InstanceFailure;
    use crate::record::StoredLaunch;
    use crate::service::state::reason_str;
    use NodeState::*;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    /// Grace 30 s, resend after 20 s.
    fn rules() -> Rules {
        Rules {
            grace: TimeDelta::seconds(30),
            resend_after: TimeDelta::seconds(20),
        }
    }

    /// Node `id` of `launch` on the `sim` driver.
    fn named(id: &str, launch: &str, state: NodeState, iaas: Option<&str>) -> StoredNode {
        let mut b = epu_testkit::records::node("d", id)
            .run("r")
            .launch(launch)
            .state(state);
        if let Some(i) = iaas {
            b = b.iaas(i);
        }
        let mut rec = b.build();
        rec.state_times.clear();
        StoredNode::for_controller(rec)
    }

    /// Node `n1` of launch `l1`.
    fn node(state: NodeState, iaas: Option<&str>) -> StoredNode {
        named("n1", "l1", state, iaas)
    }

    fn inc(mut n: StoredNode, incarnation: &str) -> StoredNode {
        n.incarnation = Some(incarnation.into());
        n
    }

    fn on(mut n: StoredNode, driver: &str) -> StoredNode {
        n.record.driver = driver.into();
        n
    }

    /// `n1`'s instance as listed.
    fn listed(iaas: &str, state: InstanceState) -> ListedInstance {
        ListedInstance {
            iaas_id: iaas.into(),
            incarnation: None,
            node_id: Some("n1".into()),
            launch_id: Some("l1".into()),
            state,
            addresses: Vec::new(),
            failure: None,
        }
    }

    fn at(mut i: ListedInstance, addr: &str) -> ListedInstance {
        i.addresses = vec![addr.into()];
        i
    }

    fn linc(mut i: ListedInstance, incarnation: &str) -> ListedInstance {
        i.incarnation = Some(incarnation.into());
        i
    }

    fn failing(mut i: ListedInstance, reason: FailReason) -> ListedInstance {
        i.failure = Some(InstanceFailure {
            reason,
            detail: "boom".into(),
        });
        i
    }

    /// A live instance no record names, tagged with `node` and `launch`.
    fn stray(iaas: &str, node: Option<&str>, launch: Option<&str>) -> ListedInstance {
        ListedInstance {
            node_id: node.map(str::to_string),
            launch_id: launch.map(str::to_string),
            ..listed(iaas, InstanceState::Running)
        }
    }

    /// Memory: nodes missing since, terminations sent at (seconds).
    fn mem(missing: &[(&str, i64)], sent: &[(&str, i64)]) -> Memory {
        Memory {
            missing_since: missing
                .iter()
                .map(|(k, s)| (k.to_string(), t(*s)))
                .collect(),
            last_terminate: sent.iter().map(|(k, s)| (k.to_string(), t(*s))).collect(),
        }
    }

    fn by_id(nodes: Vec<StoredNode>) -> HashMap<String, StoredNode> {
        nodes
            .into_iter()
            .map(|n| (n.record.node_id.clone(), n))
            .collect()
    }

    /// The plan as sorted lines: `n1 -> STATE [REASON] [at ADDRS]`, `terminate ID`,
    /// `zombie ID`, `found N`, `missing N`.
    fn summary(p: &Plan) -> Vec<String> {
        let mut out = Vec::new();
        for u in &p.updates {
            let mut s = format!(
                "{} -> {}",
                u.node_id,
                u.state.map_or("-", NodeState::as_str)
            );
            if u.reason.is_some() {
                s = format!("{s} {}", reason_str(u.reason));
            }
            if let Some(a) = u.addresses.as_ref().filter(|a| !a.is_empty()) {
                s = format!("{s} at {}", a.join(","));
            }
            out.push(s);
        }
        out.extend(
            p.terminate
                .iter()
                .map(|r| format!("terminate {}", r.iaas_id)),
        );
        out.extend(p.zombies.iter().map(|r| format!("zombie {}", r.iaas_id)));
        out.extend(p.found.iter().map(|n| format!("found {n}")));
        out.extend(p.missing.iter().map(|n| format!("missing {n}")));
        out.sort();
        out
    }

    /// (name, records, launches in flight, the `sim` listing, memory, now, the plan).
    type Case = (
        &'static str,
        Vec<StoredNode>,
        &'static [&'static str],
        Vec<ListedInstance>,
        Memory,
        i64,
        &'static [&'static str],
    );

    /// Grace 30 s, resend after 20 s, now = 100 s unless a case says otherwise.
    #[test]
    fn table() {
        use InstanceState as I;
        let none = Memory::default;
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // listed alive: the IaaS's state moves the node forward
            ("listed PENDING while REQUESTED → PENDING",     vec![node(Requested, Some("i-1"))], &[], vec![listed("i-1", I::Pending)], none(), 100, &["found n1", "n1 -> PENDING"]),
            ("listed RUNNING while PENDING → RUNNING",       vec![node(Pending, Some("i-1"))], &[], vec![listed("i-1", I::Running)], none(), 100, &["found n1", "n1 -> RUNNING"]),
            ("listed RUNNING while RUNNING → nothing",       vec![node(Running, Some("i-1"))], &[], vec![listed("i-1", I::Running)], none(), 100, &["found n1"]),
            ("listed PENDING while RUNNING → no step back",  vec![node(Running, Some("i-1"))], &[], vec![listed("i-1", I::Pending)], none(), 100, &["found n1"]),
            ("new addresses → recorded",                     vec![node(Running, Some("i-1"))], &[], vec![at(listed("i-1", I::Running), "10.0.0.1")], none(), 100, &["found n1", "n1 -> RUNNING at 10.0.0.1"]),
            ("listed STOPPING unasked → RUNNING_FAILED",     vec![node(Running, Some("i-1"))], &[], vec![listed("i-1", I::Stopping)], none(), 100, &["found n1", "n1 -> RUNNING_FAILED"]),
            ("found clears missing memory",                  vec![node(Running, Some("i-1"))], &[], vec![listed("i-1", I::Running)], mem(&[("n1", 90)], &[]), 100, &["found n1"]),
            // listed alive, but asked to go (or finished): resend when due
            ("TERMINATING alive, never sent → terminate",    vec![node(Terminating, Some("i-1"))], &[], vec![listed("i-1", I::Running)], none(), 100, &["found n1", "terminate i-1"]),
            ("TERMINATING alive, sent 19 s ago → not due",   vec![node(Terminating, Some("i-1"))], &[], vec![listed("i-1", I::Running)], mem(&[], &[("n1", 81)]), 100, &["found n1"]),
            ("TERMINATING alive, sent 20 s ago → resend",    vec![node(Terminating, Some("i-1"))], &[], vec![listed("i-1", I::Running)], mem(&[], &[("n1", 80)]), 100, &["found n1", "terminate i-1"]),
            ("terminal record listed alive → terminate",     vec![node(Terminated, Some("i-1"))], &[], vec![listed("i-1", I::Running)], none(), 100, &["found n1", "terminate i-1"]),
            ("FAILED listed alive, sent just now → not due", vec![node(Failed, Some("i-1"))], &[], vec![listed("i-1", I::Pending)], mem(&[], &[("n1", 100)]), 100, &["found n1"]),
            // listed terminated
            ("TERMINATING listed terminated → TERMINATED",   vec![node(Terminating, Some("i-1"))], &[], vec![listed("i-1", I::Terminated)], none(), 100, &["found n1", "n1 -> TERMINATED"]),
            ("terminated with the IaaS's reason → FAILED",   vec![node(Running, Some("i-1"))], &[], vec![failing(listed("i-1", I::Terminated), FailReason::SimulatedFailure)], none(), 100, &["found n1", "n1 -> FAILED SIMULATED_FAILURE"]),
            ("terminated unasked → FAILED NODE_DISAPPEARED", vec![node(Pending, Some("i-1"))], &[], vec![listed("i-1", I::Terminated)], none(), 100, &["found n1", "n1 -> FAILED NODE_DISAPPEARED"]),
            ("terminal record listed terminated → left",     vec![node(Failed, Some("i-1"))], &[], vec![listed("i-1", I::Terminated)], none(), 100, &["found n1"]),
            // not listed
            ("not listed, first time → remembered",          vec![node(Running, Some("i-1"))], &[], vec![], none(), 100, &["missing n1"]),
            ("not listed within grace (29 s) → left",        vec![node(Running, Some("i-1"))], &[], vec![], mem(&[("n1", 71)], &[]), 100, &["missing n1"]),
            ("not listed past grace (30 s) → FAILED",        vec![node(Running, Some("i-1"))], &[], vec![], mem(&[("n1", 70)], &[]), 100, &["found n1", "n1 -> FAILED NODE_DISAPPEARED"]),
            ("clock behind missing_since → left",            vec![node(Running, Some("i-1"))], &[], vec![], mem(&[("n1", 200)], &[]), 100, &["missing n1"]),
            ("TERMINATING not listed → TERMINATED",          vec![node(Terminating, Some("i-1"))], &[], vec![], none(), 100, &["found n1", "n1 -> TERMINATED"]),
            ("terminal not listed → left",                   vec![node(Terminated, Some("i-1"))], &[], vec![], none(), 100, &["found n1"]),
            // incarnations: a mismatch is another instance under a reused id
            ("incarnation mismatch → not listed, no zombie", vec![inc(node(Running, Some("i-1")), "a")], &[], vec![linc(listed("i-1", I::Running), "b")], none(), 100, &["missing n1"]),
            ("incarnation match → listed",                   vec![inc(node(Pending, Some("i-1")), "a")], &[], vec![linc(listed("i-1", I::Running), "a")], none(), 100, &["found n1", "n1 -> RUNNING"]),
            ("incarnation unknown on one side → listed",     vec![node(Pending, Some("i-1"))], &[], vec![linc(listed("i-1", I::Running), "b")], none(), 100, &["found n1", "n1 -> RUNNING"]),
            // records the plan does not judge
            ("awaiting launch (no instance) → not judged",   vec![node(Requesting, None)], &[], vec![], none(), 100, &[]),
            ("another driver's record → not judged",         vec![on(node(Running, Some("i-1")), "ec2")], &[], vec![], none(), 100, &[]),
            // instances no record names
            ("unclaimed live instance → zombie",             vec![], &[], vec![stray("i-9", Some("n9"), Some("l9"))], none(), 100, &["zombie i-9"]),
            ("untagged live instance → zombie",              vec![], &[], vec![stray("i-9", None, None)], none(), 100, &["zombie i-9"]),
            ("unclaimed terminated instance → left",         vec![], &[], vec![ListedInstance { node_id: None, ..listed("i-9", I::Terminated) }], none(), 100, &[]),
            ("claimed by an in-flight launch → left",        vec![], &["l9"], vec![stray("i-9", Some("n9"), Some("l9"))], none(), 100, &[]),
            ("claimed by a launch with a waiting node → left", vec![named("n2", "l9", Requesting, None)], &[], vec![stray("i-9", Some("n9"), Some("l9"))], none(), 100, &[]),
            ("claimed by a waiting node id → left",          vec![named("n9", "l1", ErrorRetrying, None)], &[], vec![stray("i-9", Some("n9"), Some("other"))], none(), 100, &[]),
            ("a launch whose nodes all have instances claims nothing", vec![named("n2", "l9", Pending, Some("i-2"))], &[], vec![stray("i-9", Some("n9"), Some("l9"))], none(), 100, &["missing n2", "zombie i-9"]),
            ("zombie sent 19 s ago → not due",               vec![], &[], vec![stray("i-9", None, None)], mem(&[], &[("zombie:i-9", 81)]), 100, &[]),
            ("zombie sent 20 s ago → again",                 vec![], &[], vec![stray("i-9", None, None)], mem(&[], &[("zombie:i-9", 80)]), 100, &["zombie i-9"]),
            ("a node's resend time is not a zombie's",       vec![], &[], vec![stray("i-9", Some("n1"), None)], mem(&[], &[("n1", 100)]), 100, &["zombie i-9"]),
        ];
        for (name, nodes, in_flight, listing, memory, now, want) in cases {
            let nodes = by_id(nodes);
            let in_flight: HashSet<String> = in_flight.iter().map(|s| s.to_string()).collect();
            let records = Records {
                nodes: &nodes,
                in_flight: &in_flight,
            };
            let p = plan(records, "sim", &listing, &memory, &rules(), t(now));
            assert_eq!(summary(&p), want.to_vec(), "{name}");
        }
    }

    #[test]
    fn a_zero_grace_fails_an_unlisted_node_at_the_first_poll() {
        let nodes = by_id(vec![node(Running, Some("i-1"))]);
        let in_flight = HashSet::new();
        let records = Records {
            nodes: &nodes,
            in_flight: &in_flight,
        };
        let zero = Rules {
            grace: TimeDelta::zero(),
            ..rules()
        };
        let p = plan(records, "sim", &[], &Memory::default(), &zero, t(0));
        assert_eq!(summary(&p), ["found n1", "n1 -> FAILED NODE_DISAPPEARED"]);
    }

    #[test]
    fn details_say_why() {
        let nodes = by_id(vec![node(Running, Some("i-1"))]);
        let in_flight = HashSet::new();
        let records = Records {
            nodes: &nodes,
            in_flight: &in_flight,
        };
        let memory = mem(&[("n1", 0)], &[]);
        let p = plan(records, "sim", &[], &memory, &rules(), t(45));
        assert_eq!(
            p.updates[0].detail.as_deref(),
            Some("not listed by the IaaS for 45 s (disappear_grace_secs)")
        );
        let stopping = [listed("i-1", InstanceState::Stopping)];
        let p = plan(records, "sim", &stopping, &memory, &rules(), t(45));
        assert_eq!(
            p.updates[0].detail.as_deref(),
            Some("the IaaS reports the instance stopping or stopped without being asked")
        );
    }

    /// Plan, remember, move the manual clock, plan again: what the poll loop does.
    #[test]
    fn a_vanished_node_fails_after_the_grace_on_the_manual_clock() {
        let clock = ManualClock::new(t(0));
        let nodes = by_id(vec![node(Running, Some("i-1"))]);
        let in_flight = HashSet::new();
        let records = Records {
            nodes: &nodes,
            in_flight: &in_flight,
        };
        let mut memory = Memory::default();
        let mut poll = |listing: &[ListedInstance]| {
            let now = clock.now();
            let p = plan(records, "sim", listing, &memory, &rules(), now);
            p.remember(&mut memory, now);
            (summary(&p), memory.clone())
        };
        let (s, m) = poll(&[]);
        assert_eq!(s, ["missing n1"]);
        assert_eq!(m.missing_since.get("n1"), Some(&t(0)));
        clock.advance(Duration::from_secs(20));
        let (s, m) = poll(&[]);
        assert_eq!(s, ["missing n1"]);
        assert_eq!(
            m.missing_since.get("n1"),
            Some(&t(0)),
            "the first miss counts"
        );
        // Listed again within the grace: forgotten, and the grace starts over.
        let (s, m) = poll(&[listed("i-1", InstanceState::Running)]);
        assert_eq!(s, ["found n1"]);
        assert!(m.missing_since.is_empty());
        clock.advance(Duration::from_secs(20));
        let (s, m) = poll(&[]);
        assert_eq!(s, ["missing n1"]);
        assert_eq!(m.missing_since.get("n1"), Some(&t(40)));
        clock.advance(Duration::from_secs(30));
        let (s, m) = poll(&[]);
        assert_eq!(s, ["found n1", "n1 -> FAILED NODE_DISAPPEARED"]);
        assert!(m.missing_since.is_empty());
    }

    #[test]
    fn recovery_adopts_live_records_redrives_waiting_launches_and_resends_terminations() {
        let mut st = State::default();
        for n in [
            named("run", "l1", Running, Some("i-1")),
            named("going", "l1", Terminating, Some("i-2")),
            named("done", "l1", Terminated, Some("i-3")),
            named("waiting", "l2", Requesting, None),
            named("cancelled", "l3", Terminating, None),
            named("launched", "l4", Pending, Some("i-4")),
        ] {
            st.put_node(n);
        }
        for (id, nodes) in [
            ("l1", vec!["run", "going", "done"]),
            ("l2", vec!["waiting"]),
            ("l3", vec!["cancelled"]),
            ("l4", vec!["launched"]),
        ] {
            st.launches.insert(
                id.into(),
                StoredLaunch {
                    launch_id: id.into(),
                    domain: "d".into(),
                    token: "tok".into(),
                    deployable: Deployable::Sim(Default::default()),
                    node_ids: nodes.into_iter().map(str::to_string).collect(),
                    vars: BTreeMap::new(),
                    subscriber: Service::Controller,
                    requested_at: t(0),
                },
            );
        }
        let mut r = recovery(&st);
        r.redrive.sort();
        for refs in r.adopt.values_mut() {
            refs.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        }
        let ids = |refs: &[InstanceRef]| -> Vec<String> {
            refs.iter().map(|r| r.iaas_id.clone()).collect()
        };
        assert_eq!(ids(&r.adopt["sim"]), ["i-2", "i-4", "i-1"]);
        assert_eq!(ids(&r.resend["sim"]), ["i-2"]);
        assert_eq!(r.redrive, ["l2", "l3"]);
    }

    #[test]
    fn exits_end_live_nodes_and_leave_finished_ones() {
        let u = exit_update(Terminating, "n1", "killed by signal 15").expect("update");
        assert_eq!((u.state, u.reason), (Some(Terminated), None));
        let u = exit_update(Running, "n1", "exit code 3").expect("update");
        assert_eq!(
            (u.state, u.reason, u.detail.as_deref()),
            (
                Some(Failed),
                Some(FailReason::ProcessExited),
                Some("exit code 3")
            )
        );
        assert_eq!(exit_update(Failed, "n1", "exit code 3"), None);
    }
}
