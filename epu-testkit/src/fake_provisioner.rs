//! A fake provisioner: serves `Service::Provisioner` on a bus the way the real one
//! answers, with no IaaS behind it.
//!
//! - `provision`: recorded (a repeated `launch_id` is recorded once, as the real
//!   one's idempotency token makes it), its nodes are created in the launch state
//!   (RUNNING unless [`FakeProvisionerBuilder::launch_state`] says otherwise) and
//!   published as `instance_info` to the controller before the reply.
//! - `terminate_nodes`: recorded; known live nodes become TERMINATED and are
//!   published.
//! - `dump_state`: a typed [`DumpStateReply`] (every record, oldest first).
//! - `describe_nodes`: a typed [`DescribeNodesReply`], filtered by domain, node ids
//!   and `live_only` as the real one filters.
//! - `enable`: enabled. Anything else is refused naming the operation.
//!
//! A test changes what the "IaaS" holds with [`FakeProvisioner::put`] (quietly)
//! or [`FakeProvisioner::set_state`] (and tells the controller).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use chrono::{DateTime, Utc};
use epu_core::bus::{Bus, BusError, FnHandler, Incoming, Server};
use epu_core::request::{self, Request};
use epu_core::wire::{Envelope, Op, ReplyError, Service};
use epu_model::messages::{
    DescribeNodesReply, DescribeNodesRequest, DumpStateReply, DumpStateRequest, EnableReply,
    EnableRequest, LaunchSummary, NodeRecord, ProvisionReply, ProvisionRequest, StateCounts,
    TerminateNodesReply, TerminateNodesRequest,
};
use epu_model::NodeState;
use serde_json::Value;

use crate::records::node;

/// The sender name of what the fake publishes.
pub const SENDER: &str = "provisioner";

/// One `provision` the fake received, with when it arrived.
#[derive(Clone, Debug)]
pub struct Provisioned {
    pub at: Instant,
    pub request: ProvisionRequest,
}

#[derive(Default)]
struct State {
    /// Oldest first.
    nodes: Vec<NodeRecord>,
    provisions: Vec<Provisioned>,
    launches: Vec<LaunchSummary>,
    terminations: Vec<TerminateNodesRequest>,
    /// Requests by operation name, every one received.
    requests: BTreeMap<String, usize>,
    /// The change feed's revision: bumped by every change of a record.
    revision: u64,
}

impl State {
    /// Stores `rec` as the next revision; the record as stored.
    fn upsert(&mut self, mut rec: NodeRecord) -> NodeRecord {
        self.revision += 1;
        rec.revision = self.revision;
        match self.nodes.iter_mut().find(|n| n.node_id == rec.node_id) {
            Some(n) => *n = rec.clone(),
            None => self.nodes.push(rec.clone()),
        }
        rec
    }

    /// Moves the node to `state` at `at` as the next revision; the record.
    fn set_state(&mut self, id: &str, state: NodeState, at: DateTime<Utc>) -> Option<NodeRecord> {
        let mut n = self.nodes.iter().find(|n| n.node_id == id)?.clone();
        set(&mut n, state, at);
        Some(self.upsert(n))
    }
}

struct Inner {
    bus: Arc<dyn Bus>,
    state: Mutex<State>,
    launch_state: NodeState,
    driver: Option<String>,
    publish: bool,
    drivers: Vec<String>,
}

