//! The EPU controller: the outer shell around decision engines.
//!
//! It hosts domains (one or many per process), keeps each domain's view of its
//! instances (`instance_info` from the provisioner) and sensors (`sensor_info` from
//! the aggregator), asks the domain's engine what to do — promptly after a change
//! (debounced) and on a periodic tick — and carries the intents out through the
//! provisioner: `provision` with launch ids it generated and stored first, and
//! `terminate_nodes`.
//!
//! Build your own controller binary with your own engines: make a
//! [`decision_engines::Registry`], register your engine, and pass it to
//! [`Controller::start`] (see `examples/custom-engine/`).
#![forbid(unsafe_code)]

pub mod domain;
pub mod metrics;
pub mod policy;
pub mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use decision_engines::Registry;
use epu_core::backoff::Backoff;
use epu_core::bus::{Bus, Handler, Incoming, Server};
use epu_core::clock::SharedClock;
use epu_core::config::{BusConfig, StoreConfig, TelemetryConfig};
use epu_core::store::{Store, StoreExt};
use epu_core::telemetry::{Health as Readiness, Metrics};
use epu_core::wire::{Envelope, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    DescribeNodesReply, DescribeNodesRequest, DomainRef, NodeRecord, ReconfigureRequest, SensorInfo,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;

pub use crate::domain::{DecisionRecord, UNIQUE_KEY_VAR};
use crate::domain::{Domain, DomainHandle, DomainMsg, Shared, DOMAINS_TREE};
use crate::metrics::ControllerMetrics;
pub use crate::policy::{
    expand_placeholders, load_policies, load_policy, DomainPolicy, PolicyError,
};

/// The controller's config file (`epu-controller --config FILE`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub run: RunName,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Policy files of the domains to host (TOML or YAML).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    #[serde(default)]
    pub timing: Timing,
}

/// How often domains decide.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Every domain decides at least this often.
    pub decision_interval_secs: f64,
    /// After a change, wait this long for more changes before deciding.
    pub debounce_ms: u64,
    /// Timeout of requests to the provisioner.
    pub request_timeout_secs: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            decision_interval_secs: 5.0,
            debounce_ms: 50,
            request_timeout_secs: 10.0,
        }
    }
}

impl Timing {
    fn tick(&self) -> Duration {
        Duration::from_secs_f64(self.decision_interval_secs.max(0.01))
    }
}

