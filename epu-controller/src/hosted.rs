//! A started controller's core: the hosted domains, recovery from the
//! provisioner, and the handler of the controller's queue (one arm per op,
//! each a typed request through `epu_core::request`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use decision_engines::Registry;
use epu_core::backoff::Backoff;
use epu_core::bus::{Handler, Incoming};
use epu_core::request;
use epu_core::store::StoreExt;
use epu_core::telemetry::Health as Readiness;
use epu_core::wire::{ErrorCode, Op, ReplyError};
use epu_model::messages::{
    ControllerStatus, DescribeDomainRequest, DescribeNodesRequest, DomainSummary,
    ListDomainsRequest, NodeRecord, ProvisionRequest, ReconfigureRequest, RemoveDomainRequest,
    SensorInfo, StatusRequest,
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
    /// Removed domains still terminating their nodes (their tasks end once the
    /// provisioner confirms every node terminal).
    pub(crate) removing: Mutex<BTreeMap<String, DomainHandle>>,
    pub(crate) ready: Readiness,
    pub(crate) request_timeout: Duration,
    /// Where the controller is in the provisioner's change feed.
    pub(crate) feed: std::sync::Mutex<Feed>,
    /// Wakes the resync loop early (a revision was skipped).
    pub(crate) resync_now: tokio::sync::Notify,
}

/// Records per page of the change feed.
pub(crate) const FEED_PAGE: usize = 1000;

/// The controller's place in the provisioner's change feed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Feed {
    /// Every revision up to this one has been applied.
    pub(crate) applied: u64,
    /// Revisions past `applied + 1` that arrived before it (out of order: the
    /// provisioner publishes from several tasks). Bounded by [`FEED_AHEAD_MAX`].
    ahead: BTreeSet<u64>,
}

/// How many out-of-order revisions [`Feed`] remembers; past it, it forgets them and
/// a resync (which a gap has already asked for) catches up.
const FEED_AHEAD_MAX: usize = 10_000;

impl Feed {
    /// An `instance_info` of `revision` arrived; true when it leaves a hole
    /// before it (a message lost, or not here yet): ask for a resync.
    pub(crate) fn observe(&mut self, revision: u64) -> bool {
        if revision == 0 || revision <= self.applied {
            return false;
        }
        if revision == self.applied + 1 {
            self.applied = revision;
            self.advance();
            return false;
        }
        if self.ahead.len() >= FEED_AHEAD_MAX {
            self.ahead.clear();
        }
        self.ahead.insert(revision);
        true
    }

    /// Whether a revision is still missing before one that arrived; a resync
    /// asked for on a gap that late messages filled since is skipped.
    pub(crate) fn has_gap(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// A resync read the feed up to `next`; `full`: from the start (which may
    /// go back: a provisioner with a new store).
    pub(crate) fn resynced(&mut self, next: u64, full: bool) {
        if full {
            self.applied = next;
            self.ahead.clear();
        } else {
            self.applied = self.applied.max(next);
            let applied = self.applied;
            self.ahead.retain(|r| *r > applied);
            self.advance();
        }
    }

    /// Moves `applied` over the remembered revisions that now follow it.
    fn advance(&mut self) {
        while self.ahead.remove(&(self.applied + 1)) {
            self.applied += 1;
        }
        let applied = self.applied;
        self.ahead.retain(|r| *r > applied);
    }
}

/// What one resync brought.
#[derive(Debug, Default)]
pub(crate) struct Resync {
    pub(crate) records: Vec<NodeRecord>,
    pub(crate) full: bool,
    pub(crate) next: u64,
    pub(crate) pages: usize,
}

impl Hosted {
    /// Reads the change feed from `since` to its head, page by page.
    pub(crate) async fn read_feed(&self, since: u64) -> Result<Resync, ReplyError> {
        let mut out = Resync {
            next: since,
            ..Resync::default()
        };
        loop {
            let reply = request::call(
                self.shared.bus.as_ref(),
                &self.shared.sender,
                &if out.pages > 0 && out.full {
                    DescribeNodesRequest::listing_page(out.next, FEED_PAGE)
                } else {
                    DescribeNodesRequest::changes(out.next, FEED_PAGE)
                },
                self.request_timeout,
            )
            .await?;
            if out.pages == 0 {
                out.full = reply.full;
            }
            out.pages += 1;
            out.next = reply.next;
            out.records.extend(reply.nodes);
            if !reply.more {
                return Ok(out);
            }
        }
    }

