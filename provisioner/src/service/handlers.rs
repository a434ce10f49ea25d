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

use super::state::state_counts;
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
                request::serve(env, |_: DumpStateRequest| async {
                    Ok(self.inner.dump_state().await)
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

    /// `describe_nodes`: the records, filtered, oldest launch first.
    pub(super) async fn describe_nodes(&self, req: &DescribeNodesRequest) -> DescribeNodesReply {
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

    /// `dump_state`: the flag, counts, launches and every record (what a controller
    /// recovers from).
    pub(super) async fn dump_state(&self) -> DumpStateReply {
        let st = self.state.lock().await;
        let mut nodes: Vec<NodeRecord> = st.nodes.values().map(|n| n.record.clone()).collect();
        nodes.sort_by(|a, b| (a.launched_at(), &a.node_id).cmp(&(b.launched_at(), &b.node_id)));
        let mut launches: Vec<LaunchSummary> = st
            .launches
            .values()
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
            nodes,
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