/// Errors starting the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("store: {0}")]
    Store(#[from] epu_core::store::StoreError),
    #[error("bus: {0}")]
    Bus(#[from] epu_core::bus::BusError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running controller.
pub struct Controller {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    domains: Mutex<BTreeMap<String, DomainHandle>>,
    ready: Readiness,
    request_timeout: Duration,
}

impl Controller {
    /// Starts the controller: loads domains from the store (their reconfigured
    /// config wins) and from `policies` (added when new), recovers every live node
    /// from the provisioner's `dump_state` (retrying until it answers), starts each
    /// domain deciding, then serves the controller queue. Returns once serving.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        run: RunName,
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        clock: SharedClock,
        metrics: &Metrics,
        ready: Readiness,
        registry: Registry,
        policies: BTreeMap<String, DomainPolicy>,
        timing: Timing,
    ) -> Result<(Arc<Controller>, Server), ControllerError> {
        let cm = ControllerMetrics::new(metrics.registry())?;
        let shared = Arc::new(Shared {
            run: run.clone(),
            sender: "epu-controller".to_string(),
            bus: bus.clone(),
            store: store.clone(),
            clock,
            metrics: cm,
            tick: timing.tick(),
            debounce: Duration::from_millis(timing.debounce_ms),
        });
        let registry = Arc::new(registry);
        let mut all: BTreeMap<String, DomainPolicy> = BTreeMap::new();
        for (name, stored) in store.scan_json::<DomainPolicy>(DOMAINS_TREE)? {
            all.insert(name, stored);
        }
        for (name, p) in policies {
            if let std::collections::btree_map::Entry::Vacant(slot) = all.entry(name) {
                store.put_json(DOMAINS_TREE, slot.key(), &p)?;
                slot.insert(p);
            }
        }
        let controller = Arc::new(Controller {
            shared: shared.clone(),
            registry: registry.clone(),
            domains: Mutex::new(BTreeMap::new()),
            ready,
            request_timeout: Duration::from_secs_f64(timing.request_timeout_secs.max(0.1)),
        });
        let known = controller.recover_nodes().await;
        let mut by_domain: HashMap<String, Vec<NodeRecord>> = HashMap::new();
        for r in known {
            by_domain.entry(r.domain.clone()).or_default().push(r);
        }
        {
            let mut domains = controller.domains.lock().await;
            for (name, policy) in all {
                let engine = match policy.create_engine(&registry, &format!("stored domain {name}"))
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(domain = %name, error = %e, "cannot start the domain's engine; skipping it");
                        continue;
                    }
                };
                let nodes = by_domain.remove(&name).unwrap_or_default();
                tracing::info!(event = "domain_started", domain = %name, engine = %policy.engine, recovered_nodes = nodes.len(), "hosting domain");
                let handle = Domain::new(shared.clone(), policy, engine, nodes).spawn();
                domains.insert(name, handle);
            }
        }
        let server = bus
            .serve(
                Service::Controller,
                Arc::new(ControllerHandler(controller.clone())),
            )
            .await?;
        controller.ready.set_ready(true);
        Ok((controller, server))
    }

    /// Asks the provisioner for every live node, retrying with backoff until it answers.
    async fn recover_nodes(&self) -> Vec<NodeRecord> {
        let req = DescribeNodesRequest {
            domain: None,
            node_ids: vec![],
            live_only: true,
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).state();
        loop {
            let env = match Envelope::with_body(
                &self.shared.run,
                Op::DumpState,
                &self.shared.sender,
                &req,
            ) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode dump_state");
                    return vec![];
                }
            };
            match self
                .shared
                .bus
                .request(Service::Provisioner, &env, self.request_timeout)
                .await
                .and_then(|v| {
                    serde_json::from_value::<DescribeNodesReply>(v).map_err(|e| {
                        ReplyError::internal(format!("unreadable dump_state reply: {e}"))
                    })
                }) {
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

    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
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
                let req: ReconfigureRequest = env.parse_body()?;
                let d = self.domain(&req.domain).await?;
                d.ask(|tx| DomainMsg::Reconfigure(Box::new(req), tx))
                    .await?
            }
            Op::AddDomain => {
                let policy: DomainPolicy = env.parse_body()?;
                self.add_domain(policy).await
            }
            Op::RemoveDomain => {
                let r: DomainRef = env.parse_body()?;
                let d = self.domain(&r.domain).await?;
                let out = d.ask(DomainMsg::Remove).await??;
                self.domains.lock().await.remove(&r.domain);
                Ok(out)
            }
            Op::ListDomains => {
                let handles: Vec<DomainHandle> =
                    self.domains.lock().await.values().cloned().collect();
                let mut out = Vec::with_capacity(handles.len());
                for h in handles {
                    if let Ok(v) = h.ask(DomainMsg::Summary).await {
                        out.push(v);
                    }
                }
                Ok(Value::Array(out))
            }
            Op::DescribeDomain => {
                let r: DomainRef = env.parse_body()?;
                let d = self.domain(&r.domain).await?;
                d.ask(DomainMsg::Describe).await
            }
            Op::Status => Ok(json!({
                "service": "controller",
                "run": self.shared.run,
                "ready": self.ready.is_ready(),
                "domains": self.domains.lock().await.len(),
            })),
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
    pub async fn add_domain(&self, policy: DomainPolicy) -> Result<Value, ReplyError> {
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
        let handle = Domain::new(self.shared.clone(), policy, engine, vec![]).spawn();
        domains.insert(name.clone(), handle.clone());
        drop(domains);
        handle.ask(DomainMsg::Summary).await
    }

    /// The names of the hosted domains.
    pub async fn domain_names(&self) -> Vec<String> {
        self.domains.lock().await.keys().cloned().collect()
    }
}

struct ControllerHandler(Arc<Controller>);

#[async_trait]
impl Handler for ControllerHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        self.0.handle(msg).await
    }
}
