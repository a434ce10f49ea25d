//! A run on a three-node RabbitMQ cluster with quorum queues survives the loss of the
//! node its services are connected to, twice: a graceful stop of that node, and after
//! it is back, a crash (SIGKILL) of the node they moved to. Every confirmed message is
//! delivered (duplicates allowed, counted), and sending and requests go on through
//! the other nodes each time.
//!
//! The cluster is three extra nodes on this machine (`scripts/rabbitmq-cluster.sh`:
//! own names, ports, data and cookie; the main broker on 5672 is never touched),
//! stopped and deleted at the end even when the test fails ([`Cluster`]'s `Drop`).
//! It needs `rabbitmq-server` installed (not running) and fails, never skips, without
//! it. Every external call has a deadline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::{Bus, FnHandler, Incoming};
use epu_core::config::{split_amqp_urls, QueueType};
use epu_core::testing::{test_options, test_run, wait_until};
use epu_core::wire::{Envelope, Op, RunName, Service};
use serde_json::json;
use uuid::Uuid;

/// Every tenth one-way message is followed by a request.
const REQUEST_EVERY: usize = 10;
/// One-way messages sent between two events of the run (start, stop, restart, kill, end).
const STRETCH: usize = 150;
/// The publisher stops here whatever happens (the run is bounded in messages too).
const MAX_MESSAGES: usize = 5000;
/// `send` retries until publish_timeout (60 s in `test_options`); past this it hangs.
const SEND_LIMIT: Duration = Duration::from_secs(75);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh")
}

