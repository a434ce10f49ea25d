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
use epu_model::messages::{DescribeNodesReply, DumpStateReply, FailReason, NodeRecord};
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
    // REQUESTED arrived after TERMINATING and was dropped: never reported (the
    // late instance id is, as a second TERMINATING report).
    let mut seen = h.sub.states(&id);
    seen.dedup();
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

// ------------------------------------------------------------ the change feed

async fn feed(h: &Host, body: serde_json::Value) -> DescribeNodesReply {
    let v = call(h.client.as_ref(), &h.run, Op::DescribeNodes, body)
        .await
        .expect("describe_nodes");
    serde_json::from_value(v).expect("describe_nodes reply")
}

#[tokio::test]
async fn the_change_feed_pages_by_revision_has_no_holes_and_costs_nothing_when_unchanged() {
    let h = Host::new("sim-feed").await;
    let (p, running) = h.start().await;
    h.provision("l1", 25, sim(30.0, 0.0)).await;
    h.wait_all(25, |n| n.state == NodeState::Pending).await;

    // A full listing in pages of 10, oldest change first.
    let mut since = 0;
    let mut seen = std::collections::BTreeSet::new();
    let mut pages = 0;
    loop {
        let page = feed(&h, json!({"since": since, "limit": 10})).await;
        pages += 1;
        assert!(page.nodes.len() <= 10);
        assert_eq!(page.full, since == 0, "only the first page is asked from 0");
        let revs: Vec<u64> = page.nodes.iter().map(|n| n.revision).collect();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "oldest change first: {revs:?}"
        );
        assert!(
            revs.iter().all(|r| *r > since),
            "only changes after {since}"
        );
        seen.extend(page.nodes.iter().map(|n| n.node_id.clone()));
        since = page.next;
        if !page.more {
            assert_eq!(page.next, page.revision, "the last page ends at the head");
            break;
        }
        assert_eq!(Some(page.next), revs.last().copied());
    }
    assert_eq!((seen.len(), pages), (25, 3));

    // Unchanged: a resync from the head lists nothing.
    let quiet = feed(&h, json!({"since": since, "limit": 1000})).await;
    assert!(
        quiet.nodes.is_empty() && !quiet.more && !quiet.full,
        "{quiet:?}"
    );
    let quiet_bytes = serde_json::to_vec(&quiet).expect("encode").len();
    assert!(
        quiet_bytes < 200,
        "an unchanged fleet's resync is {quiet_bytes} bytes"
    );

    // Booted: exactly the changed records, each once, at its new revision.
    h.clock.advance(Duration::from_secs(31));
    p.reconcile_now().await;
    h.wait_all(25, |n| n.state == NodeState::Running).await;
    let changed = feed(&h, json!({"since": since})).await;
    assert_eq!(changed.nodes.len(), 25);
    assert!(changed
        .nodes
        .iter()
        .all(|n| n.state == NodeState::Running && n.revision > since));

    // Every change was published with its own revision: no holes, none twice.
    let head = changed.revision;
    eventually(WAIT, "every revision published", || async {
        h.sub.count() as u64 == head
    })
    .await;
    let mut published: Vec<u64> = h
        .sub
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, r)| r.revision)
        .collect();
    published.sort_unstable();
    assert_eq!(published, (1..=head).collect::<Vec<u64>>());

    // A `since` past the head (a provisioner with a new store) is answered in full.
    let reset = feed(&h, json!({"since": head + 100, "limit": 1000})).await;
    assert!(
        reset.full && reset.nodes.len() == 25,
        "{}",
        reset.nodes.len()
    );
    running.stop().await;
}

#[tokio::test]
async fn dump_state_honours_its_filters() {
    let h = Host::new("sim-dump").await;
    let (_p, running) = h.start().await;
    let d1 = h.provision("l1", 2, sim(30.0, 0.0)).await;
    call(
        h.client.as_ref(),
        &h.run,
        Op::Provision,
        json!({"launch_id": "l2", "domain": "d2", "count": 1, "deployable": sim(30.0, 0.0)}),
    )
    .await
    .expect("provision d2");
    call(
        h.client.as_ref(),
        &h.run,
        Op::TerminateNodes,
        json!({"node_ids": [d1[0].node_id]}),
    )
    .await
    .expect("terminate");
    h.wait_all(3, |n| n.state != NodeState::Requesting).await;
    let dump = |body: serde_json::Value| {
        let h = &h;
        async move {
            let v = call(h.client.as_ref(), &h.run, Op::DumpState, body)
                .await
                .expect("dump_state");
            serde_json::from_value::<DumpStateReply>(v).expect("dump_state reply")
        }
    };
    let all = dump(json!({})).await;
    assert_eq!((all.nodes.len(), all.launches.len()), (3, 2));
    assert!(all.revision > 0);
    let only_d2 = dump(json!({"domain": "d2"})).await;
    assert!(only_d2.nodes.iter().all(|n| n.domain == "d2") && only_d2.nodes.len() == 1);
    assert_eq!(only_d2.launches.len(), 1);
    assert_eq!(only_d2.launches[0].launch_id, "l2");
    let live = dump(json!({"domain": "d1", "live_only": true})).await;
    assert_eq!(live.nodes.len(), 1);
    assert_eq!(live.nodes[0].node_id, d1[1].node_id);
    running.stop().await;
}