impl Inner {
    /// The state, also after a panic elsewhere held the lock (a fake must keep
    /// answering so the test reports its own failure).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn publish(&self, records: &[NodeRecord]) -> Result<(), BusError> {
        if !self.publish {
            return Ok(());
        }
        for r in records {
            let env = Envelope::with_body(self.bus.run(), Op::InstanceInfo, SENDER, r)?;
            self.bus.send(Service::Controller, &env).await?;
        }
        Ok(())
    }

    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = msg.envelope;
        *self.lock().requests.entry(env.op.to_string()).or_default() += 1;
        match env.op {
            Op::Provision => {
                let req: ProvisionRequest = request::body(&env)?;
                let (answer, created) = self.provision(req);
                self.publish_or_fail(&created).await?;
                request::reply::<ProvisionRequest>(&answer)
            }
            Op::TerminateNodes => {
                let req: TerminateNodesRequest = request::body(&env)?;
                let (answer, changed) = self.terminate(req);
                self.publish_or_fail(&changed).await?;
                request::reply::<TerminateNodesRequest>(&answer)
            }
            Op::DumpState => {
                request::serve::<DumpStateRequest, _, _>(&env, |_| async { Ok(self.dump()) }).await
            }
            Op::DescribeNodes => {
                request::serve::<DescribeNodesRequest, _, _>(&env, |req| async move {
                    Ok(self.describe(&req))
                })
                .await
            }
            Op::Enable => {
                request::serve::<EnableRequest, _, _>(&env, |_| async {
                    Ok(EnableReply { enabled: true })
                })
                .await
            }
            op => Err(ReplyError::bad_request(format!(
                "the fake provisioner does not serve {op}"
            ))),
        }
    }

    async fn publish_or_fail(&self, records: &[NodeRecord]) -> Result<(), ReplyError> {
        self.publish(records).await.map_err(|e| {
            ReplyError::internal(format!(
                "fake provisioner could not publish instance_info: {e}"
            ))
        })
    }

    fn provision(&self, req: ProvisionRequest) -> (ProvisionReply, Vec<NodeRecord>) {
        if req.check_only {
            // The fake launches anything: a check is answered with no nodes and
            // recorded nowhere.
            return (
                ProvisionReply {
                    launch_id: req.launch_id,
                    nodes: Vec::new(),
                },
                Vec::new(),
            );
        }
        let mut g = self.lock();
        if g.provisions
            .iter()
            .any(|p| p.request.launch_id == req.launch_id)
        {
            let nodes = g
                .nodes
                .iter()
                .filter(|n| n.launch_id == req.launch_id)
                .cloned()
                .collect();
            return (
                ProvisionReply {
                    launch_id: req.launch_id,
                    nodes,
                },
                Vec::new(),
            );
        }
        let ids: Vec<String> = if req.node_ids.is_empty() {
            (0..req.count.max(0))
                .map(|i| format!("{}-{i}", req.launch_id))
                .collect()
        } else {
            req.node_ids.clone()
        };
        let driver = self
            .driver
            .clone()
            .unwrap_or_else(|| req.deployable.driver().to_string());
        let now = Utc::now();
        let created: Vec<NodeRecord> = ids
            .iter()
            .map(|id| {
                node(&req.domain, id)
                    .run(self.bus.run())
                    .state(self.launch_state)
                    .driver(&driver)
                    .launch(&req.launch_id)
                    .iaas(&format!("i-{id}"))
                    .vars(req.vars.clone())
                    .at(now)
                    .build()
            })
            .collect();
        let created: Vec<NodeRecord> = created.into_iter().map(|r| g.upsert(r)).collect();
        g.launches.push(LaunchSummary {
            launch_id: req.launch_id.clone(),
            domain: req.domain.clone(),
            driver,
            node_ids: ids,
            requested_at: now,
            in_flight: false,
        });
        let answer = ProvisionReply {
            launch_id: req.launch_id.clone(),
            nodes: created.clone(),
        };
        g.provisions.push(Provisioned {
            at: Instant::now(),
            request: req,
        });
        (answer, created)
    }

    fn terminate(&self, req: TerminateNodesRequest) -> (TerminateNodesReply, Vec<NodeRecord>) {
        let mut g = self.lock();
        let now = Utc::now();
        let mut answer = TerminateNodesReply {
            terminating: Vec::new(),
            unknown: Vec::new(),
        };
        let mut changed = Vec::new();
        for id in &req.node_ids {
            match g.nodes.iter().find(|n| &n.node_id == id).map(|n| n.state) {
                Some(state) => {
                    answer.terminating.push(id.clone());
                    if !state.is_terminal() {
                        changed.extend(g.set_state(id, NodeState::Terminated, now));
                    }
                }
                None => answer.unknown.push(id.clone()),
            }
        }
        g.terminations.push(req);
        (answer, changed)
    }

    fn dump(&self) -> DumpStateReply {
        let g = self.lock();
        DumpStateReply {
            run: self.bus.run().to_string(),
            enabled: true,
            drivers: self.drivers.clone(),
            counts: counts(&g.nodes),
            launches: g.launches.clone(),
            nodes: g.nodes.clone(),
            revision: g.revision,
        }
    }

    /// The provisioner's answer, change feed included: `since` and `limit` page
    /// by revision, oldest change first.
    fn describe(&self, req: &DescribeNodesRequest) -> DescribeNodesReply {
        let g = self.lock();
        let since = req.since.unwrap_or(0);
        let full = !req.listing && (since == 0 || since > g.revision);
        let from = if full { 0 } else { since };
        let mut nodes: Vec<NodeRecord> = g
            .nodes
            .iter()
            .filter(|n| n.revision > from)
            .filter(|n| req.domain.as_ref().is_none_or(|d| &n.domain == d))
            .filter(|n| req.node_ids.is_empty() || req.node_ids.contains(&n.node_id))
            .filter(|n| !req.live_only || n.state.is_live())
            .cloned()
            .collect();
        nodes.sort_by_key(|n| n.revision);
        let more = req.limit.is_some_and(|l| nodes.len() > l);
        if let Some(l) = req.limit {
            nodes.truncate(l);
        }
        let next = match nodes.last() {
            Some(last) if more => last.revision,
            _ => g.revision,
        };
        DescribeNodesReply {
            enabled: true,
            nodes,
            revision: g.revision,
            next,
            more,
            full,
        }
    }
}

