//! The local driver over RabbitMQ (and one test on the in-process bus): workers are
//! real processes. Exits are reported at once, terminate_all leaves nothing alive, bad
//! requests launch nothing, and the provisioner *binary* killed at a failpoint and
//! restarted leads to exactly one worker per node.
//!
//! Needs RabbitMQ at 127.0.0.1:5672 (or `EPU_AMQP_URL`); `bash .ci/run` starts it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{call, describe, eventually, terminate_all_until_zero, Subscriber};
use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::{MemStore, SharedStore, SledStore};
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run, TEST_SECRET};
use epu_core::wire::{Envelope, ErrorCode, Op, RunName, Service};
use epu_model::messages::{FailReason, NodeRecord};
use epu_model::NodeState;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use provisioner::driver::local::{is_alive, scan_workers};
use provisioner::{drivers_from_config, Provisioner, ProvisionerConfig};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// The tests of this file run one at a time: they start processes, and the 200 ms
/// budget should measure the provisioner, not a machine busy with the other tests.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A worker that says what it was given, then sleeps.
fn worker() -> Value {
    json!({
        "driver": "local",
        "command": "sh",
        "args": ["-c", "echo \"node=$EPU_NODE_ID run=$EPU_RUN domain=$EPU_DOMAIN launch=$EPU_LAUNCH_ID bus=$EPU_BUS__TRANSPORT role=$EPUVAR_ROLE\"; exec sleep 600"],
    })
}

fn config(run: &RunName, dir: &Path) -> ProvisionerConfig {
    let mut cfg = ProvisionerConfig::new(run.clone());
    cfg.run_dir = dir.join("run");
    cfg.poll_interval_secs = 0.2;
    cfg.disappear_grace_secs = 2.0;
    cfg.terminate_grace_secs = 1.0;
    cfg.bus.amqp_url = amqp_url();
    cfg.drivers.sim.enabled = false;
    cfg
}

fn sigkill(pid: &str) {
    let pid: i32 = pid.parse().expect("pid");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Kills whatever of the run is still alive (cleanup when an assertion failed).
fn kill_leftovers(run: &RunName) {
    for w in scan_workers(run.as_str()) {
        if let Ok(pid) = w.iaas_id.parse::<i32>() {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

struct Cleanup(RunName);

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_leftovers(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_is_reported_within_200ms_and_terminate_all_leaves_no_worker() {
    let _serial = SERIAL.lock().await;
    let run = test_run("local-kill");
    let _cleanup = Cleanup(run.clone());
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(&run, dir.path());
    let prov_bus = amqp_bus(&run, test_options("provisioner")).await;
    let client = amqp_bus(&run, test_options("client")).await;
    let sub = Subscriber::start(&client).await;
    let store: SharedStore = Arc::new(SledStore::open(dir.path().join("store")).expect("store"));
    let clock = SystemClock::shared();
    let drivers = drivers_from_config(&cfg, clock.clone())
        .await
        .expect("drivers");
    let prov = Provisioner::new(
        cfg.clone(),
        Arc::new(prov_bus.clone()),
        store,
        clock,
        drivers,
    )
    .expect("provisioner");
    let running = prov.start().await.expect("start");

    let ids = ["w0", "w1", "w2"];
    let v = call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "l1", "domain": "d1", "count": 3, "node_ids": ids,
               "deployable": worker(), "vars": {"ROLE": "cruncher"}}),
    )
    .await
    .expect("provision");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3));
    let mut pids = Vec::new();
    for id in ids {
        let (_, rec) = sub.wait_state(id, NodeState::Running, WAIT).await;
        pids.push(rec.iaas_id.clone().expect("pid"));
    }
    // Each worker got its variables and logs to <run_dir>/workers/<node>.log.
    for id in ids {
        let log = cfg.run_dir.join("workers").join(format!("{id}.log"));
        eventually(WAIT, "worker log written", || async {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("role=cruncher"))
        })
        .await;
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(
            text.contains(&format!("node={id} run={run} domain=d1 launch=l1 bus=amqp")),
            "{text}"
        );
    }
    assert_eq!(scan_workers(run.as_str()).len(), 3);

    // SIGKILL one: FAILED reaches the subscriber within 200 ms.
    let killed_at = Instant::now();
    sigkill(&pids[1]);
    let (arrived, rec) = sub.wait_state("w1", NodeState::Failed, WAIT).await;
    let took = arrived.duration_since(killed_at);
    eprintln!("SIGKILL → FAILED at the subscriber: {took:?}");
    assert!(
        took < Duration::from_millis(200),
        "FAILED arrived after {took:?}"
    );
    assert_eq!(rec.reason, Some(FailReason::ProcessExited));
    assert!(
        rec.reason_detail
            .as_deref()
            .is_some_and(|d| d.contains("signal 9")),
        "{rec:?}"
    );

    // terminate_all: nothing of the run survives.
    terminate_all_until_zero(&client, &run, WAIT).await;
    assert!(scan_workers(run.as_str()).is_empty());
    for pid in &pids {
        let pid: i32 = pid.parse().expect("pid");
        assert!(!is_alive(pid, None), "worker {pid} still alive");
    }
    for id in ["w0", "w2"] {
        let (_, rec) = sub.wait_state(id, NodeState::Terminated, WAIT).await;
        assert_eq!(rec.reason, None);
    }
    // Disabled: a new request is rejected, nothing launched.
    let v = call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "l2", "domain": "d1", "count": 1, "deployable": worker()}),
    )
    .await
    .expect("provision while disabled");
    assert_eq!(v["nodes"][0]["state"], "REJECTED");
    assert_eq!(v["nodes"][0]["reason"], "PROVISIONER_DISABLED");
    assert!(scan_workers(run.as_str()).is_empty());

    running.stop().await;
    sub.stop().await;
    finish(client, prov_bus).await;
}

