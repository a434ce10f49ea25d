//! `terminate_nodes`, `terminate_all`, and sending terminations to the IaaS (for nodes
//! and for zombies).
//!
//! A node is stored TERMINATING before its termination is sent, *because* a crash in
//! between must leave a record that the next start sends again. When a termination is
//! sent is remembered on the clock (`Memory::last_terminate`), so the poll resends only
//! what is due.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use epu_core::backoff::retry;
use epu_core::store::StoreError;
use epu_core::telemetry::events;
use epu_core::wire::{ReplyError, Service};
use epu_model::messages::{
    FailReason, NodeRecord, TerminateAllReply, TerminateNodesReply, TerminateNodesRequest,
};
use epu_model::NodeState;

use super::reconcile::zombie_key;
use super::state::State;
use super::Inner;
use crate::driver::{IaasDriver, IaasError, InstanceRef, TerminateOutcome};
use crate::record::{node_key, StoredNode, Update, META_ENABLED};

/// How many instances one `terminate` call asks for.
const TERMINATE_CHUNK: usize = 1000;

/// `terminate_nodes`/`terminate_all` skip a node whose termination was sent less than
/// this long ago.
fn recent() -> TimeDelta {
    TimeDelta::seconds(1)
}

impl Inner {
    /// One `terminate` call, timed, retried on retryable errors with the shared backoff.
    async fn terminate_with_retry(
        &self,
        drv: &dyn IaasDriver,
        chunk: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError> {
        retry(
            &self.settings.backoff,
            self.settings.max_attempts,
            |e: &IaasError| e.is_retryable(),
            || async move {
                self.timed(drv.name(), "terminate", drv.terminate(chunk))
                    .await
            },
        )
        .await
    }

    /// Sends terminations (with retries) and records the instances that are gone.
    pub(super) async fn terminate_instances(&self, driver_name: &str, refs: Vec<InstanceRef>) {
        let Some(driver) = self.deps.drivers.get(driver_name).cloned() else {
            tracing::warn!(driver = driver_name, "cannot terminate: driver not enabled");
            return;
        };
        {
            let mut st = self.state.lock().await;
            let now = self.deps.clock.now();
            for r in &refs {
                st.memory.last_terminate.insert(r.node_id.clone(), now);
            }
        }
        for chunk in refs.chunks(TERMINATE_CHUNK) {
            self.deps
                .metrics
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
            match self.terminate_with_retry(driver.as_ref(), chunk).await {
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

    /// Terminates live instances of the run that no record claims.
    pub(super) async fn terminate_zombies(&self, driver_name: &str, zombies: Vec<InstanceRef>) {
        let Some(driver) = self.deps.drivers.get(driver_name).cloned() else {
            return;
        };
        {
            let mut st = self.state.lock().await;
            let now = self.deps.clock.now();
            for z in &zombies {
                st.memory.last_terminate.insert(zombie_key(&z.iaas_id), now);
            }
        }
        for z in &zombies {
            tracing::warn!(
                event = events::ZOMBIE_TERMINATED,
                driver = driver_name,
                iaas_id = %z.iaas_id,
                node_id = %z.node_id,
                run = %self.settings.run,
                "an instance of this run that no record claims: terminating it"
            );
        }
        let m = &self.deps.metrics;
        m.zombies
            .with_label_values(&[driver_name])
            .inc_by(zombies.len() as u64);
        m.terminations
            .with_label_values(&[driver_name])
            .inc_by(zombies.len() as u64);
        for chunk in zombies.chunks(TERMINATE_CHUNK) {
            if let Err(e) = self.terminate_with_retry(driver.as_ref(), chunk).await {
                tracing::warn!(driver = driver_name, error = %e, "zombie terminate failed; the poll tries again");
            }
        }
    }

    /// `terminate_nodes`: stores the terminable nodes as TERMINATING, answers, and sends
    /// the terminations in the background.
    pub(super) async fn terminate_nodes(
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
        if let Some(domain) = req.domain.as_deref().filter(|_| !unknown.is_empty()) {
            self.bury(&mut st, domain, &unknown).await.map_err(|e| {
                ReplyError::internal(format!("cannot store the tombstones of {unknown:?}: {e}"))
            })?;
        }
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

    /// Records a tombstone for each of `ids` (not known here: their launch has not
    /// arrived, or never will): TERMINATED, `CANCELLED`, stored and published, so
    /// a `provision` that arrives later does not start them.
    async fn bury(
        &self,
        st: &mut State,
        domain: &str,
        ids: &[String],
    ) -> Result<(), crate::error::ProvisionerError> {
        let now = self.deps.clock.now();
        let mut graves: Vec<StoredNode> = ids
            .iter()
            .map(|id| {
                StoredNode::for_controller(tombstone(self.settings.run.as_str(), domain, id, now))
            })
            .collect();
        let mut items = vec![st.stamp(graves.iter_mut())];
        for g in &graves {
            let key = node_key(&g.record.node_id);
            let bytes = serde_json::to_vec(g).map_err(|source| StoreError::Encode {
                tree: crate::record::TREE.to_string(),
                key: key.clone(),
                source,
            })?;
            items.push((key, bytes));
        }
        self.store_batch(items).await?;
        for g in graves {
            tracing::info!(event = "launch_cancelled", domain, node_id = %g.record.node_id, "terminated before its launch arrived: a tombstone keeps it from starting");
            super::state::log_state(&g.record);
            self.outbox.send(Service::Controller, g.record.clone());
            st.put_node(g);
        }
        self.deps.metrics.set_node_counts(&st.counts);
        Ok(())
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
        let now = self.deps.clock.now();
        for id in ids {
            let Some(n) = st.nodes.get(id) else { continue };
            if n.record.state != NodeState::Terminating {
                continue;
            }
            match &n.record.iaas_id {
                Some(iaas) => {
                    let sent_recently = st
                        .memory
                        .last_terminate
                        .get(id)
                        .is_some_and(|t| now - *t < recent());
                    if !sent_recently {
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

    /// `terminate_all`: disables provisioning (stored), stores every terminable node as
    /// TERMINATING, answers, and in the background sends the terminations and sweeps the
    /// IaaS for anything else of the run.
    pub(super) async fn terminate_all(&self) -> Result<TerminateAllReply, ReplyError> {
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
        self.deps.metrics.enabled.set(0);
        let by_driver = self.after_terminating(&mut st, &ids).await;
        let remaining = st.remaining();
        st.terminate_all_pending = remaining > 0;
        drop(st);
        tracing::warn!(
            event = events::TERMINATE_ALL_STARTED,
            run = %self.settings.run,
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
}

/// The tombstone of node `id`: TERMINATED before any launch of it arrived.
pub(super) fn tombstone(run: &str, domain: &str, id: &str, now: DateTime<Utc>) -> NodeRecord {
    NodeRecord {
        node_id: id.to_string(),
        launch_id: String::new(),
        domain: domain.to_string(),
        run: run.to_string(),
        driver: String::new(),
        iaas_id: None,
        addresses: Vec::new(),
        state: NodeState::Terminated,
        reason: Some(FailReason::Cancelled),
        reason_detail: Some(
            "terminated before its launch reached the provisioner; a later provision does not start it"
                .to_string(),
        ),
        state_times: BTreeMap::from([(NodeState::Terminated, now)]),
        vars: BTreeMap::new(),
        revision: 0,
    }
}

/// A tombstone (not a node that ran and ended).
pub(super) fn is_tombstone(r: &NodeRecord) -> bool {
    r.reason == Some(FailReason::Cancelled) && r.launch_id.is_empty()
}
