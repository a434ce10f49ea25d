//! The agent binary, as a worker runs it: over RabbitMQ, over the standalone host's
//! socket, through a broker that goes away, and end to end through the aggregator.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epu_core::bus::local::LocalBus;
use epu_core::bus::socket::{SocketServer, SOCKET_FILE};
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::Metrics;
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run};
use epu_model::health::Secs;
use epu_model::messages::{Heartbeat, WorkerState};
use epu_model::Health;
use epu_testkit::{
    health_of, lapin_conn, node, record_controller, record_heartbeats, Cleanup, FakeProvisioner,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, DomainSensors};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const EVENTUALLY: Duration = Duration::from_secs(15);

/// An agent process in its own process group; the group is killed on drop, so the
/// worker it started goes too.
struct AgentProc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl AgentProc {
    fn start(env: &[(&str, &str)], command: &[&str]) -> Self {
        let mut args = vec!["--"];
        args.extend_from_slice(command);
        Self::start_bin(env!("CARGO_BIN_EXE_epu-agent"), env, &args)
    }

    fn start_bin(bin: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("EPU_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("start epu-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .expect("lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        AgentProc { child, stderr }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the agent");
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn amqp_env<'a>(
    node: &'a str,
    run: &'a str,
    url: &'a str,
    interval: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("EPU_NODE_ID", node),
        ("EPU_RUN", run),
        ("EPU_DOMAIN", "workers"),
        ("EPU_AMQP_URL", url),
        ("EPU_HEARTBEAT_INTERVAL", interval),
    ]
}

fn process_error_with(code: i32) -> impl Fn(&Heartbeat) -> bool {
    move |h| h.state == WorkerState::ProcessError && h.exit_code == Some(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_worker_is_reported_as_process_error_until_the_agent_is_stopped() {
    let run = test_run("ag-err");
    let _cleanup = Cleanup::new(&run);
    let bus = amqp_bus(&run, test_options("test")).await;
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let url = amqp_url();
    let run_s = run.to_string();
    let mut agent = AgentProc::start(
        &amqp_env("n-err", &run_s, &url, "0.2"),
        &["sh", "-c", "echo starting; echo boom >&2; exit 3"],
    );
    let first = hbs
        .wait_for(EVENTUALLY, process_error_with(3))
        .await
        .expect("a PROCESS_ERROR heartbeat");
    assert_eq!(first.1.node_id, "n-err");
    assert_eq!(first.1.domain, "workers");
    assert_eq!(first.1.jobs, 0);
    assert!(
        first
            .1
            .stderr_tail
            .as_deref()
            .is_some_and(|t| t.contains("boom")),
        "{:?}",
        first.1.stderr_tail
    );
    // It keeps heartbeating the error, and stays up.
    let again = hbs
        .wait_after(
            first.0 + Duration::from_millis(1),
            EVENTUALLY,
            process_error_with(3),
        )
        .await;
    assert!(again.is_some(), "heartbeats keep coming");
    assert!(
        agent.running(),
        "the agent stays up after its worker failed"
    );
    assert!(
        agent.stderr().contains("boom"),
        "the worker's stderr is tee'd: {}",
        agent.stderr()
    );
    agent.signal(Signal::SIGTERM);
    assert_eq!(
        agent.exit_code(EVENTUALLY).await,
        Some(3),
        "exits with the worker's code"
    );

    server.stop().await;
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_error_reaches_the_controller_through_the_aggregator() {
    let run = test_run("ag-e2e");
    let _cleanup = Cleanup::new(&run);
    let bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes([node("workers", "n-e2e").run(&run).build()])
        .serve(Arc::new(bus.clone()))
        .await
        .expect("serve the fake provisioner");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let mut cfg = AggregatorConfig::new(run.clone());
    cfg.nodes_poll_secs = 0.2;
    cfg.domains.push(DomainSensors::new("workers"));
    let agg = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");

    let url = amqp_url();
    let run_s = run.to_string();
    let _agent = AgentProc::start(
        &amqp_env("n-e2e", &run_s, &url, "0.2"),
        &["sh", "-c", "echo boom >&2; exit 3"],
    );
    let got = rec
        .wait_for(EVENTUALLY, |i| {
            i.nodes.iter().any(|n| {
                n.node_id == "n-e2e" && n.health == Health::ProcessError && n.exit_code == Some(3)
            })
        })
        .await
        .expect("sensor_info with PROCESS_ERROR");
    let n = got
        .1
        .nodes
        .iter()
        .find(|n| n.node_id == "n-e2e")
        .expect("node");
    assert!(n.stderr_tail.as_deref().is_some_and(|t| t.contains("boom")));

    running.stop().await;
    ctl.stop().await;
    prov.stop().await;
    agg_bus.close().await;
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_goes_missing_within_missing_timeout_plus_one_interval() {
    let run = test_run("ag-stop");
    let _cleanup = Cleanup::new(&run);
    let bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes([node("workers", "n-stop").run(&run).build()])
        .serve(Arc::new(bus.clone()))
        .await
        .expect("serve the fake provisioner");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let mut cfg = AggregatorConfig::new(run.clone());
    cfg.nodes_poll_secs = 0.2;
    let mut d = DomainSensors::new("workers");
    d.health.missing_timeout_secs = Secs::new(2.0).expect("valid seconds");
    d.health.boot_timeout_secs = Secs::new(30.0).expect("valid seconds");
    cfg.domains.push(d);
    let agg = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");

    let url = amqp_url();
    let run_s = run.to_string();
    let interval = Duration::from_millis(500);
    let agent = AgentProc::start(&amqp_env("n-stop", &run_s, &url, "0.5"), &["sleep", "60"]);
    let ok = rec
        .wait_for(EVENTUALLY, |i| health_of(i, "n-stop") == Some(Health::Ok))
        .await;
    assert!(ok.is_some(), "OK first; agent log: {}", agent.stderr());
    // Let a couple of heartbeats through, then freeze the agent.
    tokio::time::sleep(Duration::from_millis(700)).await;
    agent.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let missing = rec
        .wait_after(stopped, EVENTUALLY, |i| {
            health_of(i, "n-stop") == Some(Health::Missing)
        })
        .await
        .expect("MISSING");
    // Judged against the last heartbeat heard, not against the SIGSTOP: on a loaded
    // machine the last heartbeat before the stop may be older than one interval.
    let last_heard = missing
        .1
        .nodes
        .iter()
        .find(|n| n.node_id == "n-stop")
        .and_then(|n| n.last_heard)
        .expect("a MISSING reading names the last heartbeat heard");
    let silent = (missing.1.at - last_heard)
        .to_std()
        .expect("the reading is later than the last heartbeat");
    assert!(
        silent > Duration::from_secs(2),
        "MISSING after {silent:?} of silence: not before missing_timeout (2 s)"
    );
    let bound = Duration::from_secs(2) + interval + Duration::from_secs(1);
    assert!(
        silent <= bound,
        "MISSING after {silent:?} of silence; bound {bound:?}"
    );
    agent.signal(Signal::SIGCONT);
    let back = rec
        .wait_after(missing.0, EVENTUALLY, |i| {
            health_of(i, "n-stop") == Some(Health::Ok)
        })
        .await;
    assert!(
        back.is_some(),
        "an OK heartbeat after SIGCONT clears MISSING"
    );

    drop(agent);
    running.stop().await;
    ctl.stop().await;
    prov.stop().await;
    agg_bus.close().await;
    bus.close().await;
}

/// The standalone host's socket, the jobs file, and SIGTERM forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_socket_it_reports_jobs_and_forwards_sigterm() {
    let run = test_run("ag-sock");
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let socket = SocketServer::bind(&dir.path().join(SOCKET_FILE), bus.clone())
        .await
        .expect("socket");
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let run_s = run.to_string();
    let dir_s = dir.path().display().to_string();
    let pid_file = dir.path().join("worker.pid");
    let script = format!(
        "echo 2 > \"$EPU_JOBS_FILE\"; echo $$ > {}; exec sleep 30",
        pid_file.display()
    );
    let mut agent = AgentProc::start(
        &[
            ("EPU_NODE_ID", "n-sock"),
            ("EPU_RUN", &run_s),
            ("EPU_DOMAIN", "workers"),
            ("EPU_RUN_DIR", &dir_s),
            ("EPU_HEARTBEAT_INTERVAL", "0.2"),
        ],
        &["sh", "-c", &script],
    );
    let busy = hbs
        .wait_for(EVENTUALLY, |h| h.state == WorkerState::Ok && h.jobs == 2)
        .await;
    assert!(
        busy.is_some(),
        "jobs from the jobs file; agent log: {}",
        agent.stderr()
    );
    let worker_pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let t = Instant::now();
    agent.signal(Signal::SIGTERM);
    assert_eq!(
        agent.exit_code(EVENTUALLY).await,
        Some(128 + 15),
        "the worker died of the forwarded SIGTERM"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        !Path::new(&format!("/proc/{worker_pid}")).exists(),
        "the worker is gone"
    );

    server.stop().await;
    socket.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_0_gets_a_last_heartbeat_and_the_agent_exits_0() {
    let run = test_run("ag-zero");
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let socket = SocketServer::bind(&dir.path().join(SOCKET_FILE), bus.clone())
        .await
        .expect("socket");
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let run_s = run.to_string();
    let dir_s = dir.path().display().to_string();
    let env = [
        ("EPU_NODE_ID", "n-zero"),
        ("EPU_RUN", run_s.as_str()),
        ("EPU_DOMAIN", "workers"),
        ("EPU_RUN_DIR", dir_s.as_str()),
        ("EPU_HEARTBEAT_INTERVAL", "0.1"),
    ];
    let mut agent = AgentProc::start(
        &env,
        &["sh", "-c", "echo 1 > \"$EPU_JOBS_FILE\"; sleep 0.5"],
    );
    assert_eq!(agent.exit_code(EVENTUALLY).await, Some(0));
    assert!(hbs.find(|h| h.jobs == 1).is_some(), "busy while it ran");
    let last = hbs
        .all()
        .last()
        .map(|(_, h)| h.clone())
        .expect("heartbeats");
    assert_eq!(
        (last.state, last.jobs, last.exit_code),
        (WorkerState::Ok, 0, Some(0)),
        "the last heartbeat says done and idle"
    );

    // A command that cannot start is a PROCESS_ERROR with the shell's 127. Its
    // settings come from a user-data style file this time, not the environment.
    let settings = dir.path().join("user-data");
    std::fs::write(
        &settings,
        format!(
            "#!/bin/sh\nexport EPU_NODE_ID=n-nope\nEPU_RUN='{run_s}'\nEPU_DOMAIN=\"workers\"\n\
             EPU_RUN_DIR={dir_s}\nEPU_HEARTBEAT_INTERVAL=0.1\nepu-agent --settings /this/file -- ./worker\n"
        ),
    )
    .expect("settings file");
    let settings_s = settings.display().to_string();
    let mut agent = AgentProc::start_bin(
        env!("CARGO_BIN_EXE_epu-agent"),
        &[],
        &["--settings", &settings_s, "--", "/nonexistent/worker"],
    );
    let got = hbs
        .wait_for(EVENTUALLY, |h| {
            h.node_id == "n-nope" && h.exit_code == Some(127)
        })
        .await
        .expect("PROCESS_ERROR 127");
    assert_eq!(got.1.state, WorkerState::ProcessError);
    assert!(got
        .1
        .stderr_tail
        .as_deref()
        .is_some_and(|t| t.contains("cannot start")));
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit_code(EVENTUALLY).await, Some(127));

    server.stop().await;
    socket.stop().await;
}

/// A TCP forwarder to the broker that the test can take down and bring back.
struct Proxy {
    port: u16,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn broker_addr() -> String {
    let url = amqp_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("127.0.0.1:5672");
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

impl Proxy {
    async fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    }

    fn new(port: u16) -> Self {
        Proxy {
            port,
            accept: None,
            conns: Arc::new(Mutex::new(Vec::new())),
        }
    }

    async fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind the proxy: {e}"),
            }
        };
        let conns = self.conns.clone();
        let upstream = broker_addr();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                conns.lock().expect("lock").push(task);
            }
        }));
    }

    async fn down(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        let conns: Vec<_> = self.conns.lock().expect("lock").drain(..).collect();
        for c in conns {
            c.abort();
            let _ = c.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_the_broker_being_away() {
    let run = test_run("ag-away");
    let _cleanup = Cleanup::new(&run);
    let bus = amqp_bus(&run, test_options("test")).await;
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let port = Proxy::free_port().await;
    let mut proxy = Proxy::new(port);
    let url = amqp_url();
    let credentials = url
        .split_once("://")
        .and_then(|(_, r)| r.rsplit_once('@'))
        .map_or(String::new(), |(c, _)| format!("{c}@"));
    let via_proxy = format!("amqp://{credentials}127.0.0.1:{port}/%2f");
    let run_s = run.to_string();
    // The broker is away when the agent starts.
    let mut agent = AgentProc::start(
        &amqp_env("n-away", &run_s, &via_proxy, "0.2"),
        &["sleep", "60"],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(agent.running(), "no broker is no reason to stop");
    assert!(hbs.all().is_empty());
    proxy.up().await;
    let first = hbs.wait_for(EVENTUALLY, |h| h.node_id == "n-away").await;
    assert!(
        first.is_some(),
        "heartbeats once the broker is there; log: {}",
        agent.stderr()
    );

    // Away again, with the connection cut under it.
    proxy.down().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(agent.running());
    let back_at = Instant::now();
    proxy.up().await;
    let again = hbs
        .wait_after(back_at, EVENTUALLY, |h| h.node_id == "n-away")
        .await;
    assert!(
        again.is_some(),
        "heartbeats resume; log: {}",
        agent.stderr()
    );
    let log = agent.stderr();
    assert!(log.contains("keeps trying"), "the failure is logged: {log}");
    assert!(
        log.contains("getting through again"),
        "and the recovery: {log}"
    );
    assert!(!log.contains("guest:guest"), "no password in the log");

    drop(agent);
    proxy.down().await;
    server.stop().await;
    bus.close().await;
}

/// The queue-workers example: the producer fills the queue, a queue worker under
/// the agent works it, and its heartbeats say when it holds a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_queue_worker_reports_the_job_it_holds() {
    let run = test_run("ag-queue");
    let mut cleanup = Cleanup::new(&run);
    let queue = format!("jobs.{run}");
    cleanup.queue(&queue);
    let bus = amqp_bus(&run, test_options("test")).await;
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let url = amqp_url();
    let out = Command::new(env!("CARGO_BIN_EXE_epu-queue-producer"))
        .args([
            "--queue",
            &queue,
            "--count",
            "2",
            "--seconds",
            "0.8",
            "--url",
            &url,
        ])
        .output()
        .expect("producer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("published 2 jobs"));

    let run_s = run.to_string();
    let mut agent = AgentProc::start(
        &amqp_env("n-queue", &run_s, &url, "0.1"),
        &[env!("CARGO_BIN_EXE_epu-queue-worker")],
    );
    let busy = hbs.wait_for(EVENTUALLY, |h| h.jobs == 1).await;
    assert!(
        busy.is_some(),
        "a heartbeat with the job held; log: {}",
        agent.stderr()
    );
    // Both jobs done: the queue is empty and the worker idle.
    let conn = lapin_conn().await;
    let ch = conn.create_channel().await.expect("channel");
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let idle_after = hbs.all().last().is_some_and(|(_, h)| h.jobs == 0);
        if q.message_count() == 0 && idle_after {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs not worked; log: {}",
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.signal(Signal::SIGTERM);
    assert!(agent.exit_code(EVENTUALLY).await.is_some());
    let _ = conn.close(200, "done".into()).await;
    server.stop().await;
    bus.close().await;
}

/// The sleeper example starts itself under the agent, reports a job now and then
/// through the jobs file, and (asked to) fails with code 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sleeper_example_heartbeats_through_the_agent() {
    let run = test_run("ag-sleeper");
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let socket = SocketServer::bind(&dir.path().join(SOCKET_FILE), bus.clone())
        .await
        .expect("socket");
    let (server, hbs) = record_heartbeats(&bus)
        .await
        .expect("serve the aggregator queue");
    let run_s = run.to_string();
    let dir_s = dir.path().display().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sleeper/worker.sh");
    let mut sleeper = AgentProc::start_bin(
        script,
        &[
            ("EPU_NODE_ID", "n-sleeper"),
            ("EPU_RUN", &run_s),
            ("EPU_DOMAIN", "sleepers"),
            ("EPU_RUN_DIR", &dir_s),
            ("EPU_HEARTBEAT_INTERVAL", "0.05"),
            ("EPU_AGENT", env!("CARGO_BIN_EXE_epu-agent")),
            ("SLEEPER_NAP_SECS", "0.2"),
            ("SLEEPER_BUSY_EVERY", "2"),
            ("SLEEPER_FAIL_AFTER", "6"),
        ],
        &[],
    );
    assert!(
        hbs.wait_for(EVENTUALLY, |h| h.state == WorkerState::Ok && h.jobs == 1)
            .await
            .is_some(),
        "a busy heartbeat; log: {}",
        sleeper.stderr()
    );
    let failed = hbs
        .wait_for(EVENTUALLY, process_error_with(3))
        .await
        .expect("PROCESS_ERROR after SLEEPER_FAIL_AFTER naps");
    assert!(failed
        .1
        .stderr_tail
        .as_deref()
        .is_some_and(|t| t.contains("failing on purpose")));
    assert_eq!(failed.1.domain, "sleepers");
    sleeper.signal(Signal::SIGTERM);
    assert_eq!(sleeper.exit_code(EVENTUALLY).await, Some(3));

    server.stop().await;
    socket.stop().await;
}
