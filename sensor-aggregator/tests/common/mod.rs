//! Test helpers: cleanup guards, a recording controller, a fake provisioner.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use epu_core::bus::{Bus, FnHandler, Server};
use epu_core::testing::amqp_url;
use epu_core::wire::{Envelope, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    DescribeNodesReply, DescribeNodesRequest, Heartbeat, NodeRecord, SensorInfo, WorkerState,
};
use epu_model::NodeState;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// Deletes the run's topology and the work queues a test declared when dropped —
/// also when the test panics. Declare it first in a test so it is dropped last.
pub struct Cleanup {
    run: RunName,
    queues: Vec<String>,
}

impl Cleanup {
    pub fn new(run: &RunName) -> Self {
        Cleanup {
            run: run.clone(),
            queues: Vec::new(),
        }
    }

    /// Also delete this work queue.
    pub fn queue(&mut self, name: &str) {
        self.queues.push(name.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let run = self.run.clone();
        let queues = std::mem::take(&mut self.queues);
        // A fresh runtime on its own thread: Drop cannot await, and may run while
        // the test's runtime is panicking.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                let mut names: Vec<String> = Service::ALL.iter().map(|s| run.queue(*s)).collect();
                names.push(run.dead_queue());
                names.extend(queues);
                for q in names {
                    // A fresh channel each: deleting a missing queue closes the channel.
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(run.exchange().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// A lapin connection to the test broker.
pub async fn lapin_conn() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ at EPU_AMQP_URL or 127.0.0.1:5672 (see epu_core::testing)")
}

/// Declares a durable work queue.
pub async fn declare_queue(conn: &Connection, name: &str) {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let _ = ch.close(200, "ok".into()).await;
}

/// What a recording handler has seen, with when it arrived.
#[derive(Clone)]
pub struct Recorded<T>(pub Arc<Mutex<Vec<(Instant, T)>>>);

impl<T> Default for Recorded<T> {
    fn default() -> Self {
        Recorded(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T: Clone> Recorded<T> {
    pub fn all(&self) -> Vec<(Instant, T)> {
        self.0.lock().expect("lock").clone()
    }

    pub fn find(&self, f: impl Fn(&T) -> bool) -> Option<(Instant, T)> {
        self.all().into_iter().find(|(_, v)| f(v))
    }

    pub fn find_after(&self, after: Instant, f: impl Fn(&T) -> bool) -> Option<(Instant, T)> {
        self.all().into_iter().find(|(t, v)| *t >= after && f(v))
    }

    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find(&f) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_after(
        &self,
        after: Instant,
        timeout: Duration,
        f: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find_after(after, &f) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Serves the controller queue, recording every `sensor_info`.
pub async fn record_controller(bus: &dyn Bus) -> (Server, Recorded<SensorInfo>) {
    let rec: Recorded<SensorInfo> = Recorded::default();
    let r = rec.0.clone();
    let server = bus
        .serve(
            Service::Controller,
            Arc::new(FnHandler(move |msg: epu_core::bus::Incoming| {
                let r = r.clone();
                async move {
                    if msg.envelope.op == Op::SensorInfo {
                        let info: SensorInfo = msg.envelope.parse_body()?;
                        r.lock().expect("lock").push((Instant::now(), info));
                    }
                    Ok::<_, ReplyError>(json!({}))
                }
            })),
        )
        .await
        .expect("serve controller");
    (server, rec)
}

/// The node records a fake provisioner answers `describe_nodes` with.
pub type Nodes = Arc<Mutex<Vec<NodeRecord>>>;

/// Serves the provisioner queue: `describe_nodes` answers with `nodes`, filtered as
/// the real one filters.
pub async fn fake_provisioner(bus: &dyn Bus, nodes: Nodes) -> Server {
    bus.serve(
        Service::Provisioner,
        Arc::new(FnHandler(move |msg: epu_core::bus::Incoming| {
            let nodes = nodes.clone();
            async move {
                let req: DescribeNodesRequest = msg.envelope.parse_body()?;
                let all = nodes.lock().expect("lock").clone();
                let picked: Vec<NodeRecord> = all
                    .into_iter()
                    .filter(|n| req.node_ids.is_empty() || req.node_ids.contains(&n.node_id))
                    .filter(|n| !req.live_only || n.state.is_live())
                    .collect();
                Ok::<_, ReplyError>(json!(DescribeNodesReply {
                    enabled: true,
                    nodes: picked
                }))
            }
        })),
    )
    .await
    .expect("serve provisioner")
}

/// A node record in `state` since `since` (RUNNING since then, for RUNNING).
pub fn node(
    id: &str,
    domain: &str,
    run: &RunName,
    state: NodeState,
    since: DateTime<Utc>,
) -> NodeRecord {
    let mut times = BTreeMap::new();
    times.insert(NodeState::Requesting, since);
    times.insert(state, since);
    NodeRecord {
        node_id: id.into(),
        launch_id: format!("launch-{id}"),
        domain: domain.into(),
        run: run.to_string(),
        driver: "local".into(),
        iaas_id: None,
        addresses: vec![],
        state,
        reason: None,
        reason_detail: None,
        state_times: times,
        vars: BTreeMap::new(),
    }
}

pub fn heartbeat(node_id: &str, domain: &str, jobs: u32, at: DateTime<Utc>) -> Heartbeat {
    Heartbeat {
        node_id: node_id.into(),
        domain: domain.into(),
        state: WorkerState::Ok,
        jobs,
        exit_code: None,
        stderr_tail: None,
        at,
    }
}

/// Sends a heartbeat the way the agent does.
pub async fn send_heartbeat(bus: &dyn Bus, hb: &Heartbeat) {
    let env = Envelope::with_body(bus.run(), Op::Heartbeat, "test-agent", hb).expect("env");
    bus.send(Service::SensorAggregator, &env)
        .await
        .expect("send heartbeat");
}

/// The health of `node` in `info`, if listed.
pub fn health_of(info: &SensorInfo, node: &str) -> Option<epu_model::Health> {
    info.nodes
        .iter()
        .find(|n| n.node_id == node)
        .map(|n| n.health)
}

/// Serves the sensor-aggregator queue, recording every heartbeat (stands in for
/// the aggregator in agent tests).
pub async fn record_heartbeats(bus: &dyn Bus) -> (Server, Recorded<Heartbeat>) {
    let rec: Recorded<Heartbeat> = Recorded::default();
    let r = rec.0.clone();
    let server = bus
        .serve(
            Service::SensorAggregator,
            Arc::new(FnHandler(move |msg: epu_core::bus::Incoming| {
                let r = r.clone();
                async move {
                    if msg.envelope.op == Op::Heartbeat {
                        let hb: Heartbeat = msg.envelope.parse_body()?;
                        r.lock().expect("lock").push((Instant::now(), hb));
                    }
                    Ok::<_, ReplyError>(json!({}))
                }
            })),
        )
        .await
        .expect("serve sensor-aggregator");
    (server, rec)
}
