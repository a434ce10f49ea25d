//! `provision` and the launch path: write-ahead, the IaaS call (retried), and recording
//! what it launched or why it failed.
//!
//! A launch is stored (with its idempotency token) before the IaaS hears of it,
//! *because* a provisioner that crashes mid-call must find the launch at restart and
//! re-drive it with the same token instead of launching twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use epu_core::backoff::retry;
use epu_core::store::StoreError;
use epu_core::telemetry::events;
use epu_core::wire::{ReplyError, Service};
use epu_model::messages::{FailReason, NodeRecord, ProvisionReply, ProvisionRequest};
use epu_model::NodeState;
use uuid::Uuid;

use super::reconcile::exit_update;
use super::state::{log_state, reason_str, State};
use super::terminate::is_tombstone;
use super::Inner;
use crate::config::{command_refusal, Failpoint};
use crate::driver::{
    IaasDriver, IaasError, IaasErrorKind, InstanceRef, InstanceState, LaunchOutcome, LaunchRequest,
};
use crate::record::{
    awaits_launch, launch_key, node_key, parse_subscriber, validate_deployable, validate_shape,
    StoredLaunch, StoredNode, Update, TREE,
};

/// What becomes of a `provision` of good shape.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// Launched.
    Requested,
    /// Refused while the provisioner is disabled (`terminate_all`).
    Disabled,
    /// Refused for what it asks (the reason).
    Refused(String),
}

impl Outcome {
    /// The state, reason and detail its nodes are recorded with.
    fn node_state(&self) -> (NodeState, Option<FailReason>, Option<String>) {
        match self {
            Outcome::Requested => (NodeState::Requesting, None, None),
            Outcome::Disabled => (
                NodeState::Rejected,
                Some(FailReason::ProvisionerDisabled),
                Some(
                    "the provisioner is disabled (terminate_all); send enable to provision again"
                        .into(),
                ),
            ),
            Outcome::Refused(why) => (
                NodeState::Rejected,
                Some(FailReason::RequestRefused),
                Some(why.clone()),
            ),
        }
    }
}

