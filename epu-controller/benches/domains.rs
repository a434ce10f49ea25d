//! 1,000 domains in one controller: how fast does an event become a `provision`?
//!
//! `cargo bench -p epu-controller --bench domains`. In-process bus, a fake
//! provisioner that records when each `provision` arrives. Prints the
//! event-to-provision latency (p50/p99) for one failure at a time, and the wall
//! time of a decision round across all domains (a failure in every domain at once
//! until every domain has asked for its replacement).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decision_engines::Registry;
use epu_controller::{Controller, ControllerDeps, ControllerSetup, DomainPolicy, Timing};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::{Health, Metrics};
use epu_core::testing::{test_options, test_run};
use epu_core::wire::{Envelope, Op, RunName, Service};
use epu_model::messages::NodeRecord;
use epu_model::NodeState;
use epu_testkit::{node, FakeProvisioner};
use serde_json::json;

const DOMAINS: usize = 1000;
/// How long any one wait of the bench may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Waits (up to `DEADLINE`) until `prov` has received `want` provisions.
async fn wait_provisions(prov: &FakeProvisioner, want: usize) {
    let deadline = Instant::now() + DEADLINE;
    while prov.provision_count() < want {
        if Instant::now() >= deadline {
            panic!(
                "waited {DEADLINE:?} for {want} provisions, got {}",
                prov.provision_count()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A failure of each domain's most recent node, as the provisioner would report it.
fn failures(prov: &FakeProvisioner, run: &RunName) -> HashMap<String, NodeRecord> {
    prov.provisions()
        .into_iter()
        .map(|p| {
            let id = p.request.node_ids[0].clone();
            let failed = node(&p.request.domain, &id)
                .run(run)
                .launch("x")
                .state(NodeState::Failed)
                .build();
            (p.request.domain, failed)
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let run = test_run("bench");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = FakeProvisioner::serve(Arc::new(bus.view(test_options("provisioner"))))
        .await
        .expect("serve the fake provisioner");
    let mut policies = BTreeMap::new();
    for i in 0..DOMAINS {
        let p: DomainPolicy = serde_json::from_value(json!({
            "name": format!("d{i}"), "engine": "npreserving",
            "engine_conf": {"preserve_n": 1}, "deployable": {"driver": "sim"},
        }))
        .expect("policy");
        policies.insert(p.name.clone(), p);
    }
    let server = Controller::new(
        ControllerSetup {
            run: run.clone(),
            policies,
            timing: Timing {
                decision_interval_secs: 30.0,
                debounce_ms: 0,
                request_timeout_secs: 10.0,
                ..Default::default()
            },
        },
        ControllerDeps {
            bus: Arc::new(bus.view(test_options("epu-controller"))),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: Metrics::new(),
            readiness: Health::new(),
            registry: Registry::with_builtins(),
        },
    )
    .expect("controller")
    .start()
    .await
    .expect("controller");
    wait_provisions(&prov, DOMAINS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One event at a time: a node fails; time until that domain's provision arrives.
    let mut latencies = Vec::with_capacity(DOMAINS);
    let mut failed = failures(&prov, &run);
    for i in 0..DOMAINS {
        let domain = format!("d{i}");
        let f = failed.remove(&domain).expect("a node of every domain");
        let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", &f).expect("enc");
        let before = prov.provision_count();
        let t0 = Instant::now();
        bus.send(Service::Controller, &e).await.expect("send");
        let deadline = t0 + DEADLINE;
        loop {
            if prov.provision_count() > before {
                if let Some(p) = prov
                    .provisions_from(before)
                    .into_iter()
                    .find(|p| p.request.domain == domain)
                {
                    latencies.push(p.at.duration_since(t0));
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!("waited {DEADLINE:?} for the replacement provision of {domain}");
            }
            tokio::task::yield_now().await;
        }
    }
    latencies.sort();

    // A round: every domain loses its node at once.
    let failed = failures(&prov, &run);
    let before = prov.provision_count();
    let t0 = Instant::now();
    for f in failed.values() {
        let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", f).expect("enc");
        bus.send(Service::Controller, &e).await.expect("send");
    }
    wait_provisions(&prov, before + DOMAINS).await;
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
