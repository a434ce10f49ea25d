//! The provisioner on the in-process bus with the sim driver and a fake EC2: lifecycle,
//! idempotency, crash safety at the library level, error classes, reconciliation,
//! terminate_all, metrics. No broker, no processes, a manual clock.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{call, describe, ec2_deployable, eventually, FakeEc2, Subscriber};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::ManualClock;
use epu_core::store::{MemStore, SharedStore};
use epu_core::testing::{test_options, test_run};
use epu_core::wire::{ErrorCode, Op, RunName};
use epu_model::messages::{FailReason, NodeRecord};
use epu_model::NodeState;
use provisioner::driver::sim::{SimDriver, SimSettings};
use provisioner::driver::{IaasError, IaasErrorKind};
use provisioner::{
    Drivers, Failpoint, FailpointAction, Provisioner, ProvisionerConfig, RunningProvisioner,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

struct Host {
    run: RunName,
    bus: LocalBus,
    client: Arc<dyn Bus>,
    store: SharedStore,
    clock: ManualClock,
    fake: Arc<FakeEc2>,
    sim: Arc<SimDriver>,
    sub: Subscriber,
}

impl Host {
    async fn new(name: &str) -> Host {
        let run = test_run(name);
        let bus = LocalBus::new(run.clone(), test_options("host"));
        let client: Arc<dyn Bus> = Arc::new(bus.view(test_options("client")));
        let sub = Subscriber::start(&bus.view(test_options("controller"))).await;
        let clock = ManualClock::default();
        let sim = Arc::new(SimDriver::new(
            clock.shared(),
            SimSettings {
                boot_secs: 30.0,
                failure_rate: 0.0,
                seed: 7,
            },
        ));
        Host {
            run,
            bus,
            client,
            store: Arc::new(MemStore::new()),
            clock,
            fake: FakeEc2::new(),
            sim,
            sub,
        }
    }

    fn config(&self) -> ProvisionerConfig {
        let mut cfg = ProvisionerConfig::new(self.run.clone());
        // The tests reconcile by hand (reconcile_now) on the manual clock.
        cfg.poll_interval_secs = 3600.0;
        cfg.disappear_grace_secs = 30.0;
        cfg.iaas_retry.initial_ms = 1;
        cfg.iaas_retry.max_ms = 5;
        cfg.iaas_retry.max_attempts = 4;
        cfg.drivers.local.enabled = false;
        cfg
    }

    fn provisioner(&self) -> Provisioner {
        let drivers = Drivers::new()
            .with(self.fake.clone())
            .with(self.sim.clone());
        Provisioner::new(
            self.config(),
            Arc::new(self.bus.view(test_options("provisioner"))),
            self.store.clone(),
            self.clock.shared(),
            drivers,
        )
        .expect("provisioner")
    }

    async fn start(&self) -> (Provisioner, RunningProvisioner) {
        let p = self.provisioner();
        let running = p.start().await.expect("start");
        (p, running)
    }

    async fn provision(
        &self,
        launch_id: &str,
        count: i64,
        deployable: serde_json::Value,
    ) -> Vec<NodeRecord> {
        let v = call(
            self.client.as_ref(),
            &self.run,
            Op::Provision,
            json!({"launch_id": launch_id, "domain": "d1", "count": count, "deployable": deployable}),
        )
        .await
        .expect("provision");
        serde_json::from_value(v["nodes"].clone()).expect("nodes")
    }

    async fn nodes(&self) -> Vec<NodeRecord> {
        describe(self.client.as_ref(), &self.run).await
    }

    async fn wait_all(&self, n: usize, pred: impl Fn(&NodeRecord) -> bool) -> Vec<NodeRecord> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let nodes = self.nodes().await;
            if nodes.len() == n && nodes.iter().all(&pred) {
                return nodes;
            }
            if std::time::Instant::now() > deadline {
                panic!("nodes never matched: {nodes:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn sim(boot: f64, failure_rate: f64) -> serde_json::Value {
    json!({"driver": "sim", "boot_secs": boot, "failure_rate": failure_rate})
}

#[tokio::test]
async fn sim_nodes_boot_on_the_clock_and_every_state_is_reported_in_order() {
    let h = Host::new("sim-life").await;
    let (_p, running) = h.start().await;
    let nodes = h.provision("l1", 20, sim(30.0, 0.25)).await;
    assert_eq!(nodes.len(), 20);
    assert!(nodes.iter().all(|n| n.state == NodeState::Requesting));
    h.wait_all(20, |n| n.state == NodeState::Pending && n.iaas_id.is_some())
        .await;
    // Not booted yet: nothing moves.
    h.clock.advance(Duration::from_secs(10));
    _p.reconcile_now().await;
    assert!(h
        .nodes()
        .await
        .iter()
        .all(|n| n.state == NodeState::Pending));
    h.clock.advance(Duration::from_secs(25));
    _p.reconcile_now().await;
    let done = h
        .wait_all(20, |n| {
            n.state == NodeState::Running || n.state == NodeState::Failed
        })
        .await;
    let failed: Vec<&NodeRecord> = done
        .iter()
        .filter(|n| n.state == NodeState::Failed)
        .collect();
    assert!(
        !failed.is_empty() && failed.len() < 20,
        "seeded failures: {}",
        failed.len()
    );
    assert!(failed
        .iter()
        .all(|n| n.reason == Some(FailReason::SimulatedFailure)));
    for n in &done {
        // Every state reported, forward only, with a timestamp per state.
        let seen = h.sub.states(&n.node_id);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted, "reports out of order for {}", n.node_id);
        assert_eq!(
            seen[..3],
            [
                NodeState::Requesting,
                NodeState::Requested,
                NodeState::Pending
            ]
        );
        assert_eq!(n.state_times.len(), 4, "{n:?}");
        assert_eq!(n.run, h.run.as_str());
        assert_eq!(n.driver, "sim");
    }
    // Seeded: the same failures every time for this seed and order.
    running.stop().await;
}

#[tokio::test]
async fn repeated_provision_with_a_known_launch_id_launches_nothing() {
    let h = Host::new("sim-dup").await;
    let (_p, running) = h.start().await;
    let first = h.provision("same", 3, ec2_deployable()).await;
    h.wait_all(3, |n| n.state == NodeState::Running).await;
    let again = h.provision("same", 3, ec2_deployable()).await;
    let ids = |v: &[NodeRecord]| {
        let mut ids: Vec<String> = v.iter().map(|n| n.node_id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&first), ids(&again));
    assert!(again.iter().all(|n| n.state == NodeState::Running));
    assert_eq!(h.fake.launch_calls.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.alive(&h.run).len(), 3);
    // A node id that belongs to another launch is a conflict.
    let e = call(
        h.client.as_ref(),
        &h.run,
        Op::Provision,
        json!({"launch_id": "other", "domain": "d1", "count": 1,
               "node_ids": [first[0].node_id], "deployable": ec2_deployable()}),
    )
    .await
    .expect_err("conflict");
    assert_eq!(e.code, ErrorCode::Conflict);
    running.stop().await;
}

#[tokio::test]
async fn a_crash_before_or_after_the_iaas_call_leaves_exactly_one_instance_per_node() {
    for fp in [
        Failpoint::AfterStoreBeforeIaas,
        Failpoint::AfterIaasBeforeStore,
    ] {
        let h = Host::new("sim-crash").await;
        let first = h.provisioner();
        first.set_failpoint(fp, FailpointAction::Halt);
        let mut reached = first.failpoint_reached();
        let running = first.start().await.expect("start");
        let nodes = h.provision("l1", 3, ec2_deployable()).await;
        tokio::time::timeout(WAIT, reached.wait_for(|r| *r == Some(fp)))
            .await
            .expect("failpoint reached")
            .expect("watch");
        // The crash: every task of the first provisioner dies where it is.
        running.abort().await;
        drop(first);
        let before = h.fake.launch_calls.load(Ordering::SeqCst);
        match fp {
            Failpoint::AfterStoreBeforeIaas => assert_eq!(before, 0),
            Failpoint::AfterIaasBeforeStore => {
                assert_eq!(before, 1);
                assert_eq!(h.fake.alive(&h.run).len(), 3);
            }
        }

        // A new provisioner over the same store and the same cloud.
        let (_second, running) = h.start().await;
        let done = h
            .wait_all(3, |n| n.state == NodeState::Running && n.iaas_id.is_some())
            .await;
        let alive = h.fake.alive(&h.run);
        assert_eq!(
            alive.len(),
            3,
            "{fp:?}: one instance per node, got {alive:?}"
        );
        for n in &nodes {
            let rec = done
                .iter()
                .find(|d| d.node_id == n.node_id)
                .expect("node kept");
            let inst = alive
                .iter()
                .find(|(id, _)| Some(id) == rec.iaas_id.as_ref())
                .expect("its instance");
            assert_eq!(inst.1.as_deref(), Some(n.node_id.as_str()));
        }
        // The re-drive used the stored token.
        let tokens = h.fake.tokens_seen.lock().expect("lock").clone();
        assert!(tokens.windows(2).all(|w| w[0] == w[1]), "{tokens:?}");
        // Nothing was taken for a zombie.
        _second.reconcile_now().await;
        assert_eq!(h.fake.alive(&h.run).len(), 3);
        running.stop().await;
    }
}

#[tokio::test]
async fn throttling_is_retried_capacity_fails_at_once_and_metrics_tell() {
    let h = Host::new("sim-errors").await;
    let (p, running) = h.start().await;
    h.fake.fail_next_launches(vec![
        IaasError::from_code("RequestLimitExceeded", "slow down"),
        IaasError::new(IaasErrorKind::Timeout, "the EC2 call timed out"),
    ]);
    let ok = h.provision("retried", 2, ec2_deployable()).await;
    h.wait_all(2, |n| n.state == NodeState::Running).await;
    assert_eq!(h.fake.launch_calls.load(Ordering::SeqCst), 3);
    let seen = h.sub.states(&ok[0].node_id);
    assert!(seen.contains(&NodeState::ErrorRetrying), "{seen:?}");

    h.fake.fail_next_launches(vec![IaasError::from_code(
        "InsufficientInstanceCapacity",
        "no t3.micro left",
    )]);
    let full = h.provision("full", 1, ec2_deployable()).await;
    let (_, rec) = h
        .sub
        .wait_state(&full[0].node_id, NodeState::Failed, WAIT)
        .await;
    assert_eq!(rec.reason, Some(FailReason::IaasFull));
    assert!(rec
        .reason_detail
        .as_deref()
        .is_some_and(|d| d.contains("InsufficientInstanceCapacity")));
    assert_eq!(h.fake.launch_calls.load(Ordering::SeqCst), 4, "no retry");

    h.fake
        .fail_next_launches(vec![IaasError::from_code("AuthFailure", "bad keys")]);
    let auth = h.provision("auth", 1, ec2_deployable()).await;
    let (_, rec) = h
        .sub
        .wait_state(&auth[0].node_id, NodeState::Failed, WAIT)
        .await;
    assert_eq!(rec.reason, Some(FailReason::IaasAuth));

    // Throttling until the retries run out.
    h.fake.fail_next_launches(
        (0..4)
            .map(|_| IaasError::from_code("RequestLimitExceeded", "slow down"))
            .collect(),
    );
    let limited = h.provision("limited", 1, ec2_deployable()).await;
    let (_, rec) = h
        .sub
        .wait_state(&limited[0].node_id, NodeState::Failed, WAIT)
        .await;
    assert_eq!(rec.reason, Some(FailReason::IaasRateLimited));

    let text = p.metrics().encode().expect("metrics");
    for needle in [
        "epu_provisioner_nodes{state=\"RUNNING\"} 2",
        "epu_provisioner_nodes{state=\"FAILED\"} 3",
        "epu_provisioner_launches_total{driver=\"ec2\",outcome=\"ok\"} 1",
        "epu_provisioner_launches_total{driver=\"ec2\",outcome=\"failed\"} 3",
        "epu_provisioner_nodes_launched_total{driver=\"ec2\"} 2",
        "epu_provisioner_iaas_errors_total{call=\"launch\",class=\"capacity\",driver=\"ec2\"} 1",
        "epu_provisioner_iaas_errors_total{call=\"launch\",class=\"throttled\",driver=\"ec2\"} 5",
        "epu_provisioner_iaas_errors_total{call=\"launch\",class=\"timeout\",driver=\"ec2\"} 1",
        "epu_provisioner_iaas_errors_total{call=\"launch\",class=\"auth\",driver=\"ec2\"} 1",
        "epu_provisioner_iaas_call_seconds_bucket{call=\"launch\",driver=\"ec2\",le=\"+Inf\"} 9",
        "epu_provisioner_enabled 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    running.stop().await;
}

#[tokio::test]
async fn zombies_are_terminated_and_vanished_nodes_fail_after_the_grace() {
    let h = Host::new("sim-reconcile").await;
    let (p, running) = h.start().await;
    let nodes = h.provision("l1", 2, ec2_deployable()).await;
    let done = h.wait_all(2, |n| n.state == NodeState::Running).await;
    let stranger = h.fake.add_stranger(&h.run);
    let other_run = test_run("other");
    let neighbour = h.fake.add_stranger(&other_run);
    p.reconcile_now().await;
    let alive: Vec<String> = h.fake.alive(&h.run).into_iter().map(|(id, _)| id).collect();
    assert!(!alive.contains(&stranger), "zombie left alive: {alive:?}");
    assert_eq!(alive.len(), 2);
    assert_eq!(
        h.fake.alive(&other_run).len(),
        1,
        "another run's instance {neighbour} untouched"
    );

    // One instance vanishes without a trace: FAILED only after the grace.
    let victim = done
        .iter()
        .find(|n| n.node_id == nodes[0].node_id)
        .expect("node");
    h.fake.vanish(victim.iaas_id.as_deref().expect("id"));
    p.reconcile_now().await;
    h.clock.advance(Duration::from_secs(20));
    p.reconcile_now().await;
    assert!(
        h.sub.find(&victim.node_id, NodeState::Failed).is_none(),
        "failed before the grace"
    );
    h.clock.advance(Duration::from_secs(11));
    p.reconcile_now().await;
    let (_, rec) = h
        .sub
        .wait_state(&victim.node_id, NodeState::Failed, WAIT)
        .await;
    assert_eq!(rec.reason, Some(FailReason::NodeDisappeared));
    // The other one is still running.
    let other = h
        .nodes()
        .await
        .into_iter()
        .find(|n| n.node_id == nodes[1].node_id)
        .expect("n");
    assert_eq!(other.state, NodeState::Running);
    let text = p.metrics().encode().expect("metrics");
    assert!(
        text.contains("epu_provisioner_zombies_terminated_total{driver=\"ec2\"} 1"),
        "{text}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_node_terminated_while_launching_has_its_instance_terminated_when_it_arrives() {
    let h = Host::new("sim-race").await;
    let (_p, running) = h.start().await;
    *h.fake.launch_delay.lock().expect("lock") = Duration::from_millis(300);
    let nodes = h.provision("slow", 1, ec2_deployable()).await;
    let id = nodes[0].node_id.clone();
    let v = call(
        h.client.as_ref(),
        &h.run,
        Op::TerminateNodes,
        json!({"node_ids": [id, "nobody"]}),
    )
    .await
    .expect("terminate_nodes");
    assert_eq!(v["terminating"], json!([id]));
    assert_eq!(v["unknown"], json!(["nobody"]));
    let (_, rec) = h.sub.wait_state(&id, NodeState::Terminated, WAIT).await;
    assert!(rec.iaas_id.is_some(), "the late instance id is recorded");
    assert!(h.fake.alive(&h.run).is_empty());
    // REQUESTED arrived after TERMINATING and was dropped: never reported.
    let seen = h.sub.states(&id);
    assert_eq!(
        seen,
        [
            NodeState::Requesting,
            NodeState::Terminating,
            NodeState::Terminated
        ],
        "{seen:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn terminate_all_disables_until_enable_and_the_flag_survives_a_restart() {
    let h = Host::new("sim-killrun").await;
    let (_p, running) = h.start().await;
    h.provision("a", 2, ec2_deployable()).await;
    h.provision("b", 3, sim(0.0, 0.0)).await;
    h.wait_all(5, |n| n.state == NodeState::Running).await;
    common::terminate_all_until_zero(h.client.as_ref(), &h.run, WAIT).await;
    assert!(h.fake.alive(&h.run).is_empty());
    assert_eq!(h.sim.alive(), 0);
    assert!(h
        .nodes()
        .await
        .iter()
        .all(|n| n.state == NodeState::Terminated));
    running.stop().await;

    // Restart: still disabled.
    let (_p, running) = h.start().await;
    let rejected = h.provision("c", 2, sim(0.0, 0.0)).await;
    assert!(rejected.iter().all(
        |n| n.state == NodeState::Rejected && n.reason == Some(FailReason::ProvisionerDisabled)
    ));
    assert_eq!(h.sim.alive(), 0);
    let v = call(h.client.as_ref(), &h.run, Op::Enable, json!({}))
        .await
        .expect("enable");
    assert_eq!(v["enabled"], true);
    h.provision("d", 1, sim(0.0, 0.0)).await;
    eventually(WAIT, "a node of launch d running", || async {
        h.nodes()
            .await
            .iter()
            .any(|n| n.launch_id == "d" && n.state == NodeState::Running)
    })
    .await;
    let dump = call(h.client.as_ref(), &h.run, Op::DumpState, json!({}))
        .await
        .expect("dump");
    assert_eq!(dump["enabled"], true);
    assert_eq!(dump["launches"].as_array().map(Vec::len), Some(4));
    assert_eq!(dump["counts"]["REJECTED"], 2);
    let status = call(h.client.as_ref(), &h.run, Op::Status, json!({}))
        .await
        .expect("status");
    assert_eq!(status["service"], "provisioner");
    // Filters of describe_nodes.
    let v = call(
        h.client.as_ref(),
        &h.run,
        Op::DescribeNodes,
        json!({"live_only": true}),
    )
    .await
    .expect("describe");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(1));
    // An operation the provisioner does not serve.
    let e = call(h.client.as_ref(), &h.run, Op::ListDomains, json!({})).await;
    assert!(e.is_err());
    running.stop().await;
}
