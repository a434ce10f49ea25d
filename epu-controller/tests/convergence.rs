//! Level-triggered convergence: the controller against a fake provisioner on the
//! in-process bus, with messages lost on purpose. A change nobody published is
//! repaired by the interval resync; a skipped revision triggers one at once;
//! history read back at start is not counted as fresh launch failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use decision_engines::Registry;
use epu_controller::{
    Controller, ControllerDeps, ControllerSetup, DomainPolicy, RunningController, Timing,
};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::{MemStore, Store};
use epu_core::telemetry::{Health as Ready, Metrics};
use epu_core::testing::{test_options, test_run, wait_until};
use epu_model::NodeState;
use epu_testkit::records::node;
use epu_testkit::FakeProvisioner;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn npreserving(n: u32) -> DomainPolicy {
    serde_json::from_value(json!({
        "name": "web",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": n},
        "deployable": {"driver": "sim"},
    }))
    .expect("policy")
}

async fn start(bus: &LocalBus, policy: DomainPolicy, resync_secs: f64) -> RunningController {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    Controller::new(
        ControllerSetup {
            run: bus.run().clone(),
            policies: BTreeMap::from([(policy.name.clone(), policy)]),
            timing: Timing {
                decision_interval_secs: 0.2,
                debounce_ms: 20,
                request_timeout_secs: 5.0,
                resync_secs,
            },
        },
        ControllerDeps {
            bus: Arc::new(bus.view(test_options("epu-controller"))),
            store,
            clock: SystemClock::shared(),
            metrics: Metrics::new(),
            readiness: Ready::new(),
            registry: Registry::with_builtins(),
        },
    )
    .expect("controller builds")
    .start()
    .await
    .expect("controller starts")
}

async fn fake(
    bus: &LocalBus,
    builder: epu_testkit::fake_provisioner::FakeProvisionerBuilder,
) -> FakeProvisioner {
    builder
        .serve(Arc::new(bus.view(test_options("provisioner"))))
        .await
        .expect("serve the fake provisioner")
}

/// Waits until the failed node was replaced (3 RUNNING of 4 records), then stops.
async fn replaced_then_stop(prov: FakeProvisioner, ctl: RunningController, why: &str) {
    assert!(
        wait_until(T, || prov.count(NodeState::Running) == 3
            && prov.nodes().len() == 4)
        .await,
        "{why}: {:?}",
        prov.nodes()
    );
    ctl.stop().await;
    prov.stop().await;
}

fn a_running_node(prov: &FakeProvisioner) -> String {
    prov.nodes()
        .into_iter()
        .find(|r| r.state == NodeState::Running)
        .map(|r| r.node_id)
        .expect("a RUNNING node")
}

#[tokio::test]
async fn a_lost_instance_info_is_repaired_by_the_next_resync() {
    let bus = LocalBus::new(test_run("ctl-lost"), test_options("host"));
    let prov = fake(&bus, FakeProvisioner::builder()).await;
    let ctl = start(&bus, npreserving(3), 0.5).await;
    assert!(
        wait_until(T, || prov.count(NodeState::Running) == 3).await,
        "reaches 3 RUNNING"
    );
    // The node fails and its instance_info is lost: only the feed has it.
    let victim = a_running_node(&prov);
    prov.set_state_quietly(&victim, NodeState::Failed)
        .expect("the victim is known");
    replaced_then_stop(
        prov,
        ctl,
        "the resync saw the failure and the domain replaced it",
    )
    .await;
}

#[tokio::test]
async fn a_skipped_revision_makes_the_controller_resync_at_once() {
    let bus = LocalBus::new(test_run("ctl-gap"), test_options("host"));
    let prov = fake(&bus, FakeProvisioner::builder()).await;
    // No interval resync within the test: only the gap can repair it.
    let ctl = start(&bus, npreserving(3), 3600.0).await;
    assert!(
        wait_until(T, || prov.count(NodeState::Running) == 3).await,
        "reaches 3 RUNNING"
    );
    let victim = a_running_node(&prov);
    prov.set_state_quietly(&victim, NodeState::Failed)
        .expect("the victim is known");
    // The next published change carries a revision one past the lost one.
    let other = prov
        .nodes()
        .into_iter()
        .find(|r| r.state == NodeState::Running)
        .map(|r| r.node_id)
        .expect("another RUNNING node");
    prov.set_state(&other, NodeState::Running)
        .await
        .expect("instance_info sent")
        .expect("known");
    replaced_then_stop(
        prov,
        ctl,
        "the gap triggered a resync and the failure was replaced",
    )
    .await;
}

#[tokio::test]
async fn old_failures_read_back_at_start_do_not_hold_launches_back() {
    let bus = LocalBus::new(test_run("ctl-history"), test_options("host"));
    let run = bus.run().to_string();
    // Six launches that failed an hour ago: history, not a crash loop.
    let an_hour_ago = Utc::now() - chrono::TimeDelta::hours(1);
    let history = (0..6).map(|i| {
        node("web", &format!("old-{i}"))
            .run(&run)
            .launch(&format!("l-old-{i}"))
            .state(NodeState::Failed)
            .at(an_hour_ago)
            .build()
    });
    let prov = fake(&bus, FakeProvisioner::builder().nodes(history)).await;
    let ctl = start(&bus, npreserving(2), 10.0).await;
    // Six counted failures would hold launches back for 300 s.
    assert!(
        wait_until(T, || prov.count(NodeState::Running) == 2).await,
        "launched at once: {} provisions",
        prov.provision_count()
    );
    ctl.stop().await;
    prov.stop().await;
}
