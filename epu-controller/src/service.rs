//! The controller's lifecycle (`epu_core::service`): [`Controller::new`] from its
//! setup and what it runs on, [`start`](Controller::start) into a
//! [`RunningController`] that owns the domain tasks and the queue's server,
//! [`stop`](RunningController::stop).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use decision_engines::Registry;
use epu_core::bus::{Bus, Server};
use epu_core::clock::SharedClock;
use epu_core::service::{run_service, Running, Service};
use epu_core::store::{Store, StoreExt};
use epu_core::telemetry::{Health as Readiness, Metrics};
use epu_core::wire::{ReplyError, RunName, Service as BusService};
use epu_model::messages::{DomainSummary, NodeRecord};
use tokio::sync::Mutex;

use crate::domain::{Domain, Shared, DOMAINS_TREE, REMOVING_TREE};
use crate::hosted::{ControllerHandler, Feed, Hosted};
use crate::metrics::ControllerMetrics;
use crate::policy::DomainPolicy;
use crate::{ControllerError, Timing};

/// The controller's name on the bus and in logs.
pub const SENDER: &str = "epu-controller";

/// What a controller runs on.
pub struct ControllerDeps {
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// The registry its metrics go to (served with the bus's).
    pub metrics: Metrics,
    /// Its readiness flag (`/readyz`).
    pub readiness: Readiness,
    /// The engines its domains may use.
    pub registry: Registry,
}

/// What a controller hosts: its run, the domains of its policy files (added to
/// the store when new; a stored, reconfigured domain wins), and its timing.
#[derive(Clone, Debug)]
pub struct ControllerSetup {
    pub run: RunName,
    pub policies: BTreeMap<String, DomainPolicy>,
    pub timing: Timing,
}

/// A controller, built and not yet started.
pub struct Controller {
    setup: ControllerSetup,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// A started controller: serving its queue, its domains deciding.
pub struct RunningController {
    hosted: Arc<Hosted>,
    server: Option<Server>,
    /// The resync loop (aborted at stop: it only reads and forwards).
    resync: tokio::task::JoinHandle<()>,
}

impl Controller {
    /// A controller over `deps` (its metrics are registered here).
    pub fn new(setup: ControllerSetup, deps: ControllerDeps) -> Result<Self, ControllerError> {
        let metrics = ControllerMetrics::new(deps.metrics.registry())?;
        let shared = Arc::new(Shared {
            run: setup.run.clone(),
            sender: SENDER.to_string(),
            bus: deps.bus,
            // The domains call the store from their tasks: keep those calls off
            // the runtime's workers.
            store: epu_core::store::OffRuntime::shared(deps.store),
            clock: deps.clock,
            metrics,
            tick: setup.timing.tick(),
            debounce: Duration::from_millis(setup.timing.debounce_ms),
        });
        Ok(Controller {
            setup,
            shared,
            registry: Arc::new(deps.registry),
            readiness: deps.readiness,
        })
    }

    /// Loads domains from the store (their reconfigured config wins) and from the
    /// policies (added when new), recovers every node from the provisioner's
    /// `dump_state` (retrying until it answers), starts each domain deciding, then
    /// serves the controller queue. Returns once serving, ready.
    pub async fn start(&self) -> Result<RunningController, ControllerError> {
        <Self as Service>::start(self).await
    }

    /// Starts, runs until `shutdown` completes, then stops.
    pub async fn run<F>(&self, shutdown: F) -> Result<(), ControllerError>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        run_service(self, shutdown).await
    }

