//! Shared by the integration tests: a subscriber that records `instance_info`, a
//! token-honouring fake EC2 with fault injection, and small helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use epu_core::bus::{Bus, Server};
use epu_core::wire::{Envelope, Op, ReplyError, RunName, Service};
use epu_model::messages::{Deployable, NodeRecord};
use epu_model::NodeState;
use epu_testkit::record_instance_info;
use provisioner::driver::{
    IaasDriver, IaasError, InstanceRef, InstanceState, LaunchOutcome, LaunchRequest,
    LaunchedInstance, ListedInstance, TerminateOutcome,
};
use serde_json::{json, Value};

/// Records every `instance_info` it receives, with the instant it arrived.
pub struct Subscriber {
    pub seen: Arc<Mutex<Vec<(Instant, NodeRecord)>>>,
    server: Option<Server>,
}

impl Subscriber {
    /// Serves the controller queue of `bus`.
    pub async fn start(bus: &dyn Bus) -> Subscriber {
        let (server, rec) = record_instance_info(bus).await.expect("serve controller");
        Subscriber {
            seen: rec.0,
            server: Some(server),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// The states reported for a node, in arrival order.
    pub fn states(&self, node_id: &str) -> Vec<NodeState> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, r)| r.node_id == node_id)
            .map(|(_, r)| r.state)
            .collect()
    }

    /// The first report of `node_id` in `state`, with its arrival time.
    pub fn find(&self, node_id: &str, state: NodeState) -> Option<(Instant, NodeRecord)> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .find(|(_, r)| r.node_id == node_id && r.state == state)
            .cloned()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    pub async fn wait_state(
        &self,
        node_id: &str,
        state: NodeState,
        timeout: Duration,
    ) -> (Instant, NodeRecord) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find(node_id, state) {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {node_id} was not reported {state} within {timeout:?}; reports: {:?}",
                    self.states(node_id)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Polls an async condition every 20 ms (the kit's; not every test binary uses it).
#[allow(unused_imports)]
pub use epu_testkit::eventually;

/// Sends a request to the provisioner and returns the result.
pub async fn call(bus: &dyn Bus, run: &RunName, op: Op, body: Value) -> Result<Value, ReplyError> {
    let env = Envelope::new(run, op, "test", body);
    bus.request(Service::Provisioner, &env, Duration::from_secs(20))
        .await
}

/// `describe_nodes` over the bus, as records.
pub async fn describe(bus: &dyn Bus, run: &RunName) -> Vec<NodeRecord> {
    let v = call(bus, run, Op::DescribeNodes, json!({}))
        .await
        .expect("describe_nodes");
    serde_json::from_value(v["nodes"].clone()).expect("nodes")
}

/// Polls `terminate_all` until nothing remains.
pub async fn terminate_all_until_zero(bus: &dyn Bus, run: &RunName, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = call(bus, run, Op::TerminateAll, json!({}))
            .await
            .expect("terminate_all");
        assert_eq!(v["disabled"], true);
        if v["remaining"] == 0 {
            return;
        }
        if Instant::now() > deadline {
            panic!("terminate_all still reports {} remaining", v["remaining"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// a fake EC2

#[derive(Clone, Debug)]
pub struct FakeInstance {
    pub run: String,
    pub node_id: Option<String>,
    pub launch_id: Option<String>,
    pub state: InstanceState,
}

/// An EC2 stand-in (driver name `ec2`) that honours client tokens, as EC2 does and
/// moto does not, with injectable faults. Share it between two provisioners to play a
/// cloud that outlives a crash.
#[derive(Default)]
pub struct FakeEc2 {
    pub instances: Mutex<BTreeMap<String, FakeInstance>>,
    tokens: Mutex<HashMap<String, Vec<(String, String)>>>,
    next: AtomicU64,
    pub launch_calls: AtomicUsize,
    pub terminate_calls: AtomicUsize,
    /// Errors the next launch calls fail with, in order.
    pub launch_faults: Mutex<VecDeque<IaasError>>,
    /// How long a launch call takes.
    pub launch_delay: Mutex<Duration>,
    /// Tokens each launch call carried.
    pub tokens_seen: Mutex<Vec<String>>,
}

impl FakeEc2 {
    pub fn new() -> Arc<FakeEc2> {
        Arc::new(FakeEc2::default())
    }

    pub fn fail_next_launches(&self, errors: Vec<IaasError>) {
        self.launch_faults.lock().expect("lock").extend(errors);
    }

    /// Instances of `run` that are not terminated: (id, node tag).
    pub fn alive(&self, run: &RunName) -> Vec<(String, Option<String>)> {
        self.instances
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, i)| i.run == run.as_str() && i.state != InstanceState::Terminated)
            .map(|(id, i)| (id.clone(), i.node_id.clone()))
            .collect()
    }

    /// An instance of the run that no record knows (made behind the provisioner's back).
    pub fn add_stranger(&self, run: &RunName) -> String {
        let id = format!("i-zombie{:06}", self.next.fetch_add(1, Ordering::SeqCst));
        self.instances.lock().expect("lock").insert(
            id.clone(),
            FakeInstance {
                run: run.to_string(),
                node_id: None,
                launch_id: None,
                state: InstanceState::Running,
            },
        );
        id
    }

    /// Removes an instance without a trace (the IaaS forgot it).
    pub fn vanish(&self, id: &str) {
        self.instances.lock().expect("lock").remove(id);
    }
}

#[async_trait]
impl IaasDriver for FakeEc2 {
    fn name(&self) -> &str {
        "ec2"
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<LaunchOutcome, IaasError> {
        self.launch_calls.fetch_add(1, Ordering::SeqCst);
        self.tokens_seen
            .lock()
            .expect("lock")
            .push(req.token.clone());
        let delay = *self.launch_delay.lock().expect("lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(e) = self.launch_faults.lock().expect("lock").pop_front() {
            return Err(e);
        }
        if !matches!(req.deployable, Deployable::Ec2(_)) {
            return Err(IaasError::bad_request("not an ec2 deployable"));
        }
        let mut tokens = self.tokens.lock().expect("lock");
        let mut instances = self.instances.lock().expect("lock");
        let known: HashMap<String, String> = tokens
            .get(&req.token)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        let mut out = LaunchOutcome::default();
        for node in &req.node_ids {
            let id = match known.get(node) {
                Some(id) => id.clone(),
                None => {
                    let id = format!("i-{:08x}", self.next.fetch_add(1, Ordering::SeqCst));
                    instances.insert(
                        id.clone(),
                        FakeInstance {
                            run: req.run.to_string(),
                            node_id: Some(node.clone()),
                            launch_id: Some(req.launch_id.clone()),
                            state: InstanceState::Running,
                        },
                    );
                    tokens
                        .entry(req.token.clone())
                        .or_default()
                        .push((node.clone(), id.clone()));
                    id
                }
            };
            out.instances.push(LaunchedInstance {
                node_id: node.clone(),
                iaas_id: id,
                incarnation: None,
                state: InstanceState::Running,
                addresses: vec!["10.0.0.1".into()],
            });
        }
        Ok(out)
    }

    async fn terminate(&self, refs: &[InstanceRef]) -> Result<Vec<TerminateOutcome>, IaasError> {
        self.terminate_calls.fetch_add(1, Ordering::SeqCst);
        let mut instances = self.instances.lock().expect("lock");
        Ok(refs
            .iter()
            .map(|r| {
                if let Some(i) = instances.get_mut(&r.iaas_id) {
                    i.state = InstanceState::Terminated;
                }
                TerminateOutcome::Gone
            })
            .collect())
    }

    async fn list(&self, run: &RunName) -> Result<Vec<ListedInstance>, IaasError> {
        let instances = self.instances.lock().expect("lock");
        Ok(instances
            .iter()
            .filter(|(_, i)| i.run == run.as_str())
            .map(|(id, i)| ListedInstance {
                iaas_id: id.clone(),
                incarnation: None,
                node_id: i.node_id.clone(),
                launch_id: i.launch_id.clone(),
                state: i.state,
                addresses: vec![],
                failure: None,
            })
            .collect())
    }
}

pub fn ec2_deployable() -> Value {
    json!({"driver": "ec2", "image": "ami-12345678", "instance_type": "t3.micro"})
}
