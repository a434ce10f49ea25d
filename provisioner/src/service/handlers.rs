//! The bus handler (one function per op) and the ops that only read or flip the enabled
//! flag: `enable`, `describe_nodes`, `describe_iaas`, `dump_state`, `status`.
//!
//! The handler only decodes bodies and encodes replies; every op is an `Inner` method,
//! *because* the same ops are callable in-process through [`Provisioner`](super::Provisioner).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use epu_core::bus::{Handler, Incoming};
use epu_core::request;
use epu_core::telemetry::events;
use epu_core::wire::{Envelope, ErrorCode, Op, ReplyError};
use epu_model::messages::{
    DescribeIaasReply, DescribeIaasRequest, DescribeNodesReply, DescribeNodesRequest,
    DumpStateReply, DumpStateRequest, EnableReply, EnableRequest, IaasInstance, LaunchSummary,
    NodeRecord, ProvisionRequest, ProvisionerStatus, StatusRequest, TerminateAllRequest,
    TerminateNodesRequest,
};
use serde_json::Value;

use super::state::{state_counts, State};
use super::Inner;
use crate::record::META_ENABLED;

/// Serves the provisioner's queue.
pub(super) struct ProvisionerHandler {
    pub(super) inner: Arc<Inner>,
}

#[async_trait]
impl Handler for ProvisionerHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = &msg.envelope;
        match env.op {
            Op::Provision => self.provision(env).await,
            Op::TerminateNodes => self.terminate_nodes(env).await,
            Op::TerminateAll => self.terminate_all(env).await,
            Op::Enable => self.enable(env).await,
            Op::DescribeNodes => self.describe_nodes(env).await,
            Op::DumpState => {
                request::serve(env, |req: DumpStateRequest| async move {
                    Ok(self.inner.dump_state(&req.0).await)
                })
                .await
            }
            Op::DescribeIaas => {
                request::serve(env, |_: DescribeIaasRequest| async {
                    Ok(self.inner.describe_iaas().await)
                })
                .await
            }
            Op::Status => {
                request::serve(env, |_: StatusRequest<ProvisionerStatus>| async {
                    Ok(self.inner.status().await)
                })
                .await
            }
            other => Err(ReplyError::new(
                ErrorCode::UnknownOp,
                format!("the provisioner does not serve {other}"),
            )),
        }
    }
}

impl ProvisionerHandler {
    async fn provision(&self, env: &Envelope) -> Result<Value, ReplyError> {
        request::serve(env, |req: ProvisionRequest| self.inner.provision(req)).await
    }

    async fn terminate_nodes(&self, env: &Envelope) -> Result<Value, ReplyError> {
        request::serve(env, |req: TerminateNodesRequest| {
            self.inner.terminate_nodes(req)
        })
        .await
    }

    async fn terminate_all(&self, env: &Envelope) -> Result<Value, ReplyError> {
        request::serve(env, |_: TerminateAllRequest| self.inner.terminate_all()).await
    }

    async fn enable(&self, env: &Envelope) -> Result<Value, ReplyError> {
        request::serve(env, |_: EnableRequest| self.inner.enable()).await
    }

    async fn describe_nodes(&self, env: &Envelope) -> Result<Value, ReplyError> {
        request::serve(env, |req: DescribeNodesRequest| async move {
            Ok(self.inner.describe_nodes(&req).await)
        })
        .await
    }
}

impl Inner {
    /// `enable`: stores the flag, then provisions again.
    pub(super) async fn enable(&self) -> Result<EnableReply, ReplyError> {
        let mut st = self.state.lock().await;
        let flag = serde_json::to_vec(&true).unwrap_or_else(|_| b"true".to_vec());
        self.commit(&mut st, Vec::new(), vec![(META_ENABLED.to_string(), flag)])
            .await
            .map_err(|e| ReplyError::internal(format!("cannot store enable: {e}")))?;
        st.enabled = true;
        st.terminate_all_pending = false;
        self.deps.metrics.enabled.set(1);
        tracing::info!(event = events::PROVISIONER_ENABLED, run = %self.settings.run, "provisioning enabled");
        Ok(EnableReply { enabled: true })
    }

