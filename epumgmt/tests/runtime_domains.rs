//! Domains added at runtime (`add_domain`), on the services wired in one process:
//! - a domain is judged by the sensor aggregator with its own health settings, not
//!   the defaults: the aggregator, meeting a domain it was not configured with,
//!   takes `health` from the controller's `describe_domain`;
//! - a domain whose deployable the provisioner would refuse (a driver it does not
//!   enable) is refused by `add_domain` itself, naming the key; nothing is added;
//! - a launch the provisioner refuses at launch time (here: a sim deployable with a
//!   negative boot time, which only the launch checks) is a fact: its nodes reach
//!   the controller REJECTED with the reason, they stop counting as capacity, and
//!   the domain backs off.
//!
//! Wired as the standalone host wires it (provisioner, controller and aggregator on
//! one in-process bus), with the provisioner's `sim` driver (virtual instances,
//! RUNNING after 0.1 s) and the test heartbeating as the worker, so the only clock
//! that matters is the aggregator's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use decision_engines::Registry;
use epu_controller::{Controller, ControllerDeps, ControllerSetup, RunningController, Timing};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::request;
use epu_core::store::MemStore;
use epu_core::telemetry::{Health as Ready, Metrics};
use epu_core::testing::{test_options, test_run};
use epu_core::wire::{Envelope, Op, RunName, Service};
use epu_model::messages::{
    DescribeDomainRequest, EngineState, FailReason, Heartbeat, ListDomainsRequest, WorkerState,
};
use epu_model::{Health, NodeState};
use provisioner::driver::sim::{SimDriver, SimSettings};
use provisioner::{Drivers, Provisioner, ProvisionerConfig, RunningProvisioner};
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps};
use serde_json::json;

/// The longest any single wait in this file may take.
const DEADLINE: Duration = Duration::from_secs(20);

async fn beat(bus: &LocalBus, run: &RunName, node_id: &str, domain: &str) {
    let hb = Heartbeat {
        node_id: node_id.into(),
        domain: domain.into(),
        state: WorkerState::Ok,
        jobs: 0,
        exit_code: None,
        stderr_tail: None,
        at: chrono::Utc::now(),
    };
    let env = Envelope::with_body(run, Op::Heartbeat, "worker", &hb).expect("encode heartbeat");
    bus.send(Service::SensorAggregator, &env)
        .await
        .expect("send heartbeat");
}

/// Polls `f` every 20 ms until it gives a value, or fails after [`DEADLINE`] saying
/// what it waited for and what it saw last.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("waited {DEADLINE:?} for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn health_of(agg: &Aggregator, domain: &str, node_id: &str) -> Option<Health> {
    agg.reading(domain)
        .nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .map(|n| n.health)
}

/// The provisioner with the `sim` driver only (virtual instances, RUNNING after
/// 0.1 s), as the standalone host wires it.
async fn start_provisioner(
    bus: &LocalBus,
    run: &RunName,
    dir: &std::path::Path,
) -> RunningProvisioner {
    let mut pcfg = ProvisionerConfig::new(run.clone());
    pcfg.poll_interval_secs = 0.2;
    pcfg.run_dir = dir.join("run");
    let mut drivers = Drivers::new();
    drivers.insert(Arc::new(SimDriver::new(
        SystemClock::shared(),
        SimSettings {
            boot_secs: 0.1,
            failure_rate: 0.0,
            seed: 7,
        },
    )));
    let prov = Provisioner::new(
        pcfg,
        Arc::new(bus.view(test_options("provisioner"))),
        Arc::new(MemStore::new()),
        SystemClock::shared(),
        drivers,
    )
    .expect("provisioner");
    prov.start().await.expect("provisioner starts")
}

