//! End to end over RabbitMQ: the controller binary as a process, the provisioner
//! (library) on the sim driver. preserve_n=3 reaches 3 RUNNING; a crashed node is
//! replaced; reconfigure to 5 reaches 5; the controller is SIGKILLed and restarted
//! with no duplicate launches and 5 still in force.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::SledStore;
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run, TEST_SECRET};
use epu_core::wire::{Envelope, Op, RunName, Service};
use epu_model::messages::DescribeNodesReply;
use epu_model::NodeState;
use provisioner::driver::sim::{SimDriver, SimSettings};
use provisioner::{Drivers, Provisioner, ProvisionerConfig};
use serde_json::{json, Value};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_controller(dir: &Path, run: &RunName) -> Killed {
    let policy = dir.join("web.toml");
    std::fs::write(
        &policy,
        "name = \"web\"\nengine = \"npreserving\"\n[engine_conf]\npreserve_n = 3\n[deployable]\ndriver = \"sim\"\n",
    )
    .expect("policy");
    let cfg = dir.join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "run = \"{run}\"\npolicies = [\"{}\"]\n[bus]\namqp_url = \"{}\"\nsecret = \"{}\"\n[store]\npath = \"{}\"\n[timing]\ndecision_interval_secs = 0.5\ndebounce_ms = 20\n",
            policy.display(),
            amqp_url(),
            String::from_utf8_lossy(TEST_SECRET),
            dir.join("ctl-store").display()
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_epu-controller"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start epu-controller");
    Killed(child)
}

async fn nodes(bus: &AmqpBus, run: &RunName) -> Vec<epu_model::messages::NodeRecord> {
    let env = Envelope::new(run, Op::DescribeNodes, "test", json!({}));
    let v = bus
        .request(Service::Provisioner, &env, Duration::from_secs(10))
        .await
        .expect("describe_nodes");
    serde_json::from_value::<DescribeNodesReply>(v)
        .expect("reply")
        .nodes
}

fn running(ns: &[epu_model::messages::NodeRecord]) -> usize {
    ns.iter().filter(|n| n.state == NodeState::Running).count()
}

async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_n_replace_reconfigure_and_survive_sigkill() {
    let run = test_run("ctl-e2e");
    let dir = tempfile::tempdir().expect("tmp");
    let prov_bus = amqp_bus(&run, test_options("provisioner")).await;
    let client = amqp_bus(&run, test_options("client")).await;

    let mut cfg = ProvisionerConfig::new(run.clone());
    cfg.poll_interval_secs = 0.2;
    cfg.run_dir = dir.path().join("run");
    let sim = Arc::new(SimDriver::new(
        SystemClock::shared(),
        SimSettings {
            boot_secs: 0.2,
            failure_rate: 0.0,
            seed: 7,
        },
    ));
    let mut drivers = Drivers::new();
    drivers.insert(sim.clone());
    let prov = Provisioner::new(
        cfg,
        Arc::new(prov_bus.clone()),
        Arc::new(SledStore::open(dir.path().join("prov-store")).expect("store")),
        SystemClock::shared(),
        drivers,
    )
    .expect("provisioner");
    let prov_running = prov.start().await.expect("start");

    let mut ctl = start_controller(dir.path(), &run);
    eventually("3 RUNNING", 60, || async {
        running(&nodes(&client, &run).await) == 3
    })
    .await;

    // A node crashes at the IaaS: the provisioner reports it FAILED, the domain replaces it.
    let victim = nodes(&client, &run).await[0].node_id.clone();
    assert!(sim.crash(&victim));
    eventually("FAILED and replaced", 60, || async {
        let ns = nodes(&client, &run).await;
        running(&ns) == 3
            && ns
                .iter()
                .any(|n| n.node_id == victim && n.state == NodeState::Failed)
    })
    .await;
    assert_eq!(nodes(&client, &run).await.len(), 4);

    // Reconfigure to 5 (signed, over the broker).
    let req = Envelope::new(
        &run,
        Op::Reconfigure,
        "test",
        json!({"domain": "web", "engine_conf": {"preserve_n": 5}}),
    );
    let v: Value = client
        .request(Service::Controller, &req, Duration::from_secs(10))
        .await
        .expect("accepted");
    assert_eq!(v["engine_conf"]["preserve_n"], json!(5));
    eventually("5 RUNNING", 60, || async {
        running(&nodes(&client, &run).await) == 5
    })
    .await;
    let launched = nodes(&client, &run).await.len();
    assert_eq!(launched, 6, "3 + 1 replacement + 2 more");

    // SIGKILL the controller and start it again over the same store.
    ctl.0.kill().expect("SIGKILL");
    let _ = ctl.0.wait();
    drop(ctl);
    let _ctl = start_controller(dir.path(), &run);
    let d = Envelope::new(&run, Op::DescribeDomain, "test", json!({"domain": "web"}));
    eventually("the controller answers again", 60, || async {
        client
            .request(Service::Controller, &d, Duration::from_secs(2))
            .await
            .is_ok()
    })
    .await;
    // Give it several decision rounds to (wrongly) launch anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ns = nodes(&client, &run).await;
    assert_eq!(
        ns.len(),
        launched,
        "no duplicate launches after the restart"
    );
    assert_eq!(running(&ns), 5);
    let desc = client
        .request(Service::Controller, &d, Duration::from_secs(10))
        .await
        .expect("describe");
    assert_eq!(
        desc["engine_conf"]["preserve_n"],
        json!(5),
        "the reconfigured value is still in force"
    );

    prov_running.stop().await;
    client.delete_topology().await.expect("cleanup");
    client.close().await;
    prov_bus.close().await;
}
