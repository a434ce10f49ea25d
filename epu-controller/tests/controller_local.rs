//! The controller against a fake provisioner on the in-process bus: domains reach
//! their size, failures are replaced, reconfigure is applied and survives a
//! restart, bad policies are refused with the file and key named.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use decision_engines::Registry;
use epu_controller::{
    load_policy, Controller, ControllerDeps, ControllerSetup, DomainPolicy, RunningController,
    Timing,
};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::{MemStore, Store};
use epu_core::telemetry::{Health as Ready, Metrics};
use epu_core::testing::{test_options, test_run, wait_until};
use epu_core::wire::{Envelope, Op, Service};
use epu_model::NodeState;
use epu_testkit::FakeProvisioner;
use serde_json::json;

/// The fake provisioner on its own view of the bus, driver "fake".
async fn fake_provisioner(bus: &LocalBus) -> FakeProvisioner {
    FakeProvisioner::builder()
        .driver("fake")
        .serve(Arc::new(bus.view(test_options("provisioner"))))
        .await
        .expect("serve the fake provisioner")
}

fn npreserving(n: u32) -> DomainPolicy {
    serde_json::from_value(json!({
        "name": "web",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": n},
        "deployable": {"driver": "sim"},
    }))
    .expect("policy")
}

fn fast() -> Timing {
    Timing {
        decision_interval_secs: 0.2,
        debounce_ms: 20,
        request_timeout_secs: 5.0,
        ..Default::default()
    }
}

fn running(prov: &FakeProvisioner) -> usize {
    prov.count(NodeState::Running)
}