async fn finish(client: AmqpBus, other: AmqpBus) {
    client.delete_topology().await.expect("cleanup");
    client.close().await;
    other.close().await;
}

#[tokio::test]
async fn bad_provision_requests_get_bad_request_and_launch_nothing_refusals_are_recorded() {
    let _serial = SERIAL.lock().await;
    let run = test_run("local-bad");
    let _cleanup = Cleanup(run.clone());
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&run, dir.path());
    cfg.drivers.local.allowed_commands = Some(vec!["sh".into(), "sleep".into()]);
    let prov_bus = amqp_bus(&run, test_options("provisioner")).await;
    let client = amqp_bus(&run, test_options("client")).await;
    let sub = Subscriber::start(&client).await;
    let clock = SystemClock::shared();
    let drivers = drivers_from_config(&cfg, clock.clone())
        .await
        .expect("drivers");
    let prov = Provisioner::new(
        cfg,
        Arc::new(prov_bus.clone()),
        Arc::new(MemStore::new()),
        clock,
        drivers,
    )
    .expect("provisioner");
    let running = prov.start().await.expect("start");

    let bad = [
        (
            json!({"launch_id": "a", "domain": "d", "count": -1, "deployable": worker()}),
            "count",
        ),
        (
            json!({"launch_id": "b", "domain": "d", "count": 1, "deployable": {"driver": "openstack", "image": "x"}}),
            "openstack",
        ),
        (
            json!({"launch_id": "c", "domain": "d", "count": 1, "deployable": {"driver": "ec2", "instance_type": "t3.micro"}}),
            "image",
        ),
        (
            json!({"launch_id": "d", "domain": "d", "count": 1, "deployable": {"driver": "local", "command": ""}}),
            "command",
        ),
        (
            json!({"launch_id": "e", "domain": "d", "count": 1, "deployable": {"driver": "sim"}}),
            "sim",
        ),
        (
            json!({"launch_id": "f", "domain": "d", "count": 1, "deployable": {"driver": "local", "command": "rm", "args": ["-rf", "/nonexistent"]}}),
            "allowed_commands",
        ),
    ];
    for (body, needle) in &bad {
        let e = call(&client, &run, Op::Provision, body.clone())
            .await
            .expect_err("refused");
        assert_eq!(e.code, ErrorCode::BadRequest, "{body}: {e:?}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
    }
    // A request whose shape is wrong (a, b, c) leaves nothing; one the provisioner
    // refuses for what it asks (d: empty command, e: sim not enabled, f: command
    // not allowed) is a fact: its node is REJECTED with REQUEST_REFUSED and the
    // reason, reported to the subscriber and listed.
    let refused = ["d", "e", "f"];
    for (body, needle) in &bad {
        let launch = body["launch_id"].as_str().unwrap_or_default();
        let listed: Vec<NodeRecord> = describe(&client, &run)
            .await
            .into_iter()
            .filter(|n| n.launch_id == launch)
            .collect();
        if !refused.contains(&launch) {
            assert!(listed.is_empty(), "{body}: {listed:?}");
            continue;
        }
        assert_eq!(listed.len(), 1, "{body}: {listed:?}");
        let n = &listed[0];
        assert_eq!(n.state, NodeState::Rejected, "{body}");
        assert_eq!(n.reason, Some(FailReason::RequestRefused), "{body}");
        let detail = n.reason_detail.clone().unwrap_or_default();
        assert!(detail.contains(needle), "{body}: {detail}");
        sub.wait_state(&n.node_id, NodeState::Rejected, Duration::from_secs(10))
            .await;
    }
    assert_eq!(
        sub.count(),
        refused.len(),
        "one instance_info per refused node"
    );
    let metrics = prov.metrics().encode().expect("metrics");
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("epu_provisioner_launches_total"))
        .filter(|l| l.contains("outcome=\"refused\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, refused.len() as u64, "refusals counted: {metrics}");
    // A resend of a refused launch is answered with its REJECTED node, nothing more.
    let again = call(&client, &run, Op::Provision, bad[5].0.clone())
        .await
        .expect("a known launch id is answered");
    assert_eq!(again["nodes"][0]["state"], "REJECTED");
    assert_eq!(describe(&client, &run).await.len(), refused.len());
    assert!(scan_workers(run.as_str()).is_empty());
    running.stop().await;
    sub.stop().await;
    finish(client, prov_bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_readopts_live_workers_and_reports_the_dead_ones() {
    let _serial = SERIAL.lock().await;
    // The in-process bus: the standalone host's transport.
    let run = test_run("local-adopt");
    let _cleanup = Cleanup(run.clone());
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(&run, dir.path());
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let client = bus.view(test_options("client"));
    let sub = Subscriber::start(&bus.view(test_options("controller"))).await;
    let store: SharedStore = Arc::new(MemStore::new());
    let start = || async {
        let clock = SystemClock::shared();
        let drivers = drivers_from_config(&cfg, clock.clone())
            .await
            .expect("drivers");
        let prov = Provisioner::new(
            cfg.clone(),
            Arc::new(bus.view(test_options("provisioner"))),
            store.clone(),
            clock,
            drivers,
        )
        .expect("provisioner");
        prov.start().await.expect("start")
    };
    let running = start().await;
    call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "l1", "domain": "d1", "count": 2, "node_ids": ["a", "b"], "deployable": worker()}),
    )
    .await
    .expect("provision");
    let (_, a) = sub.wait_state("a", NodeState::Running, WAIT).await;
    let (_, b) = sub.wait_state("b", NodeState::Running, WAIT).await;
    running.stop().await;

    // While the provisioner is down, one worker dies.
    let a_pid = a.iaas_id.clone().expect("pid");
    sigkill(&a_pid);
    let a_num: i32 = a_pid.parse().expect("pid");
    eventually(WAIT, "worker a gone", || async { !is_alive(a_num, None) }).await;

    let running = start().await;
    let (_, rec) = sub.wait_state("a", NodeState::Failed, WAIT).await;
    assert_eq!(rec.reason, Some(FailReason::ProcessExited));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let nodes = describe(&client, &run).await;
    let b_now = nodes.iter().find(|n| n.node_id == "b").expect("b");
    assert_eq!(b_now.state, NodeState::Running, "live worker re-adopted");
    assert_eq!(b_now.iaas_id, b.iaas_id);
    assert_eq!(
        scan_workers(run.as_str()).len(),
        1,
        "nothing launched again"
    );

    // A worker that exits at once (its exit may beat the launch record) and a command
    // that does not exist.
    call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "l2", "domain": "d1", "count": 1, "node_ids": ["quick"],
               "deployable": {"driver": "local", "command": "sh", "args": ["-c", "exit 3"]}}),
    )
    .await
    .expect("provision");
    let (_, rec) = sub.wait_state("quick", NodeState::Failed, WAIT).await;
    assert_eq!(rec.reason, Some(FailReason::ProcessExited));
    assert_eq!(rec.reason_detail.as_deref(), Some("exit code 3"));
    call(
        &client,
        &run,
        Op::Provision,
        json!({"launch_id": "l3", "domain": "d1", "count": 1, "node_ids": ["nosuch"],
               "deployable": {"driver": "local", "command": "/nonexistent/worker"}}),
    )
    .await
    .expect("provision");
    let (_, rec) = sub.wait_state("nosuch", NodeState::Failed, WAIT).await;
    assert_eq!(rec.reason, Some(FailReason::IaasBadRequest));

    // The adopted worker's exit is noticed by polling /proc.
    sigkill(b.iaas_id.as_deref().expect("pid"));
    let (_, rec) = sub.wait_state("b", NodeState::Failed, WAIT).await;
    assert_eq!(rec.reason, Some(FailReason::ProcessExited));
    running.stop().await;
    sub.stop().await;
}