fn set(n: &mut NodeRecord, state: NodeState, at: DateTime<Utc>) {
    n.state = state;
    n.state_times.insert(state, at);
}

/// Nodes by state, every state present.
fn counts(nodes: &[NodeRecord]) -> StateCounts {
    let mut c: StateCounts = NodeState::ALL.iter().map(|s| (*s, 0)).collect();
    for n in nodes {
        *c.entry(n.state).or_default() += 1;
    }
    c
}

/// How a [`FakeProvisioner`] behaves; [`FakeProvisioner::builder`].
#[must_use = "call .serve(bus) to start the fake"]
pub struct FakeProvisionerBuilder {
    launch_state: NodeState,
    driver: Option<String>,
    publish: bool,
    nodes: Vec<NodeRecord>,
    drivers: Vec<String>,
}

impl FakeProvisionerBuilder {
    /// The state new nodes are created in (default RUNNING).
    pub fn launch_state(mut self, state: NodeState) -> Self {
        self.launch_state = state;
        self
    }

    /// The driver new records name (default: the deployable's driver).
    pub fn driver(mut self, driver: &str) -> Self {
        self.driver = Some(driver.to_string());
        self
    }

    /// Whether changes are published as `instance_info` (default true).
    pub fn publish(mut self, publish: bool) -> Self {
        self.publish = publish;
        self
    }

    /// Records the fake holds from the start.
    pub fn nodes(mut self, nodes: impl IntoIterator<Item = NodeRecord>) -> Self {
        self.nodes.extend(nodes);
        self
    }

    /// The drivers `dump_state` lists (default `["sim"]`).
    pub fn drivers(mut self, drivers: &[&str]) -> Self {
        self.drivers = drivers.iter().map(|d| d.to_string()).collect();
        self
    }

    /// Serves `Service::Provisioner` on `bus` until [`FakeProvisioner::stop`].
    pub async fn serve(self, bus: Arc<dyn Bus>) -> Result<FakeProvisioner, BusError> {
        let mut state = State::default();
        for n in self.nodes {
            state.upsert(n);
        }
        let inner = Arc::new(Inner {
            bus: bus.clone(),
            state: Mutex::new(state),
            launch_state: self.launch_state,
            driver: self.driver,
            publish: self.publish,
            drivers: self.drivers,
        });
        let h = inner.clone();
        let server = bus
            .serve(
                Service::Provisioner,
                Arc::new(FnHandler(move |msg: Incoming| {
                    let h = h.clone();
                    async move { h.handle(msg).await }
                })),
            )
            .await?;
        Ok(FakeProvisioner { inner, server })
    }
}

/// A provisioner without an IaaS; see the [module](self).
pub struct FakeProvisioner {
    inner: Arc<Inner>,
    server: Server,
}

impl FakeProvisioner {
    pub fn builder() -> FakeProvisionerBuilder {
        FakeProvisionerBuilder {
            launch_state: NodeState::Running,
            driver: None,
            publish: true,
            nodes: Vec::new(),
            drivers: vec!["sim".to_string()],
        }
    }

    /// The defaults, serving on `bus`.
    pub async fn serve(bus: Arc<dyn Bus>) -> Result<FakeProvisioner, BusError> {
        Self::builder().serve(bus).await
    }