/// The controller with no domains (they are added at runtime), fast timing.
async fn start_controller(bus: &LocalBus, run: &RunName) -> RunningController {
    // `Controller::start` retries `dump_state` until the provisioner answers: bounded here.
    let started = tokio::time::timeout(
        DEADLINE,
        Controller::new(
            ControllerSetup {
                run: run.clone(),
                policies: BTreeMap::new(),
                timing: Timing {
                    decision_interval_secs: 0.2,
                    debounce_ms: 20,
                    request_timeout_secs: 5.0,
                    ..Default::default()
                },
            },
            ControllerDeps {
                bus: Arc::new(bus.view(test_options("epu-controller"))),
                store: Arc::new(MemStore::new()),
                clock: SystemClock::shared(),
                metrics: Metrics::new(),
                readiness: Ready::new(),
                registry: Registry::with_builtins(),
            },
        )
        .expect("controller builds")
        .start(),
    )
    .await;
    started
        .unwrap_or_else(|_| panic!("waited {DEADLINE:?} for the controller to start (dump_state)"))
        .expect("controller starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_domain_health_settings_reach_the_aggregator() {
    let run = test_run("add-health");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let dir = tempfile::tempdir().expect("temp dir");
    let prov_running = start_provisioner(&bus, &run, dir.path()).await;

    // The aggregator knows no domain: its config lists none, as for a domain added
    // after launch.
    let mut acfg = AggregatorConfig::new(run.clone());
    acfg.nodes_poll_secs = 0.1;
    let agg = Aggregator::new(
        acfg,
        AggregatorDeps {
            bus: Arc::new(bus.view(test_options("sensor-aggregator"))),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let agg_running = agg.start().await.expect("aggregator starts");
    let ctl_server = start_controller(&bus, &run).await;

    // add_domain with a missing timeout of 1 s (the default is 15 s).
    let cli = bus.view(test_options("cli"));
    let policy = json!({
        "name": "quick",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": 1},
        "deployable": {"driver": "sim"},
        "health": {"missing_timeout_secs": 1, "boot_timeout_secs": 30},
    });
    let add = Envelope::new(&run, Op::AddDomain, "cli", policy);
    cli.request(Service::Controller, &add, Duration::from_secs(10))
        .await
        .expect("add_domain accepted");
    let describe = Envelope::new(&run, Op::DescribeDomain, "cli", json!({"domain": "quick"}));
    let described = cli
        .request(Service::Controller, &describe, Duration::from_secs(10))
        .await
        .expect("describe_domain");
    assert_eq!(
        described["health"]["missing_timeout_secs"],
        json!(1.0),
        "describe_domain carries the policy's health settings: {described}"
    );

    let sensors = Envelope::new(&run, Op::DescribeSensors, "cli", json!({"domain": "quick"}));
    let node_id = wait_for("the domain's worker to be RUNNING", || {
        agg.reading("quick")
            .nodes
            .first()
            .map(|n| n.node_id.clone())
            .ok_or_else(|| "no node of domain quick at the aggregator".to_string())
    })
    .await;

    // The worker heartbeats until the aggregator judges it OK *and* has taken the
    // domain's settings from the controller (the positive marker before the timing).
    let deadline = Instant::now() + DEADLINE;
    loop {
        beat(&bus, &run, &node_id, "quick").await;
        let v = cli
            .request(Service::SensorAggregator, &sensors, Duration::from_secs(5))
            .await
            .map(|v| v["domains"][0].clone());
        let learned = v
            .as_ref()
            .is_ok_and(|d| d["missing_timeout_secs"] == json!(1.0));
        let ok = health_of(&agg, "quick", &node_id) == Some(Health::Ok);
        if learned && ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waited {DEADLINE:?} for the aggregator to judge {node_id} OK with the added domain's \
             missing timeout of 1 s; health {:?}, describe_sensors {v:?}",
            health_of(&agg, "quick", &node_id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The worker falls silent: MISSING after ~1 s, not 15.
    beat(&bus, &run, &node_id, "quick").await;
    let silent_since = Instant::now();
    wait_for(
        "the silent worker to be judged MISSING",
        || match health_of(&agg, "quick", &node_id) {
            Some(Health::Missing) => Ok(()),
            other => Err(format!("{other:?} after {:?}", silent_since.elapsed())),
        },
    )
    .await;
    let after = silent_since.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_secs(5),
        "MISSING {after:?} after the last heartbeat; the domain's missing timeout is 1 s \
         (the default, 15 s, would mean the aggregator never heard of the setting)"
    );

    ctl_server.stop().await;
    agg_running.stop().await;
    prov_running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_launch_reaches_the_controller_and_the_domain_backs_off() {
    let run = test_run("refused");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let dir = tempfile::tempdir().expect("temp dir");
    let prov_running = start_provisioner(&bus, &run, dir.path()).await;
    let ctl = start_controller(&bus, &run).await;
    let cli = bus.view(test_options("cli"));

    // The provisioner enables `sim` only: a `local` worker is refused when the
    // domain is added, before anything is stored or launched.
    let local = json!({
        "name": "refused-early",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": 2},
        "deployable": {"driver": "local", "command": "sleep", "args": ["60"]},
    });
    let add = Envelope::new(&run, Op::AddDomain, "cli", local);
    let err = cli
        .request(Service::Controller, &add, Duration::from_secs(10))
        .await
        .expect_err("add_domain refused");
    assert!(
        err.message.contains("\"deployable\"") && err.message.contains("not enabled"),
        "{err}"
    );
    let listed = request::call(&cli, "cli", &ListDomainsRequest {}, Duration::from_secs(5))
        .await
        .expect("list_domains");
    assert!(
        listed.iter().all(|d| d.domain != "refused-early"),
        "nothing was added"
    );

    // What only a launch checks is refused then, and recorded.
    let policy = json!({
        "name": "refused",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": 2},
        "deployable": {"driver": "sim", "boot_secs": -1.0},
    });
    let add = Envelope::new(&run, Op::AddDomain, "cli", policy);
    cli.request(Service::Controller, &add, Duration::from_secs(10))
        .await
        .expect("add_domain accepted");
    let added = Instant::now();
    let ask = DescribeDomainRequest {
        domain: "refused".into(),
    };
    let deadline = Instant::now() + DEADLINE;
    let (rejected, took) = loop {
        let d = request::call(&cli, "cli", &ask, Duration::from_secs(5))
            .await
            .expect("describe_domain");
        let rejected: Vec<_> = d
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Rejected)
            .cloned()
            .collect();
        if rejected.len() >= 2 {
            break (rejected, added.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "waited {DEADLINE:?} for the refused launch to reach the controller; nodes: {:?}",
            d.nodes
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for n in &rejected {
        assert_eq!(n.reason, Some(FailReason::RequestRefused), "{n:?}");
    }
    assert!(
        took < Duration::from_secs(5),
        "the refusal took {took:?} to reach the controller"
    );
    eprintln!("refusal reached the controller {took:?} after add_domain");

    // The refused nodes are no capacity: the domain backs off instead of showing
    // them pending for ever.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let d = request::call(&cli, "cli", &ask, Duration::from_secs(5))
            .await
            .expect("describe_domain");
        if d.summary.engine_state == EngineState::BackingOff {
            assert_eq!(d.summary.running, 0);
            assert!(
                d.nodes
                    .iter()
                    .all(|n| n.state == NodeState::Rejected || n.state <= NodeState::Requested),
                "{:?}",
                d.nodes
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waited {DEADLINE:?} for the domain to back off; summary {:?}",
            d.summary
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    ctl.stop().await;
    prov_running.stop().await;
}
