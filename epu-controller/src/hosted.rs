//! A started controller's core: the hosted domains, recovery from the
//! provisioner, and the handler of the controller's queue (one arm per op,
//! each a typed request through `epu_core::request`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use decision_engines::Registry;
use epu_core::backoff::Backoff;
use epu_core::bus::{Handler, Incoming};
use epu_core::request;
use epu_core::store::StoreExt;
use epu_core::telemetry::Health as Readiness;
use epu_core::wire::{Op, ReplyError};
use epu_model::messages::{
    ControllerStatus, DescribeDomainRequest, DomainSummary, DumpStateRequest, ListDomainsRequest,
    NodeRecord, ReconfigureRequest, RemoveDomainRequest, SensorInfo, StatusRequest,
};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::domain::{Domain, DomainHandle, DomainMsg, Shared, DOMAINS_TREE};
use crate::policy::{expand_placeholders, DomainPolicy};

/// The domains a started controller hosts, and how it answers its queue.
pub(crate) struct Hosted {
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) domains: Mutex<BTreeMap<String, DomainHandle>>,
    /// Every domain's task: owned here, ended by [`Hosted::stop_domains`].
    pub(crate) tasks: std::sync::Mutex<JoinSet<()>>,
    pub(crate) ready: Readiness,
    pub(crate) request_timeout: Duration,
}

impl Hosted {
    /// Asks the provisioner for its node records (`dump_state`), retrying with
    /// backoff until it answers.
    pub(crate) async fn recover_nodes(&self) -> Vec<NodeRecord> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).state();
        loop {
            let asked = request::call(
                self.shared.bus.as_ref(),
                &self.shared.sender,
                &DumpStateRequest::default(),
                self.request_timeout,
            )
            .await;
            match asked {
                Ok(reply) => {
                    tracing::info!(
                        event = "controller_recovered",
                        nodes = reply.nodes.len(),
                        "recovered node state from the provisioner"
                    );
                    return reply.nodes;
                }
                Err(e) => {
                    tracing::warn!(event = "controller_recovery_wait", error = %e, "provisioner did not answer dump_state; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    pub(crate) async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = msg.envelope;
        match env.op {
            Op::InstanceInfo => {
                let rec: NodeRecord = env.parse_body()?;
                let domains = self.domains.lock().await;
                if let Some(d) = domains.get(&rec.domain) {
                    d.send(DomainMsg::Node(Box::new(rec)));
                } else {
                    tracing::debug!(domain = %rec.domain, node_id = %rec.node_id, "update for a domain not hosted here");
                }
                Ok(Value::Null)
            }
            Op::SensorInfo => {
                let info: SensorInfo = env.parse_body()?;
                let domains = self.domains.lock().await;
                if let Some(d) = domains.get(&info.domain) {
                    d.send(DomainMsg::Sensors(Box::new(info)));
                }
                Ok(Value::Null)
            }
            Op::Reconfigure => {
                request::serve(&env, |req: ReconfigureRequest| async {
                    let d = self.domain(&req.domain).await?;
                    d.ask(|tx| DomainMsg::Reconfigure(Box::new(req), tx))
                        .await?
                })
                .await
            }
            Op::AddDomain => {
                request::serve(&env, |policy: DomainPolicy| self.add_domain(policy)).await
            }
            Op::RemoveDomain => {
                request::serve(&env, |r: RemoveDomainRequest| async move {
                    let d = self.domain(&r.domain).await?;
                    let out = d.ask(DomainMsg::Remove).await??;
                    self.domains.lock().await.remove(&r.domain);
                    Ok(out)
                })
                .await
            }
            Op::ListDomains => {
                request::serve(&env, |_: ListDomainsRequest| async {
                    let handles: Vec<DomainHandle> =
                        self.domains.lock().await.values().cloned().collect();
                    let mut out = Vec::with_capacity(handles.len());
                    for h in handles {
                        if let Ok(v) = h.ask(DomainMsg::Summary).await {
                            out.push(v);
                        }
                    }
                    Ok(out)
                })
                .await
            }
            Op::DescribeDomain => {
                request::serve(&env, |r: DescribeDomainRequest| async move {
                    self.domain(&r.domain).await?.ask(DomainMsg::Describe).await
                })
                .await
            }
            Op::Status => {
                request::serve(&env, |_: StatusRequest<ControllerStatus>| async {
                    Ok(ControllerStatus {
                        service: "controller".into(),
                        run: self.shared.run.to_string(),
                        ready: self.ready.is_ready(),
                        domains: self.domains.lock().await.len(),
                    })
                })
                .await
            }
            other => Err(ReplyError::new(
                epu_core::wire::ErrorCode::UnknownOp,
                format!("the controller does not serve {other}"),
            )),
        }
    }

    async fn domain(&self, name: &str) -> Result<DomainHandle, ReplyError> {
        self.domains.lock().await.get(name).cloned().ok_or_else(|| {
            ReplyError::not_found(format!(
                "no domain {name:?} in run {}; `epumgmt status` lists the domains",
                self.shared.run
            ))
        })
    }

    /// Adds a domain at runtime (`{run}` and `{domain}` filled in, validated,
    /// persisted, then started).
    pub async fn add_domain(&self, policy: DomainPolicy) -> Result<DomainSummary, ReplyError> {
        let policy = expand_placeholders(policy, self.shared.run.as_str());
        let engine = policy
            .create_engine(&self.registry, "add_domain")
            .and_then(|e| policy.validate(&self.registry, "add_domain").map(|_| e))
            .map_err(|e| ReplyError::bad_request(e.to_string()))?;
        let mut domains = self.domains.lock().await;
        if domains.contains_key(&policy.name) {
            return Err(ReplyError::conflict(format!(
                "domain {:?} already exists; remove it first or reconfigure it",
                policy.name
            )));
        }
        self.shared
            .store
            .put_json(DOMAINS_TREE, &policy.name, &policy)
            .map_err(|e| ReplyError::internal(e.to_string()))?;
        let name = policy.name.clone();
        tracing::info!(event = "domain_added", domain = %name, engine = %policy.engine, "domain added");
        let domain = Domain::new(self.shared.clone(), policy, engine, vec![])
            .map_err(|e| ReplyError::internal(e.to_string()))?;
        let handle = self.spawn_domain(domain);
        domains.insert(name.clone(), handle.clone());
        drop(domains);
        handle.ask(DomainMsg::Summary).await
    }

    /// The names of the hosted domains.
    pub async fn domain_names(&self) -> Vec<String> {
        self.domains.lock().await.keys().cloned().collect()
    }

    /// Starts a domain's task, owned by the controller.
    pub(crate) fn spawn_domain(&self, domain: Domain) -> DomainHandle {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Reap the tasks of removed domains.
        while tasks.try_join_next().is_some() {}
        domain.spawn_in(&mut tasks)
    }

    /// Closes every domain's inbox and waits (up to `within`) for their tasks to
    /// end; a task still deciding after that is aborted.
    pub(crate) async fn stop_domains(&self, within: Duration) {
        self.domains.lock().await.clear();
        let set = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        epu_core::service::join_within(set, within, "domain tasks").await;
    }
}

pub(crate) struct ControllerHandler(pub(crate) Arc<Hosted>);

#[async_trait]
impl Handler for ControllerHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        self.0.handle(msg).await
    }
}