    /// `describe_nodes`: the records, filtered; with `since` or `limit` the change
    /// feed's page ([`select`]), else every match, oldest launch first.
    pub(super) async fn describe_nodes(&self, req: &DescribeNodesRequest) -> DescribeNodesReply {
        let st = self.state.lock().await;
        select(&st, req)
    }

    /// Every instance each driver lists for this run: the IaaS's word, not the store's.
    pub(super) async fn describe_iaas(&self) -> DescribeIaasReply {
        let mut instances = Vec::new();
        let mut errors = Vec::new();
        for (name, driver) in self.deps.drivers.iter() {
            match driver.list(&self.settings.run).await {
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

    /// `dump_state`: the flag, counts, the launches of the domain asked for (all
    /// without one) and the records its filters select, as `describe_nodes` does.
    pub(super) async fn dump_state(&self, req: &DescribeNodesRequest) -> DumpStateReply {
        let st = self.state.lock().await;
        let selected = select(&st, req);
        let mut launches: Vec<LaunchSummary> = st
            .launches
            .values()
            .filter(|l| req.domain.as_deref().is_none_or(|d| d == l.domain))
            .map(|l| LaunchSummary {
                launch_id: l.launch_id.clone(),
                domain: l.domain.clone(),
                driver: l.deployable.driver().to_string(),
                node_ids: l.node_ids.clone(),
                requested_at: l.requested_at,
                in_flight: st.in_flight.contains(&l.launch_id),
            })
            .collect();
        launches
            .sort_by(|a, b| (a.requested_at, &a.launch_id).cmp(&(b.requested_at, &b.launch_id)));
        DumpStateReply {
            run: self.settings.run.to_string(),
            enabled: st.enabled,
            drivers: self.deps.drivers.names(),
            counts: state_counts(&st.counts),
            launches,
            nodes: selected.nodes,
            revision: st.revision,
        }
    }

    /// `status`.
    pub(super) async fn status(&self) -> ProvisionerStatus {
        let st = self.state.lock().await;
        ProvisionerStatus {
            service: "provisioner".into(),
            run: self.settings.run.to_string(),
            ready: self.life.health.is_ready(),
            enabled: st.enabled,
            drivers: self.deps.drivers.names(),
            nodes: state_counts(&st.counts),
        }
    }
}

/// The records `req` asks for.
///
/// Without `since` and `limit`: every match, oldest launch first (what the CLI
/// shows). With either: the change feed, oldest change first, from `since`
/// (`full` and from the start when `since` is absent or 0, below what was
/// pruned, or past the head: a provisioner with a new store), at most `limit`
/// records, `next` where the following page starts.
pub(super) fn select(st: &State, req: &DescribeNodesRequest) -> DescribeNodesReply {
    let wanted: HashSet<&str> = req.node_ids.iter().map(String::as_str).collect();
    let matches = |r: &NodeRecord| {
        req.domain.as_deref().is_none_or(|d| d == r.domain)
            && (wanted.is_empty() || wanted.contains(r.node_id.as_str()))
            && (!req.live_only || !r.state.is_terminal())
    };
    if req.since.is_none() && req.limit.is_none() {
        let mut nodes: Vec<NodeRecord> = st
            .nodes
            .values()
            .map(|n| &n.record)
            .filter(|r| matches(r))
            .cloned()
            .collect();
        nodes.sort_by(|a, b| (a.launched_at(), &a.node_id).cmp(&(b.launched_at(), &b.node_id)));
        return DescribeNodesReply {
            enabled: st.enabled,
            nodes,
            revision: st.revision,
            next: st.revision,
            more: false,
            full: true,
        };
    }
    let since = req.since.unwrap_or(0);
    let full = !req.listing && (since == 0 || since < st.compacted || since > st.revision);
    let from = if full { 0 } else { since };
    let limit = req.limit.unwrap_or(usize::MAX).max(1);
    let mut nodes = Vec::new();
    let mut more = false;
    for r in st.changed_after(from).filter(|r| matches(r)) {
        if nodes.len() == limit {
            more = true;
            break;
        }
        nodes.push(r.clone());
    }
    let next = match nodes.last() {
        Some(last) if more => last.revision,
        _ => st.revision,
    };
    DescribeNodesReply {
        enabled: st.enabled,
        nodes,
        revision: st.revision,
        next,
        more,
        full,
    }
}