// ---------------------------------------------------------------------------------------
// crash safety with the real binary

struct Binary {
    child: tokio::process::Child,
    log: PathBuf,
}

fn write_config(run: &RunName, dir: &Path) -> PathBuf {
    let secret = std::str::from_utf8(TEST_SECRET).expect("utf8");
    let text = format!(
        r#"run = "{run}"
run_dir = "{run_dir}"
poll_interval_secs = 0.2
disappear_grace_secs = 2
terminate_grace_secs = 1

[bus]
amqp_url = "{url}"
secret = "{secret}"

[store]
path = "{store}"

[drivers.sim]
enabled = false
"#,
        run_dir = dir.join("run").display(),
        url = amqp_url(),
        store = dir.join("store").display(),
    );
    let path = dir.join("provisioner.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn start_binary(config: &Path, dir: &Path, failpoint: Option<&str>, n: usize) -> Binary {
    let log = dir.join(format!("provisioner-{n}.log"));
    let file = std::fs::File::create(&log).expect("log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"));
    cmd.arg("--config").arg(config);
    // Our own EPU_* variables (EPU_AMQP_URL, …) are not provisioner config keys.
    for (k, _) in std::env::vars() {
        if k.starts_with("EPU_") {
            cmd.env_remove(k);
        }
    }
    if let Some(fp) = failpoint {
        cmd.env("EPU_FAILPOINT", fp);
    }
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    Binary {
        child: cmd.spawn().expect("start the provisioner binary"),
        log,
    }
}