    /// Every record of the provisioner, for the start: retried with backoff
    /// until it answers (the feed's place is kept).
    pub(crate) async fn recover_nodes(&self) -> Vec<NodeRecord> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).state();
        loop {
            match self.read_feed(0).await {
                Ok(r) => {
                    self.count_resync("start", "ok");
                    tracing::info!(
                        event = "controller_recovered",
                        nodes = r.records.len(),
                        revision = r.next,
                        "recovered node state from the provisioner's change feed"
                    );
                    lock(&self.feed).resynced(r.next, true);
                    return r.records;
                }
                Err(e) => {
                    self.count_resync("start", "failed");
                    tracing::warn!(event = "controller_recovery_wait", error = %e, "provisioner did not answer describe_nodes; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// One resync: what changed since the last applied revision, to each domain;
    /// after a full listing, each domain forgets the nodes it did not name.
    pub(crate) async fn resync(&self, why: &'static str) -> Result<usize, ReplyError> {
        let since = lock(&self.feed).applied;
        let r = match self.read_feed(since).await {
            Ok(r) => r,
            Err(e) => {
                self.count_resync(why, "failed");
                return Err(e);
            }
        };
        let count = r.records.len();
        let mut listed: HashMap<String, HashSet<String>> = HashMap::new();
        for rec in r.records {
            if r.full {
                listed
                    .entry(rec.domain.clone())
                    .or_default()
                    .insert(rec.node_id.clone());
            }
            self.route(rec).await;
        }
        if r.full {
            let hosted: Vec<(String, DomainHandle)> = {
                let d = self.domains.lock().await;
                let rm = self.removing.lock().await;
                d.iter()
                    .chain(rm.iter())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            for (name, h) in hosted {
                h.send(DomainMsg::Listed(listed.remove(&name).unwrap_or_default()));
            }
        }
        lock(&self.feed).resynced(r.next, r.full);
        self.count_resync(why, "ok");
        self.shared.metrics.resync_records.inc_by(count as u64);
        if count > 0 || r.full {
            tracing::info!(
                event = "resync",
                why,
                since,
                next = r.next,
                records = count,
                full = r.full,
                pages = r.pages,
                "applied the provisioner's changes"
            );
        }
        Ok(count)
    }

    fn count_resync(&self, why: &str, outcome: &str) {
        self.shared
            .metrics
            .resyncs
            .with_label_values(&[why, outcome])
            .inc();
    }

    /// The resync loop: every `every`, and soon after a skipped revision.
    pub(crate) async fn resync_loop(self: Arc<Self>, every: Duration) {
        loop {
            let why = tokio::select! {
                _ = tokio::time::sleep(every) => "interval",
                _ = self.resync_now.notified() => {
                    // Let the messages in flight land first: a revision that was only
                    // late fills its hole, and no resync is needed.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if !lock(&self.feed).has_gap() {
                        continue;
                    }
                    "gap"
                }
            };
            if let Err(e) = self.resync(why).await {
                tracing::warn!(event = "resync_failed", why, error = %e, "cannot read the provisioner's change feed; trying again");
            }
        }
    }

    /// Gives a node record to its domain (hosted, or being removed).
    async fn route(&self, rec: NodeRecord) {
        if let Some(d) = self.domains.lock().await.get(&rec.domain) {
            d.send(DomainMsg::Node(Box::new(rec)));
            return;
        }
        let mut removing = self.removing.lock().await;
        removing.retain(|_, h| !h.tx.is_closed());
        if let Some(d) = removing.get(&rec.domain) {
            d.send(DomainMsg::Node(Box::new(rec)));
        } else {
            tracing::debug!(domain = %rec.domain, node_id = %rec.node_id, "update for a domain not hosted here");
        }
    }

    pub(crate) async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = msg.envelope;
        let within = self.request_timeout;
        match env.op {
            Op::InstanceInfo => {
                let rec: NodeRecord = env.parse_body()?;
                let gap = lock(&self.feed).observe(rec.revision);
                self.route(rec).await;
                if gap {
                    self.resync_now.notify_one();
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
                request::serve(&env, |req: ReconfigureRequest| async move {
                    let d = self.domain(&req.domain).await?;
                    d.ask(within, |tx| DomainMsg::Reconfigure(Box::new(req), tx))
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
                    let out = d.ask(within, DomainMsg::Remove).await??;
                    // It goes on terminating its nodes until the provisioner confirms.
                    if let Some(h) = self.domains.lock().await.remove(&r.domain) {
                        self.removing.lock().await.insert(r.domain.clone(), h);
                    }
                    Ok(out)
                })
                .await
            }
            Op::ListDomains => {
                request::serve(&env, |_: ListDomainsRequest| async {
                    let handles: Vec<DomainHandle> =
                        self.domains.lock().await.values().cloned().collect();
                    let mut out = Vec::with_capacity(handles.len());
                    // Asked together, each bounded: one busy domain neither
                    // stalls the list nor hides the others.
                    let asks = handles.iter().map(|h| h.ask(within, DomainMsg::Summary));
                    for v in futures_util::future::join_all(asks)
                        .await
                        .into_iter()
                        .flatten()
                    {
                        out.push(v);
                    }
                    Ok(out)
                })
                .await
            }
            Op::DescribeDomain => {
                request::serve(&env, |r: DescribeDomainRequest| async move {
                    self.domain(&r.domain)
                        .await?
                        .ask(within, DomainMsg::Describe)
                        .await
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
        self.check_deployable(&policy).await?;
        let mut domains = self.domains.lock().await;
        if domains.contains_key(&policy.name) {
            return Err(ReplyError::conflict(format!(
                "domain {:?} already exists; remove it first or reconfigure it",
                policy.name
            )));
        }
        {
            let mut removing = self.removing.lock().await;
            removing.retain(|_, h| !h.tx.is_closed());
            if removing.contains_key(&policy.name) {
                return Err(ReplyError::conflict(format!(
                    "domain {:?} was removed and its nodes are still terminating; add it again once they are (`epumgmt status` shows them)",
                    policy.name
                )));
            }
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
        handle.ask(self.request_timeout, DomainMsg::Summary).await
    }

    /// Asks the provisioner whether it would launch the policy's deployable
    /// (`provision` with `check_only`): a refusal refuses the domain, naming
    /// the key. A provisioner that does not answer refuses nothing: a refused
    /// launch is recorded REJECTED and reaches the domain anyway.
    async fn check_deployable(&self, policy: &DomainPolicy) -> Result<(), ReplyError> {
        let req = ProvisionRequest {
            launch_id: format!("check-{}", uuid::Uuid::new_v4().simple()),
            domain: policy.name.clone(),
            count: 1,
            node_ids: Vec::new(),
            deployable: policy.deployable.clone(),
            vars: BTreeMap::new(),
            subscriber: None,
            check_only: true,
        };
        let asked = request::call(
            self.shared.bus.as_ref(),
            &self.shared.sender,
            &req,
            self.request_timeout,
        )
        .await;
        match asked {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::BadRequest => Err(ReplyError::bad_request(format!(
                "add_domain {:?}: key \"deployable\": the provisioner refuses it: {}; nothing was added",
                policy.name, e.message
            ))),
            Err(e) => {
                tracing::warn!(domain = %policy.name, error = %e, "cannot ask the provisioner about the deployable; adding the domain unchecked");
                Ok(())
            }
        }
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
        self.removing.lock().await.clear();
        let set = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        epu_core::service::join_within(set, within, "domain tasks").await;
    }
}

/// The feed's place, also after a panic elsewhere held the lock.
fn lock(m: &std::sync::Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct ControllerHandler(pub(crate) Arc<Hosted>);

#[async_trait]
impl Handler for ControllerHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        self.0.handle(msg).await
    }
}