    async fn boot(&self) -> Result<RunningController, ControllerError> {
        let (shared, registry) = (&self.shared, &self.registry);
        let store = &shared.store;
        let mut all: BTreeMap<String, DomainPolicy> = BTreeMap::new();
        // Removals recorded but not finished: their domains go on terminating.
        let removing: BTreeMap<String, DomainPolicy> = store
            .scan_json::<DomainPolicy>(REMOVING_TREE)?
            .into_iter()
            .collect();
        for (name, stored) in store.scan_json::<DomainPolicy>(DOMAINS_TREE)? {
            if !removing.contains_key(&name) {
                all.insert(name, stored);
            }
        }
        for (name, p) in self.setup.policies.clone() {
            if removing.contains_key(&name) {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = all.entry(name) {
                store.put_json(DOMAINS_TREE, slot.key(), &p)?;
                slot.insert(p);
            }
        }
        let hosted = Arc::new(Hosted {
            shared: shared.clone(),
            registry: registry.clone(),
            domains: Mutex::new(BTreeMap::new()),
            tasks: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            removing: Mutex::new(BTreeMap::new()),
            ready: self.readiness.clone(),
            request_timeout: Duration::from_secs_f64(
                self.setup.timing.request_timeout_secs.max(0.1),
            ),
            feed: std::sync::Mutex::new(Feed::default()),
            resync_now: tokio::sync::Notify::new(),
        });
        let known = hosted.recover_nodes().await;
        let mut by_domain: HashMap<String, Vec<NodeRecord>> = HashMap::new();
        for r in known {
            by_domain.entry(r.domain.clone()).or_default().push(r);
        }
        {
            let mut domains = hosted.domains.lock().await;
            // Every domain is read back from the store before any starts deciding.
            let mut recovered = Vec::new();
            for (name, policy) in all {
                let engine = match policy.create_engine(registry, &format!("stored domain {name}"))
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(domain = %name, error = %e, "cannot start the domain's engine; skipping it");
                        continue;
                    }
                };
                let nodes = by_domain.remove(&name).unwrap_or_default();
                tracing::info!(event = "domain_started", domain = %name, engine = %policy.engine, recovered_nodes = nodes.len(), "hosting domain");
                recovered.push((name, Domain::new(shared.clone(), policy, engine, nodes)?));
            }
            for (name, domain) in recovered {
                domains.insert(name, hosted.spawn_domain(domain));
            }
            let mut gone = hosted.removing.lock().await;
            for (name, policy) in removing {
                let engine = match policy.create_engine(registry, &format!("removed domain {name}"))
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(domain = %name, error = %e, "cannot rebuild the removed domain to finish its removal; its nodes are left to killrun");
                        continue;
                    }
                };
                let nodes = by_domain.remove(&name).unwrap_or_default();
                tracing::info!(event = "domain_removal_resumed", domain = %name, nodes = nodes.len(), "finishing a removal");
                let domain = Domain::new(shared.clone(), policy, engine, nodes)?.into_removing();
                gone.insert(name, hosted.spawn_domain(domain));
            }
        }
        let every = Duration::from_secs_f64(self.setup.timing.resync_secs.max(0.1));
        let resync = tokio::spawn(hosted.clone().resync_loop(every));
        let served = shared
            .bus
            .serve(
                BusService::Controller,
                Arc::new(ControllerHandler(hosted.clone())),
            )
            .await;
        let server = match served {
            Ok(s) => s,
            Err(e) => {
                resync.abort();
                hosted.stop_domains(STOP_WITHIN).await;
                return Err(e.into());
            }
        };
        tracing::info!(event = epu_core::telemetry::events::SERVICE_STARTED, service = SENDER, run = %shared.run, "controller serving");
        Ok(RunningController {
            hosted,
            server: Some(server),
            resync,
        })
    }
}

/// How long stopping waits for the domain tasks.
const STOP_WITHIN: Duration = Duration::from_secs(10);

impl RunningController {
    /// Adds a domain at runtime (`{run}` and `{domain}` filled in, validated,
    /// persisted, then started), as `add_domain` does.
    pub async fn add_domain(&self, policy: DomainPolicy) -> Result<DomainSummary, ReplyError> {
        self.hosted.add_domain(policy).await
    }

    /// The names of the hosted domains.
    pub async fn domain_names(&self) -> Vec<String> {
        self.hosted.domain_names().await
    }

    /// Stops serving, then ends every domain task (up to 10 s, then aborted).
    /// Workers keep running; the next start recovers them.
    pub async fn stop(self) {
        <Self as Running>::stop(self).await
    }
}

#[async_trait::async_trait]
impl Service for Controller {
    const NAME: &'static str = SENDER;
    type Running = RunningController;
    type Error = ControllerError;

    fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    async fn serve(&self) -> Result<RunningController, ControllerError> {
        self.boot().await
    }
}

#[async_trait::async_trait]
impl Running for RunningController {
    fn readiness(&self) -> &Readiness {
        &self.hosted.ready
    }

    async fn halt(mut self) {
        tracing::info!(event = epu_core::telemetry::events::SERVICE_STOPPING, service = SENDER, run = %self.hosted.shared.run, "stopping");
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        self.resync.abort();
        self.hosted.stop_domains(STOP_WITHIN).await;
    }
}