    /// Stops serving (what it recorded stays readable).
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// Every record, oldest first.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.inner.lock().nodes.clone()
    }

    pub fn node(&self, node_id: &str) -> Option<NodeRecord> {
        self.inner
            .lock()
            .nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .cloned()
    }

    /// Records in `state`.
    pub fn count(&self, state: NodeState) -> usize {
        self.inner
            .lock()
            .nodes
            .iter()
            .filter(|n| n.state == state)
            .count()
    }

    /// Every `provision` received (each launch once), in order.
    pub fn provisions(&self) -> Vec<Provisioned> {
        self.inner.lock().provisions.clone()
    }

    /// How many `provision`s were received (each launch once).
    pub fn provision_count(&self) -> usize {
        self.inner.lock().provisions.len()
    }

    /// The `provision`s received after the first `skip`.
    pub fn provisions_from(&self, skip: usize) -> Vec<Provisioned> {
        self.inner
            .lock()
            .provisions
            .iter()
            .skip(skip)
            .cloned()
            .collect()
    }

    /// Every `terminate_nodes` received, in order.
    pub fn terminations(&self) -> Vec<TerminateNodesRequest> {
        self.inner.lock().terminations.clone()
    }

    /// Every node id asked to terminate, in order.
    pub fn terminated_ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .terminations
            .iter()
            .flat_map(|t| t.node_ids.iter().cloned())
            .collect()
    }

    /// How many requests of `R`'s operation arrived (repeats included).
    pub fn requests_of<R: Request>(&self) -> usize {
        self.inner
            .lock()
            .requests
            .get(R::OP.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// Adds or replaces a record without telling anyone (what `describe_nodes` and
    /// `dump_state` answer next).
    pub fn put(&self, record: NodeRecord) {
        self.inner.lock().upsert(record);
    }

    /// Moves `node_id` to `state` without telling anyone, as a lost
    /// `instance_info` would leave it: only `describe_nodes` shows the change.
    pub fn set_state_quietly(&self, node_id: &str, state: NodeState) -> Option<NodeRecord> {
        self.inner.lock().set_state(node_id, state, Utc::now())
    }

    /// Moves `node_id` to `state` (now) and publishes it as `instance_info` (unless
    /// publishing is off). `Ok(None)` when there is no such node.
    pub async fn set_state(
        &self,
        node_id: &str,
        state: NodeState,
    ) -> Result<Option<NodeRecord>, BusError> {
        let Some(changed) = self.set_state_quietly(node_id, state) else {
            return Ok(None);
        };
        self.inner.publish(std::slice::from_ref(&changed)).await?;
        Ok(Some(changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::Recorded;
    use epu_core::bus::local::LocalBus;
    use epu_core::testing::{test_options, test_run};
    use epu_model::messages::{Deployable, SimDeployable};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);

    fn provision(launch: &str, domain: &str, ids: &[&str]) -> ProvisionRequest {
        ProvisionRequest {
            launch_id: launch.into(),
            domain: domain.into(),
            count: ids.len() as i64,
            node_ids: ids.iter().map(|s| s.to_string()).collect(),
            deployable: Deployable::Sim(SimDeployable::default()),
            vars: BTreeMap::new(),
            subscriber: None,
            check_only: false,
        }
    }

    async fn controller(bus: &LocalBus) -> (Server, Recorded<NodeRecord>) {
        let rec: Recorded<NodeRecord> = Recorded::default();
        let r = rec.clone();
        let server = bus
            .serve(
                Service::Controller,
                Arc::new(FnHandler(move |m: Incoming| {
                    let r = r.clone();
                    async move {
                        if m.envelope.op == Op::InstanceInfo {
                            r.push(m.envelope.parse_body()?);
                        }
                        Ok(Value::Null)
                    }
                })),
            )
            .await
            .expect("serve controller");
        (server, rec)
    }

    #[tokio::test]
    async fn provisions_publishes_terminates_and_answers_typed() {
        let run = test_run("kit");
        let bus = LocalBus::new(run.clone(), test_options("host"));
        let (ctl, seen) = controller(&bus).await;
        let prov = FakeProvisioner::serve(Arc::new(bus.view(test_options("provisioner"))))
            .await
            .expect("serve");
        let cli = bus.view(test_options("epu-controller"));

        let req = provision("l1", "web", &["a", "b"]);
        let got = request::call(&cli, "test", &req, T)
            .await
            .expect("provision");
        assert_eq!(got.nodes.len(), 2);
        request::call(&cli, "test", &req, T).await.expect("again");
        assert_eq!(
            prov.provision_count(),
            1,
            "a repeated launch is recorded once"
        );
        assert_eq!(prov.requests_of::<ProvisionRequest>(), 2);
        assert_eq!(prov.count(NodeState::Running), 2);
        let a = prov.node("a").expect("a");
        assert_eq!(
            (a.run.as_str(), a.launch_id.as_str(), a.driver.as_str()),
            (run.as_str(), "l1", "sim")
        );
        assert_eq!(a.iaas_id.as_deref(), Some("i-a"));
        assert!(
            seen.wait_for(T, |r| r.node_id == "b").await.is_some(),
            "instance_info for b"
        );

        let t = TerminateNodesRequest {
            node_ids: vec!["a".into(), "zz".into()],
            domain: None,
        };
        let got = request::call(&cli, "test", &t, T).await.expect("terminate");
        assert_eq!(
            (got.terminating, got.unknown),
            (vec!["a".into()], vec!["zz".into()])
        );
        assert_eq!(prov.terminated_ids(), ["a", "zz"]);
        assert!(seen
            .wait_for(T, |r| r.node_id == "a" && r.state == NodeState::Terminated)
            .await
            .is_some());

        let dump = request::call(&cli, "test", &DumpStateRequest::default(), T)
            .await
            .expect("dump_state");
        assert_eq!(dump.run, run.as_str());
        assert_eq!(dump.nodes.len(), 2);
        assert_eq!(dump.counts[&NodeState::Terminated], 1);
        assert_eq!(dump.counts[&NodeState::Failed], 0);
        assert_eq!(dump.launches[0].node_ids, ["a", "b"]);

        let live = DescribeNodesRequest {
            live_only: true,
            ..Default::default()
        };
        let got = request::call(&cli, "test", &live, T)
            .await
            .expect("describe");
        assert_eq!(got.nodes.len(), 1);
        assert_eq!(got.nodes[0].node_id, "b");
        let other = DescribeNodesRequest {
            domain: Some("other".into()),
            ..Default::default()
        };
        let got = request::call(&cli, "test", &other, T)
            .await
            .expect("describe");
        assert!(got.nodes.is_empty());

        let failed = prov
            .set_state("b", NodeState::Failed)
            .await
            .expect("publish")
            .expect("b exists");
        assert_eq!(failed.state, NodeState::Failed);
        assert!(seen
            .wait_for(T, |r| r.node_id == "b" && r.state == NodeState::Failed)
            .await
            .is_some());
        prov.put(node("web", "c").run(&run).build());
        assert_eq!(prov.nodes().len(), 3);
        assert!(prov
            .set_state("nope", NodeState::Failed)
            .await
            .expect("ok")
            .is_none());

        let status = Envelope::new(&run, Op::Status, "cli", serde_json::json!({}));
        let e = cli
            .request(Service::Provisioner, &status, T)
            .await
            .expect_err("not faked");
        assert!(e.message.contains("status"), "{e}");
        prov.stop().await;
        ctl.stop().await;
    }

    #[tokio::test]
    async fn launch_state_driver_and_quiet_mode() {
        let run = test_run("kit2");
        let bus = LocalBus::new(run.clone(), test_options("host"));
        let (ctl, seen) = controller(&bus).await;
        let prov = FakeProvisioner::builder()
            .launch_state(NodeState::Pending)
            .driver("fake")
            .publish(false)
            .nodes([node("web", "old").run(&run).build()])
            .serve(Arc::new(bus.view(test_options("provisioner"))))
            .await
            .expect("serve");
        let cli = bus.view(test_options("epu-controller"));
        request::call(&cli, "test", &provision("l1", "web", &["n"]), T)
            .await
            .expect("provision");
        let n = prov.node("n").expect("n");
        assert_eq!((n.state, n.driver.as_str()), (NodeState::Pending, "fake"));
        assert_eq!(prov.nodes()[0].node_id, "old", "oldest first");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(seen.all().is_empty(), "nothing published");
        prov.stop().await;
        ctl.stop().await;
    }
}