#[tokio::test]
async fn old_terminal_records_are_pruned_and_an_older_since_is_answered_in_full() {
    let h = Host::new("sim-prune").await;
    let (p, running) = h.start().await;
    let nodes = h.provision("l1", 3, sim(0.0, 0.0)).await;
    h.provision("l2", 1, sim(0.0, 0.0)).await;
    p.reconcile_now().await;
    h.wait_all(4, |n| n.state == NodeState::Running).await;
    let before = feed(&h, json!({"since": 0, "limit": 1})).await.revision;
    let gone: Vec<String> = nodes[..2].iter().map(|n| n.node_id.clone()).collect();
    call(
        h.client.as_ref(),
        &h.run,
        Op::TerminateNodes,
        json!({"node_ids": gone}),
    )
    .await
    .expect("terminate");
    p.reconcile_now().await;
    h.wait_all(4, |n| {
        n.state == NodeState::Running || n.state == NodeState::Terminated
    })
    .await;
    // Young history stays.
    assert_eq!(p.prune_now().await, 0);
    // Past the retention (2 h by default): the two terminated records go; their
    // launch stays while one of its nodes lives.
    h.clock.advance(Duration::from_secs(7201));
    assert_eq!(p.prune_now().await, 2);
    let left = h.nodes().await;
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|n| n.state == NodeState::Running));
    let dumped = p.dump_state().await;
    assert_eq!(dumped.launches.len(), 2);
    // A subscriber that last saw `before` may have missed how the pruned ended:
    // it gets everything, marked full.
    let stale = feed(&h, json!({"since": before, "limit": 100})).await;
    assert!(stale.full, "{stale:?}");
    assert_eq!(stale.nodes.len(), 2);
    // Paged, the full listing ends: its further pages (asked since revisions
    // older than what was pruned) continue it instead of starting it over.
    let first = feed(&h, json!({"since": before, "limit": 1})).await;
    assert!(
        first.full && first.more && first.nodes.len() == 1,
        "{first:?}"
    );
    let mut names: Vec<String> = first.nodes.iter().map(|n| n.node_id.clone()).collect();
    let mut since = first.next;
    for _ in 0..5 {
        let page = feed(&h, json!({"since": since, "limit": 1, "listing": true})).await;
        assert!(!page.full, "a further page is not judged again: {page:?}");
        names.extend(page.nodes.iter().map(|n| n.node_id.clone()));
        since = page.next;
        if !page.more {
            break;
        }
    }
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        2,
        "the listing ended with every record once: {names:?}"
    );
    running.stop().await;

    // The pruning is durable, and so is the mark.
    let (_p2, running2) = h.start().await;
    assert_eq!(h.nodes().await.len(), 2);
    let stale = feed(&h, json!({"since": before, "limit": 100})).await;
    assert!(stale.full);
    running2.stop().await;
}

#[tokio::test]
async fn a_tombstone_keeps_a_late_launch_from_starting_its_node() {
    let h = Host::new("sim-tomb").await;
    let (p, running) = h.start().await;
    let v = call(
        h.client.as_ref(),
        &h.run,
        Op::TerminateNodes,
        json!({"node_ids": ["n-late"], "domain": "d1"}),
    )
    .await
    .expect("terminate");
    assert_eq!(v["unknown"], json!(["n-late"]));
    let (_, grave) = h
        .sub
        .wait_state("n-late", NodeState::Terminated, WAIT)
        .await;
    assert_eq!(grave.reason, Some(FailReason::Cancelled));
    assert_eq!(grave.domain, "d1");
    // The launch that was sent before the cancel arrives late.
    let v = call(
        h.client.as_ref(),
        &h.run,
        Op::Provision,
        json!({"launch_id": "l-late", "domain": "d1", "count": 2,
               "node_ids": ["n-late", "n-ok"], "deployable": sim(0.0, 0.0)}),
    )
    .await
    .expect("provision");
    let ids: Vec<String> = serde_json::from_value::<Vec<NodeRecord>>(v["nodes"].clone())
        .expect("nodes")
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(ids, ["n-ok"], "only the live node is launched");
    p.reconcile_now().await;
    h.sub.wait_state("n-ok", NodeState::Running, WAIT).await;
    assert_eq!(
        h.sim.alive(),
        1,
        "one instance: the tombstoned node never started"
    );
    let late = h.nodes().await.into_iter().find(|n| n.node_id == "n-late");
    assert_eq!(late.map(|n| n.state), Some(NodeState::Terminated));
    // A launch of the tombstone alone launches nothing.
    let v = call(
        h.client.as_ref(),
        &h.run,
        Op::Provision,
        json!({"launch_id": "l-late-2", "domain": "d1", "count": 1,
               "node_ids": ["n-late"], "deployable": sim(0.0, 0.0)}),
    )
    .await
    .expect("provision");
    assert_eq!(v["nodes"][0]["state"], "TERMINATED");
    p.reconcile_now().await;
    assert_eq!(h.sim.alive(), 1);
    running.stop().await;
}