impl Binary {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_exit(&mut self) -> Option<i32> {
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => panic!("the provisioner did not exit; log:\n{}", self.log_text()),
        }
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

async fn crash_and_recover(failpoint: &str) {
    let run = test_run("local-crash");
    let _cleanup = Cleanup(run.clone());
    let dir = tempfile::tempdir().expect("tmp");
    let config = write_config(&run, dir.path());
    let client = amqp_bus(&run, test_options("client")).await;
    let sub = Subscriber::start(&client).await;

    let mut first = start_binary(&config, dir.path(), Some(failpoint), 1);
    let ids = ["c0", "c1", "c2"];
    let env = Envelope::new(
        &run,
        Op::Provision,
        "test",
        json!({"launch_id": "l1", "domain": "d1", "count": 3, "node_ids": ids, "deployable": worker()}),
    );
    client
        .send(Service::Provisioner, &env)
        .await
        .expect("send provision");
    let code = first.wait_exit().await;
    assert_eq!(code, Some(137), "log:\n{}", first.log_text());
    let launched_before = scan_workers(run.as_str()).len();
    match failpoint {
        "after_store_before_iaas" => assert_eq!(launched_before, 0),
        _ => assert_eq!(
            launched_before, 3,
            "the IaaS call happened before the crash"
        ),
    }

    let second = start_binary(&config, dir.path(), None, 2);
    let mut nodes: Vec<NodeRecord> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        nodes = describe(&client, &run).await;
        if nodes.len() == 3 && nodes.iter().all(|n| n.state == NodeState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        nodes.len() == 3 && nodes.iter().all(|n| n.state == NodeState::Running),
        "{failpoint}: {nodes:#?}\nlog:\n{}",
        second.log_text()
    );
    // Two more polls: nothing adopted is taken for a zombie, nothing launched twice.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let workers = scan_workers(run.as_str());
    let worker_nodes: BTreeSet<String> = workers.iter().filter_map(|w| w.node_id.clone()).collect();
    let worker_pids: BTreeSet<String> = workers.iter().map(|w| w.iaas_id.clone()).collect();
    let record_pids: BTreeSet<String> = nodes.iter().filter_map(|n| n.iaas_id.clone()).collect();
    assert_eq!(
        workers.len(),
        3,
        "{failpoint}: exactly one worker per node: {workers:?}"
    );
    assert_eq!(worker_nodes, ids.iter().map(|s| s.to_string()).collect());
    assert_eq!(worker_pids, record_pids);
    assert!(describe(&client, &run)
        .await
        .iter()
        .all(|n| n.state == NodeState::Running));

    terminate_all_until_zero(&client, &run, WAIT).await;
    assert!(scan_workers(run.as_str()).is_empty());
    second.stop().await;
    sub.stop().await;
    client.delete_topology().await.expect("cleanup");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_killed_between_store_and_iaas_launches_each_worker_once_after_restart() {
    let _serial = SERIAL.lock().await;
    crash_and_recover("after_store_before_iaas").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_killed_between_iaas_and_store_launches_each_worker_once_after_restart() {
    let _serial = SERIAL.lock().await;
    crash_and_recover("after_iaas_before_store").await;
}