impl Inner {
    /// `provision`: checks the request's shape, answers a known launch id with its
    /// nodes, else stores the launch and its nodes — REQUESTING; REJECTED
    /// (PROVISIONER_DISABLED) while disabled; REJECTED (REQUEST_REFUSED) when the
    /// provisioner refuses what it asks for, which is then also the `bad_request`
    /// answer — and drives a requested launch in the background.
    pub(super) async fn provision(
        &self,
        req: ProvisionRequest,
    ) -> Result<ProvisionReply, ReplyError> {
        let subscriber = self.check_shape(&req)?;
        if req.check_only {
            return self.check_only(&req).map(|()| ProvisionReply {
                launch_id: req.launch_id,
                nodes: Vec::new(),
            });
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
        let refused = self.refusal(&req).err();
        let node_ids: Vec<String> = if req.node_ids.is_empty() {
            (0..req.count).map(|_| Uuid::new_v4().to_string()).collect()
        } else {
            req.node_ids.clone()
        };
        // Nodes terminated before this launch arrived stay terminated.
        let (buried, node_ids): (Vec<String>, Vec<String>) = node_ids
            .into_iter()
            .partition(|id| st.nodes.get(id).is_some_and(|n| is_tombstone(&n.record)));
        if !buried.is_empty() {
            tracing::info!(event = "launch_cancelled", launch_id = %req.launch_id, nodes = ?buried, "provision names nodes already terminated (tombstones): not starting them");
        }
        if node_ids.is_empty() {
            let nodes = buried
                .iter()
                .filter_map(|id| st.nodes.get(id).map(|n| n.record.clone()))
                .collect();
            return Ok(ProvisionReply {
                launch_id: req.launch_id,
                nodes,
            });
        }
        for id in &node_ids {
            if let Some(n) = st.nodes.get(id) {
                return Err(ReplyError::conflict(format!(
                    "node id {id:?} already belongs to launch {:?}",
                    n.record.launch_id
                )));
            }
        }
        let outcome = match (&refused, st.enabled) {
            (Some(why), _) => Outcome::Refused(why.clone()),
            (None, false) => Outcome::Disabled,
            (None, true) => Outcome::Requested,
        };
        let enabled = matches!(outcome, Outcome::Requested);
        let (launch, mut nodes) =
            self.new_launch(&req, subscriber, node_ids, &outcome, self.deps.clock.now());
        let head = st.stamp(nodes.iter_mut());
        // Write-ahead: the launch and its nodes are durable before the IaaS hears of it.
        let mut items = encode_launch(&launch, &nodes)?;
        items.push(head);
        self.store_batch(items).await.map_err(|e| {
            tracing::error!(error = %e, launch_id = %req.launch_id, "cannot store a launch");
            ReplyError::internal(format!("cannot store the launch: {e}"))
        })?;
        let mut records = Vec::with_capacity(nodes.len());
        for n in nodes {
            records.push(n.record.clone());
            log_state(&n.record);
            self.outbox.send(subscriber, n.record.clone());
            st.put_node(n);
        }
        self.deps.metrics.set_node_counts(&st.counts);
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
        } else if let Some(why) = &refused {
            self.deps
                .metrics
                .launches
                .with_label_values(&[driver, "refused"])
                .inc();
            tracing::warn!(
                event = "launch_refused",
                launch_id = %req.launch_id,
                domain = %req.domain,
                reason = "REQUEST_REFUSED",
                detail = %why,
                "provision refused: nodes REJECTED"
            );
        } else {
            self.deps
                .metrics
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
        if let Some(why) = refused {
            return Err(ReplyError::bad_request(why));
        }
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

    /// The checks without which nothing can be recorded: the request's shape and
    /// its subscriber. Returns where `instance_info` goes.
    fn check_shape(&self, req: &ProvisionRequest) -> Result<Service, ReplyError> {
        validate_shape(req).map_err(ReplyError::bad_request)?;
        match &req.subscriber {
            Some(s) => parse_subscriber(s).map_err(ReplyError::bad_request),
            None => Ok(Service::Controller),
        }
    }

    /// Why this provisioner refuses what the request asks to launch, if it does: a
    /// bad deployable, a driver it does not enable, a local command not allowed.
    /// `check_only`: what can be known of a deployable before any launch (its
    /// driver enabled, its command allowed); launch-time checks (template
    /// variables, which depend on the launch's vars) are left to the launch.
    fn check_only(&self, req: &ProvisionRequest) -> Result<(), ReplyError> {
        let driver = req.deployable.driver();
        if self.deps.drivers.get(driver).is_none() {
            return Err(ReplyError::bad_request(format!(
                "driver {driver:?} is not enabled in this provisioner (enabled: {})",
                self.deps.drivers.names().join(", ")
            )));
        }
        match command_refusal(self.settings.allowed_commands.as_deref(), &req.deployable) {
            Some(why) => Err(ReplyError::bad_request(why)),
            None => Ok(()),
        }
    }

    fn refusal(&self, req: &ProvisionRequest) -> Result<(), String> {
        validate_deployable(req)?;
        self.check_only(req).map_err(|e| e.message)
    }

    /// The launch to store (with a fresh token) and its nodes: REQUESTING when
    /// requested, else REJECTED with the outcome's reason.
    fn new_launch(
        &self,
        req: &ProvisionRequest,
        subscriber: Service,
        node_ids: Vec<String>,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> (StoredLaunch, Vec<StoredNode>) {
        let (state, reason, detail) = outcome.node_state();
        let driver = req.deployable.driver();
        let nodes = node_ids
            .iter()
            .map(|id| StoredNode {
                record: NodeRecord {
                    node_id: id.clone(),
                    launch_id: req.launch_id.clone(),
                    domain: req.domain.clone(),
                    run: self.settings.run.to_string(),
                    driver: driver.to_string(),
                    iaas_id: None,
                    addresses: Vec::new(),
                    state,
                    reason,
                    reason_detail: detail.clone(),
                    state_times: BTreeMap::from([(state, now)]),
                    vars: req.vars.clone(),
                    revision: 0,
                },
                subscriber,
                incarnation: None,
            })
            .collect();
        let launch = StoredLaunch {
            launch_id: req.launch_id.clone(),
            domain: req.domain.clone(),
            token: Uuid::new_v4().simple().to_string(),
            deployable: req.deployable.clone(),
            node_ids,
            vars: req.vars.clone(),
            subscriber,
            requested_at: now,
        };
        (launch, nodes)
    }

    /// Drives one launch (a background task) and then forgets it is in flight.
    pub(super) async fn drive_launch(self: Arc<Self>, launch_id: String) {
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
        let Some(driver) = self.deps.drivers.get(driver_name).cloned() else {
            let e = IaasError::bad_request(format!("driver {driver_name:?} is not enabled"));
            self.fail_launch(&launch, &pending, &e).await;
            return;
        };
        let req = LaunchRequest {
            run: self.settings.run.clone(),
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
            &self.settings.backoff,
            self.settings.max_attempts,
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

    /// Every pending node of the launch was asked to terminate (or is gone).
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

    /// Records what the IaaS launched (REQUESTED with the ids, then PENDING or RUNNING)
    /// and what failed; then applies exits that raced ahead of the record, and sends the
    /// terminations asked for meanwhile.
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
        let m = &self.deps.metrics;
        m.nodes_launched
            .with_label_values(&[driver])
            .inc_by(launched);
        let outcome_label = if outcome.failed.is_empty() {
            "ok"
        } else {
            "failed"
        };
        m.launches.with_label_values(&[driver, outcome_label]).inc();
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

    /// Fails the launch's pending nodes with the error's reason (TERMINATED for those
    /// asked to terminate meanwhile).
    async fn fail_launch(&self, launch: &StoredLaunch, pending: &[String], e: &IaasError) {
        let driver = launch.deployable.driver();
        self.deps
            .metrics
            .launches
            .with_label_values(&[driver, "failed"])
            .inc();
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
}

/// The store items of a new launch: the launch, then each node.
fn encode_launch(
    launch: &StoredLaunch,
    nodes: &[StoredNode],
) -> Result<Vec<(String, Vec<u8>)>, ReplyError> {
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
    let mut items = Vec::with_capacity(nodes.len() + 1);
    let lkey = launch_key(&launch.launch_id);
    let lbytes = serde_json::to_vec(launch).map_err(|e| encode_err(lkey.clone(), e))?;
    items.push((lkey, lbytes));
    for n in nodes {
        let key = node_key(&n.record.node_id);
        let bytes = serde_json::to_vec(n).map_err(|e| encode_err(key.clone(), e))?;
        items.push((key, bytes));
    }
    Ok(items)
}

/// A node whose launch failed: TERMINATED if it was asked to go (or the launch was given
/// up), else FAILED with the error's reason.
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