async fn start(
    bus: &LocalBus,
    store: Arc<dyn Store>,
    policies: BTreeMap<String, DomainPolicy>,
) -> RunningController {
    Controller::new(
        ControllerSetup {
            run: bus.run().clone(),
            policies,
            timing: fast(),
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

#[tokio::test]
async fn preserves_n_replaces_failures_reconfigures_and_remembers_across_restart() {
    let run = test_run("ctl");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake_provisioner(&bus).await;
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut policies = BTreeMap::new();
    policies.insert("web".to_string(), npreserving(3));
    let server = start(&bus, store.clone(), policies.clone()).await;
    let t = Duration::from_secs(10);
    assert!(
        wait_until(t, || running(&prov) == 3).await,
        "reaches 3 RUNNING"
    );

    // A node fails: the controller replaces it.
    let victim = prov
        .nodes()
        .into_iter()
        .find(|r| r.state == NodeState::Running)
        .expect("one RUNNING node");
    prov.set_state(&victim.node_id, NodeState::Failed)
        .await
        .expect("instance_info sent")
        .expect("the victim is known");
    assert!(
        wait_until(t, || running(&prov) == 3 && prov.nodes().len() == 4).await,
        "replaced with a new node"
    );

    // Reconfigure (signed, through the bus as epumgmt does) to 5.
    let cli = bus.view(test_options("cli"));
    let req = Envelope::new(
        &run,
        Op::Reconfigure,
        "cli",
        json!({"domain": "web", "engine_conf": {"preserve_n": "5"}}),
    );
    let got = cli
        .request(Service::Controller, &req, t)
        .await
        .expect("accepted");
    assert_eq!(got["engine_conf"]["preserve_n"], json!("5"));
    assert!(wait_until(t, || running(&prov) == 5).await, "reaches 5");

    // A bad reconfigure is refused and the old value stays.
    let bad = Envelope::new(
        &run,
        Op::Reconfigure,
        "cli",
        json!({"domain": "web", "engine_conf": {"preserve_n": -2}}),
    );
    let err = cli
        .request(Service::Controller, &bad, t)
        .await
        .expect_err("refused");
    assert!(err.message.contains("preserve_n"), "{err}");
    let unknown = Envelope::new(
        &run,
        Op::Reconfigure,
        "cli",
        json!({"domain": "nope", "engine_conf": {}}),
    );
    let err = cli
        .request(Service::Controller, &unknown, t)
        .await
        .expect_err("no such domain");
    assert_eq!(err.code, epu_core::wire::ErrorCode::NotFound);

    // Restart the controller over the same store: 5 still in force, nothing launched twice.
    server.stop().await;
    let launched_before = prov.nodes().len();
    // The policy file still says 3; the stored reconfiguration wins.
    let server = start(&bus, store.clone(), policies).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running(&prov), 5);
    assert_eq!(prov.nodes().len(), launched_before, "no duplicate launches");
    let d = Envelope::new(&run, Op::DescribeDomain, "cli", json!({"domain": "web"}));
    let desc = cli
        .request(Service::Controller, &d, t)
        .await
        .expect("describe");
    assert_eq!(desc["engine_conf"]["preserve_n"], json!("5"));
    assert_eq!(desc["running"], json!(5));
    server.stop().await;
    prov.stop().await;
}

#[tokio::test]
async fn dry_run_decides_but_launches_nothing_and_paused_does_not_decide() {
    let run = test_run("dry");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake_provisioner(&bus).await;
    let mut p = npreserving(2);
    p.dry_run = true;
    let mut policies = BTreeMap::new();
    policies.insert("web".to_string(), p);
    let server = start(&bus, Arc::new(MemStore::new()), policies).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(prov.provision_count(), 0, "dry run launches nothing");
    let cli = bus.view(test_options("cli"));
    let t = Duration::from_secs(10);
    let d = Envelope::new(&run, Op::DescribeDomain, "cli", json!({"domain": "web"}));
    let desc = cli
        .request(Service::Controller, &d, t)
        .await
        .expect("describe");
    let decisions = desc["decisions"].as_array().expect("decisions");
    assert!(
        !decisions.is_empty(),
        "decisions are still made and recorded"
    );
    assert_eq!(decisions[0]["dry_run"], json!(true));
    // Pause, then leave dry run: still nothing, because paused.
    let r = Envelope::new(
        &run,
        Op::Reconfigure,
        "cli",
        json!({"domain": "web", "paused": true, "dry_run": false}),
    );
    cli.request(Service::Controller, &r, t).await.expect("ok");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(prov.provision_count(), 0, "paused launches nothing");
    let r = Envelope::new(
        &run,
        Op::Reconfigure,
        "cli",
        json!({"domain": "web", "paused": false}),
    );
    cli.request(Service::Controller, &r, t).await.expect("ok");
    assert!(wait_until(t, || running(&prov) == 2).await);
    server.stop().await;
    prov.stop().await;
}

#[tokio::test]
async fn domains_are_added_listed_and_removed_at_runtime() {
    let run = test_run("dom");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake_provisioner(&bus).await;
    let server = start(&bus, Arc::new(MemStore::new()), BTreeMap::new()).await;
    let cli = bus.view(test_options("cli"));
    let t = Duration::from_secs(10);
    let mut policy = npreserving(2);
    policy.sensors.queue = Some("jobs.{run}.{domain}".into());
    let add = Envelope::with_body(&run, Op::AddDomain, "cli", &policy).expect("enc");
    cli.request(Service::Controller, &add, t)
        .await
        .expect("added");
    let describe = Envelope::new(&run, Op::DescribeDomain, "cli", json!({"domain": "web"}));
    let described = cli
        .request(Service::Controller, &describe, t)
        .await
        .expect("describe");
    assert_eq!(
        described["policy"]["sensors"]["queue"],
        json!(format!("jobs.{}.web", run.as_str())),
        "add_domain fills in {{run}} and {{domain}}"
    );
    let err = cli
        .request(Service::Controller, &add, t)
        .await
        .expect_err("twice");
    assert_eq!(err.code, epu_core::wire::ErrorCode::Conflict);
    assert!(wait_until(t, || running(&prov) == 2).await);
    let list = Envelope::new(&run, Op::ListDomains, "cli", json!({}));
    let domains = cli
        .request(Service::Controller, &list, t)
        .await
        .expect("list");
    assert_eq!(domains.as_array().expect("array").len(), 1);
    assert_eq!(domains[0]["domain"], json!("web"));
    let mut bad = npreserving(1);
    bad.engine = "nonesuch".into();
    let add_bad = Envelope::with_body(&run, Op::AddDomain, "cli", &bad).expect("enc");
    let err = cli
        .request(Service::Controller, &add_bad, t)
        .await
        .expect_err("unknown engine");
    assert!(err.message.contains("nonesuch"), "{err}");
    let rm = Envelope::new(&run, Op::RemoveDomain, "cli", json!({"domain": "web"}));
    cli.request(Service::Controller, &rm, t)
        .await
        .expect("removed");
    assert!(
        wait_until(t, || running(&prov) == 0).await,
        "its instances are destroyed"
    );
    let domains = cli
        .request(Service::Controller, &list, t)
        .await
        .expect("list");
    assert_eq!(domains, json!([]));
    server.stop().await;
    prov.stop().await;
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn bad_policy_files_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::with_builtins();
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "unknown-engine.toml",
            "name = \"a\"\nengine = \"magic\"\n[deployable]\ndriver = \"sim\"\n",
            "magic",
        ),
        (
            "missing-key.toml",
            "name = \"a\"\nengine = \"npreserving\"\n[engine_conf]\n[deployable]\ndriver = \"sim\"\n",
            "preserve_n",
        ),
        (
            "water.toml",
            "name = \"a\"\nengine = \"queuelen\"\n[engine_conf]\nqueuelen_high_water = 5\nqueuelen_low_water = 10\nmin_instances = 0\nmax_instances = 4\n[deployable]\ndriver = \"sim\"\n",
            "queuelen_low_water",
        ),
        (
            "negative.yaml",
            "name: a\nengine: npreserving\nengine_conf:\n  preserve_n: -3\ndeployable:\n  driver: sim\n",
            "preserve_n",
        ),
        (
            "typo.toml",
            "name = \"a\"\nengine = \"npreserving\"\nengin_conf = {}\n[deployable]\ndriver = \"sim\"\n",
            "engin_conf",
        ),
        (
            "no-image.toml",
            "name = \"a\"\nengine = \"npreserving\"\n[engine_conf]\npreserve_n = 1\n[deployable]\ndriver = \"ec2\"\n",
            "image",
        ),
    ];
    for (file, text, key) in cases {
        let path = write(&dir, file, text);
        let err = load_policy(&path, &reg, "r1").expect_err(file).to_string();
        assert!(err.contains(file), "{file}: names the file: {err}");
        assert!(err.contains(key), "{file}: names {key}: {err}");
    }
    let ok = write(
        &dir,
        "ok.toml",
        "name = \"web\"\nengine = \"npreserving\"\n[engine_conf]\npreserve_n = 2\n[deployable]\ndriver = \"local\"\ncommand = \"sleep\"\nargs = [\"100\", \"{run}/{domain}\"]\n[sensors]\nqueue = \"jobs.{run}\"\n",
    );
    let p = load_policy(&ok, &reg, "r1").expect("valid");
    assert_eq!(p.name, "web");
    assert_eq!(
        p.sensors.queue.as_deref(),
        Some("jobs.r1"),
        "{{run}} filled in"
    );
    let epu_model::messages::Deployable::Local(l) = &p.deployable else {
        panic!("a local deployable: {p:?}")
    };
    assert_eq!(l.args, ["100", "r1/web"]);
}