/// Runs the cluster script under `timeout` (so it ends within `limit`, whatever the
/// nodes do); the nodes write to their own logs, not to our pipes.
fn cluster_script(args: &[&str], limit: Duration) -> Output {
    let secs = limit.as_secs().max(1).to_string();
    Command::new("timeout")
        .args(["--kill-after=10", &secs, "bash"])
        .arg(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `timeout bash {}`: {e}", script().display()))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The three nodes. Dropping it stops every node and deletes their data.
struct Cluster {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    urls: Vec<String>,
    started_in: Duration,
    stopped: bool,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("epu-cluster-")
            .tempdir()
            .expect("a temp dir");
        let dir = tmp.path().join("cluster");
        let t0 = Instant::now();
        let dir_s = dir.display().to_string();
        let out = cluster_script(
            &["start", &dir_s, &nodes.to_string()],
            Duration::from_secs(300),
        );
        let started_in = t0.elapsed();
        // From here on, Drop stops whatever was started.
        let mut cluster = Cluster {
            _tmp: tmp,
            dir,
            urls: Vec::new(),
            started_in,
            stopped: false,
        };
        match out.status.code() {
            Some(0) => {}
            Some(3) => panic!(
                "this test needs rabbitmq-server installed (it starts {nodes} extra nodes of its own \
                 and does not use the main broker): Debian: apt-get install -y rabbitmq-server, or run \
                 scripts/test.sh, which installs it\n{}",
                text(&out)
            ),
            Some(124) | Some(137) => panic!(
                "the cluster did not start within 300 s ({}):\n{}",
                script().display(),
                text(&out)
            ),
            _ => panic!("the cluster did not start:\n{}", text(&out)),
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("EPU_CLUSTER_URLS="))
            .unwrap_or_else(|| panic!("the script printed no EPU_CLUSTER_URLS=:\n{}", text(&out)));
        cluster.urls = split_amqp_urls(line);
        assert_eq!(cluster.urls.len(), nodes, "{line}");
        cluster
    }

    fn dir(&self) -> String {
        self.dir.display().to_string()
    }

    /// The AMQP URL list, starting at node `first` (0-based) and going round.
    fn urls_from(&self, first: usize) -> String {
        let n = self.urls.len();
        (0..n)
            .map(|k| self.urls[(first + k) % n].clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn port_of(&self, node: usize) -> String {
        let u = &self.urls[node];
        let after = u.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
        after.split('/').next().unwrap_or("").to_string()
    }

    /// `rabbitmqctl ARGS` against node `node` (0-based), 30 s.
    fn ctl(&self, node: usize, args: &[&str]) -> Output {
        let n = (node + 1).to_string();
        let dir = self.dir();
        let mut all = vec!["ctl", dir.as_str(), n.as_str()];
        all.extend_from_slice(args);
        cluster_script(&all, Duration::from_secs(45))
    }

    /// The node (0-based) a bus is connected to.
    fn node_of(&self, bus: &AmqpBus) -> Option<usize> {
        let at = bus.connected_broker()?;
        (0..self.urls.len()).find(|i| at.contains(&format!(":{}/", self.port_of(*i))))
    }

    fn logs(&self) -> String {
        let out = cluster_script(&["logs", &self.dir()], Duration::from_secs(20));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Stops every node and deletes the data; `Err` says what was left.
    fn stop(&mut self) -> Result<(), String> {
        self.stopped = true;
        let out = cluster_script(&["stop", &self.dir()], Duration::from_secs(180));
        if !out.status.success() {
            return Err(format!("stopping the cluster failed:\n{}", text(&out)));
        }
        if self.dir.exists() {
            return Err(format!("{} is still there after stop", self.dir.display()));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            if let Err(e) = self.stop() {
                eprintln!("{e}");
            }
        }
    }
}

/// What the consumer saw: deliveries per message id.
type Seen = Arc<Mutex<HashMap<Uuid, usize>>>;

#[derive(Default, Debug)]
struct Sent {
    confirmed: Vec<Uuid>,
    failed: Vec<String>,
    requests_answered: usize,
    requests_failed: Vec<String>,
    /// Whether each request, in order, was answered.
    request_outcomes: Vec<bool>,
    slowest_send: Duration,
}

fn quorum(sender: &str) -> epu_core::bus::BusOptions {
    test_options(sender).with_queue_type(QueueType::Quorum)
}

async fn connect(urls: &str, run: &RunName, sender: &str) -> AmqpBus {
    match tokio::time::timeout(
        Duration::from_secs(60),
        AmqpBus::connect(urls, run.clone(), quorum(sender)),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => panic!("connecting {sender} to the cluster: {e}"),
        Err(_) => panic!("connecting {sender} to the cluster took over 60 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_run_survives_losing_the_node_it_is_connected_to() {
    // RUST_LOG=epu_core=debug shows the bus's reconnects (with --nocapture).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let t0 = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(3))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    println!(
        "cluster: 3 nodes started and joined in {:.1} s",
        cluster.started_in.as_secs_f64()
    );
    let result = tokio::time::timeout(Duration::from_secs(480), run_on(&cluster)).await;
    let report = match result {
        Ok(report) => report,
        Err(_) => panic!(
            "the run on the cluster did not finish within 480 s\n{}",
            cluster.logs()
        ),
    };
    let t_stop = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .expect("stop task");
    if let Err(e) = stopped {
        panic!("{e}");
    }
    println!(
        "{report}\ncluster: stopped and deleted in {:.1} s; whole test {:.1} s",
        t_stop.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Runs `script ARGS` off the runtime's threads.
async fn script_step(args: Vec<String>, limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster_script(&args, limit)
    })
    .await
    .expect("script task");
    (out, t.elapsed())
}

/// Waits until the publisher has sent `n` one-way messages.
async fn sent_at_least(
    rx: &mut tokio::sync::watch::Receiver<usize>,
    n: usize,
    what: &str,
    cluster: &Cluster,
) {
    let reached = tokio::time::timeout(Duration::from_secs(150), rx.wait_for(|k| *k >= n))
        .await
        .map(|r| r.is_ok());
    if reached != Ok(true) {
        panic!(
            "the publisher did not reach message {n} ({what}) within 150 s; it is at {}\n{}",
            *rx.borrow(),
            cluster.logs()
        );
    }
}

/// The run itself; returns the report.
async fn run_on(cluster: &Cluster) -> String {
    let run = test_run("cluster");
    // Both start on node 1 (the list's order), so both lose their node.
    let urls = cluster.urls_from(0);
    let server = connect(&urls, &run, "svc").await;
    let client = connect(&urls, &run, "cli").await;
    for (who, bus) in [("server", &server), ("client", &client)] {
        assert_eq!(
            cluster.node_of(bus),
            Some(0),
            "{who} is on {:?}, not node 1",
            bus.connected_broker()
        );
    }

    // The run's durable queues are quorum queues on the cluster; the reply queue not.
    let listed = cluster.ctl(
        1,
        &[
            "list_queues",
            "name",
            "type",
            "--no-table-headers",
            "--timeout",
            "20",
        ],
    );
    let listing = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.status.success(), "list_queues: {}", text(&listed));
    let types: HashMap<&str, &str> = listing
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?, it.next()?))
        })
        .collect();
    for svc in Service::ALL {
        let q = run.queue(svc);
        assert_eq!(types.get(q.as_str()), Some(&"quorum"), "{q}: {listing}");
    }
    let dead = run.dead_queue();
    assert_eq!(types.get(dead.as_str()), Some(&"quorum"), "{listing}");
    let replies: Vec<_> = types
        .iter()
        .filter(|(name, _)| name.contains(".reply."))
        .collect();
    assert!(!replies.is_empty(), "no reply queue listed: {listing}");
    assert!(replies.iter().all(|(_, t)| **t == "classic"), "{listing}");

    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let s = seen.clone();
    let handler = Arc::new(FnHandler(move |m: Incoming| {
        let s = s.clone();
        async move {
            *s.lock()
                .expect("lock")
                .entry(m.envelope.msg_id)
                .or_default() += 1;
            Ok(json!({"ok": true}))
        }
    }));
    let consumer = server
        .serve(Service::Controller, handler)
        .await
        .expect("serve");

    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0usize);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let publisher = {
        let client = client.clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut sent = Sent::default();
            for i in 0..MAX_MESSAGES {
                if *done_rx.borrow() {
                    break;
                }
                let env = Envelope::new(&run, Op::InstanceInfo, "cli", json!({"i": i}));
                let t = Instant::now();
                // `send` gives up after publish_timeout (60 s): longer is a hang.
                match tokio::time::timeout(SEND_LIMIT, client.send(Service::Controller, &env)).await
                {
                    Ok(Ok(())) => sent.confirmed.push(env.msg_id),
                    Ok(Err(e)) => sent.failed.push(format!("message {i}: {e}")),
                    Err(_) => sent.failed.push(format!(
                        "message {i}: send still pending after {SEND_LIMIT:?}"
                    )),
                }
                sent.slowest_send = sent.slowest_send.max(t.elapsed());
                if i % REQUEST_EVERY == REQUEST_EVERY - 1 {
                    let ask = Envelope::new(&run, Op::ListDomains, "cli", json!({"i": i}));
                    match client
                        .request(Service::Controller, &ask, Duration::from_secs(10))
                        .await
                    {
                        Ok(_) => {
                            sent.requests_answered += 1;
                            sent.request_outcomes.push(true);
                        }
                        Err(e) => {
                            sent.requests_failed.push(format!("request after {i}: {e}"));
                            sent.request_outcomes.push(false);
                        }
                    }
                }
                let _ = progress_tx.send(i + 1);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };
    // A watchdog: says where the publisher stands while it is slow.
    let watchdog = {
        let rx = progress_rx.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut last = *rx.borrow();
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let now = *rx.borrow();
                if now == last {
                    eprintln!(
                        "watchdog: the publisher is still at message {now} after 15 s; client on {:?}",
                        client.connected_broker()
                    );
                }
                last = now;
            }
        })
    };
    let dir = cluster.dir();
    let mut events = Vec::new();

    // 1. A graceful stop of node 1, where both buses are, while the publisher goes on.
    sent_at_least(&mut progress_rx, STRETCH, "before any stop", cluster).await;
    let at = *progress_rx.borrow();
    let (out, took) = script_step(
        vec!["stop-node".into(), dir.clone(), "1".into()],
        Duration::from_secs(90),
    )
    .await;
    assert!(out.status.success(), "stopping node 1: {}", text(&out));
    events.push(format!(
        "node 1 stopped (graceful) at message {at} in {:.1} s",
        took.as_secs_f64()
    ));
    sent_at_least(
        &mut progress_rx,
        at + STRETCH,
        "after node 1 stopped",
        cluster,
    )
    .await;
    for (who, bus) in [("server", &server), ("client", &client)] {
        let on = cluster.node_of(bus);
        assert!(
            on.is_some() && on != Some(0),
            "{who} is not on a live node after node 1 stopped: {:?}",
            bus.connected_broker()
        );
    }

    // 2. Node 1 back, then a crash of the node the consumer moved to.
    let at = *progress_rx.borrow();
    let (out, took) = script_step(
        vec!["start-node".into(), dir.clone(), "1".into()],
        Duration::from_secs(150),
    )
    .await;
    assert!(
        out.status.success(),
        "starting node 1 again: {}",
        text(&out)
    );
    events.push(format!(
        "node 1 back at message {at} in {:.1} s",
        took.as_secs_f64()
    ));
    let at = *progress_rx.borrow();
    sent_at_least(
        &mut progress_rx,
        at + STRETCH / 2,
        "with node 1 back",
        cluster,
    )
    .await;
    let victim = cluster.node_of(&server).expect("the server is connected");
    let client_was_on = cluster.node_of(&client).map_or(0, |i| i + 1);
    let at = *progress_rx.borrow();
    let n = (victim + 1).to_string();
    let (out, took) = script_step(
        vec!["kill-node".into(), dir.clone(), n.clone()],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "killing node {n}: {}", text(&out));
    events.push(format!(
        "node {n} (the consumer's) killed (SIGKILL) at message {at} in {:.1} s; the client was on node {}",
        took.as_secs_f64(),
        client_was_on
    ));
    sent_at_least(&mut progress_rx, at + STRETCH, "after the kill", cluster).await;
    let _ = done_tx.send(true);

    let sent = match tokio::time::timeout(Duration::from_secs(120), publisher).await {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => panic!("the publisher task failed: {e}"),
        Err(_) => panic!(
            "the publisher did not stop within 120 s of being told to (at message {})\n{}",
            *progress_rx.borrow(),
            cluster.logs()
        ),
    };
    watchdog.abort();

    // Every confirmed message arrives (duplicates allowed), within a minute.
    let all_seen = wait_until(Duration::from_secs(60), || {
        let s = seen.lock().expect("lock");
        sent.confirmed.iter().all(|id| s.contains_key(id))
    })
    .await;
    let (distinct, deliveries, lost) = {
        let s = seen.lock().expect("lock");
        let lost = sent
            .confirmed
            .iter()
            .filter(|id| !s.contains_key(id))
            .count();
        (s.len(), s.values().sum::<usize>(), lost)
    };
    let requests = sent.request_outcomes.len();
    let total = sent.confirmed.len() + sent.failed.len();
    let report = format!(
        "cluster run: started in {:.1} s; {}; {total} one-way sent, {} confirmed, {} send failures; \
         {requests} requests, {} answered, {} failed; {distinct} distinct messages delivered \
         (one-way and answered requests), {deliveries} deliveries, {} duplicates, {lost} confirmed \
         but lost; slowest confirmed send {:.1} s; server ends on node {}, client on node {}",
        cluster.started_in.as_secs_f64(),
        events.join("; "),
        sent.confirmed.len(),
        sent.failed.len(),
        sent.requests_answered,
        sent.requests_failed.len(),
        deliveries.saturating_sub(distinct),
        sent.slowest_send.as_secs_f64(),
        cluster.node_of(&server).map_or(0, |i| i + 1),
        cluster.node_of(&client).map_or(0, |i| i + 1),
    );
    assert!(
        all_seen,
        "{lost} confirmed messages never arrived\n{report}\n{}",
        cluster.logs()
    );
    // `send` retries across a failover until publish_timeout (60 s here).
    assert!(
        sent.failed.is_empty(),
        "sends failed across the failovers: {:?}\n{report}",
        sent.failed
    );
    // Requests resumed: the last five all answered.
    let tail = &sent.request_outcomes[requests.saturating_sub(5)..];
    assert!(
        tail.iter().all(|ok| *ok),
        "the last requests were not answered: {:?}\n{report}",
        sent.requests_failed
    );
    for (who, bus) in [("server", &server), ("client", &client)] {
        assert_ne!(
            cluster.node_of(bus),
            Some(victim),
            "{who} is still on the killed node: {:?}",
            bus.connected_broker()
        );
    }

    consumer.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), server.delete_topology()).await;
    client.close().await;
    server.close().await;
    report
}
