//! 1,000 domains in one controller: how fast does an event become a `provision`?
//!
//! `cargo bench -p epu-controller --bench domains`. In-process bus, a fake
//! provisioner that records when each `provision` arrives. Prints the
//! event-to-provision latency (p50/p99) for one failure at a time, and the wall
//! time of a decision round across all domains (a failure in every domain at once
//! until every domain has asked for its replacement).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decision_engines::Registry;
use epu_controller::{Controller, DomainPolicy, Timing};
use epu_core::bus::local::LocalBus;
use epu_core::bus::{Bus, FnHandler, Incoming};
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::{Health, Metrics};
use epu_core::testing::{test_options, test_run};
use epu_core::wire::{Envelope, Op, Service};
use epu_model::messages::{DescribeNodesReply, NodeRecord, ProvisionRequest};
use epu_model::NodeState;
use serde_json::{json, Value};

const DOMAINS: usize = 1000;

type Seen = Arc<Mutex<HashMap<String, (Instant, Vec<String>)>>>;

fn node(domain: &str, id: &str, launch: &str, run: &str, state: NodeState) -> NodeRecord {
    let mut t = BTreeMap::new();
    t.insert(state, chrono::Utc::now());
    NodeRecord {
        node_id: id.into(),
        launch_id: launch.into(),
        domain: domain.into(),
        run: run.into(),
        driver: "sim".into(),
        iaas_id: None,
        addresses: vec![],
        state,
        reason: None,
        reason_detail: None,
        state_times: t,
        vars: Default::default(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let run = test_run("bench");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let prov_bus = bus.view(test_options("provisioner"));
    let s = seen.clone();
    let r = run.to_string();
    let out = prov_bus.clone();
    let prov = prov_bus
        .serve(
            Service::Provisioner,
            Arc::new(FnHandler(move |m: Incoming| {
                let (s, r, out) = (s.clone(), r.clone(), out.clone());
                async move {
                    let env = m.envelope;
                    match env.op {
                        Op::Provision => {
                            let req: ProvisionRequest = env.parse_body()?;
                            s.lock()
                                .expect("lock")
                                .insert(req.domain.clone(), (Instant::now(), req.node_ids.clone()));
                            for id in &req.node_ids {
                                let rec =
                                    node(&req.domain, id, &req.launch_id, &r, NodeState::Running);
                                let e = Envelope::with_body(out.run(), Op::InstanceInfo, "p", &rec)
                                    .expect("enc");
                                out.send(Service::Controller, &e).await.expect("send");
                            }
                            Ok(Value::Null)
                        }
                        Op::DumpState => Ok(json!(DescribeNodesReply {
                            enabled: true,
                            nodes: vec![]
                        })),
                        _ => Ok(Value::Null),
                    }
                }
            })),
        )
        .await
        .expect("serve");
    let mut policies = BTreeMap::new();
    for i in 0..DOMAINS {
        let p: DomainPolicy = serde_json::from_value(json!({
            "name": format!("d{i}"), "engine": "npreserving",
            "engine_conf": {"preserve_n": 1}, "deployable": {"driver": "sim"},
        }))
        .expect("policy");
        policies.insert(p.name.clone(), p);
    }
    let (_ctl, server) = Controller::start(
        run.clone(),
        Arc::new(bus.view(test_options("epu-controller"))),
        Arc::new(MemStore::new()),
        SystemClock::shared(),
        &Metrics::new(),
        Health::new(),
        Registry::with_builtins(),
        policies,
        Timing {
            decision_interval_secs: 30.0,
            debounce_ms: 0,
            request_timeout_secs: 10.0,
        },
    )
    .await
    .expect("controller");
    let wait_all = |want: usize| {
        let seen = seen.clone();
        async move {
            while seen.lock().expect("lock").len() < want {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    wait_all(DOMAINS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One event at a time: a node fails; time until that domain's provision arrives.
    let mut latencies = Vec::with_capacity(DOMAINS);
    for i in 0..DOMAINS {
        let domain = format!("d{i}");
        let (_, ids) = seen.lock().expect("lock").remove(&domain).expect("seen");
        let failed = node(&domain, &ids[0], "x", run.as_str(), NodeState::Failed);
        let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", &failed).expect("enc");
        let t0 = Instant::now();
        bus.send(Service::Controller, &e).await.expect("send");
        loop {
            if let Some((t1, _)) = seen.lock().expect("lock").get(&domain) {
                latencies.push(t1.duration_since(t0));
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    latencies.sort();

    // A round: every domain loses its node at once.
    let mut failures = Vec::with_capacity(DOMAINS);
    {
        let mut g = seen.lock().expect("lock");
        for i in 0..DOMAINS {
            let domain = format!("d{i}");
            let (_, ids) = g.remove(&domain).expect("seen");
            failures.push(node(&domain, &ids[0], "x", run.as_str(), NodeState::Failed));
        }
    }
    let t0 = Instant::now();
    for f in &failures {
        let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", f).expect("enc");
        bus.send(Service::Controller, &e).await.expect("send");
    }
    wait_all(DOMAINS).await;
    let round = t0.elapsed();
    println!("controller with {DOMAINS} domains (npreserving, in-process bus)");
    println!(
        "event-to-provision latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "decision round across all {DOMAINS} domains (event to every provision): {:.1} ms",
        round.as_secs_f64() * 1e3
    );
    server.stop().await;
    prov.stop().await;
}
