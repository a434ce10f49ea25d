//! `cargo bench -p sensor-aggregator`: heartbeat ingest over the real broker next to
//! a raw lapin consume of the same messages in the same run, the aggregator's
//! memory (VmRSS) at 100,000 tracked nodes, and the bytes a steady-state node poll
//! fetches (the change feed next to the whole live listing it replaced). Prints
//! numbers; asserts nothing.
//!
//! Both ingest measurements pre-fill a queue with the same transient heartbeat
//! envelopes, then time draining it: the raw consumer with the bus's own pattern
//! (prefetch 64, one ack per message), the aggregator through its AMQP bus (decode,
//! dead-letter checks, handler, node table).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::local::LocalBus;
use epu_core::bus::{Bus, BusOptions, FnHandler};
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::Metrics;
use epu_core::testing::{amqp_url, test_run};
use epu_core::wire::{Envelope, Op, ReplyError, RunName, Service};
use epu_model::messages::{
    DescribeNodesReply, DescribeNodesRequest, Heartbeat, NodeRecord, WorkerState,
};
use epu_model::NodeState;
use epu_testkit::node;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, DomainSensors};
use serde_json::json;

const MESSAGES: usize = 50_000;
const NODES_IN_STREAM: usize = 10_000;
const TRACKED: usize = 100_000;
const DOMAINS: usize = 100;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The process's peak resident set (VmHWM), KiB.
fn hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn heartbeat(i: usize) -> Heartbeat {
    Heartbeat {
        node_id: format!("node-{:06}", i),
        domain: format!("domain-{:03}", i % DOMAINS),
        state: WorkerState::Ok,
        jobs: (i % 2) as u32,
        exit_code: None,
        stderr_tail: None,
        at: Utc::now(),
    }
}

fn payloads(run: &RunName) -> Vec<Vec<u8>> {
    (0..MESSAGES)
        .map(|i| {
            Envelope::with_body(run, Op::Heartbeat, "bench", &heartbeat(i % NODES_IN_STREAM))
                .and_then(|e| e.to_bytes())
                .expect("envelope")
        })
        .collect()
}

/// Publishes `payloads` transient to `exchange`/`key` and waits until the broker has them.
async fn fill(conn: &Connection, exchange: &str, key: &str, payloads: &[Vec<u8>]) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut pending = Vec::with_capacity(payloads.len());
    for p in payloads {
        pending.push(
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                p,
                BasicProperties::default()
                    .with_delivery_mode(1)
                    .with_content_type("application/json".into()),
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        p.await.expect("confirm");
    }
    let _ = ch.close(200, "ok".into()).await;
}

/// Drains a durable queue holding `payloads` with a plain lapin consumer on its own
/// connection: acking each message as the bus does, or with no acks at all.
async fn raw_consume_rate(run: &RunName, payloads: &[Vec<u8>], ack_each: bool) -> f64 {
    let conn = connect().await;
    let queue = format!("bench.raw.{run}");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    fill(&conn, "", &queue, payloads).await;
    ch.basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions {
                no_ack: !ack_each,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let start = Instant::now();
    let mut n = 0;
    while n < payloads.len() {
        let d = consumer.next().await.expect("stream").expect("delivery");
        if ack_each {
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    rate
}

async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("this bench needs RabbitMQ (see epu_core::testing)")
}

async fn aggregator_ingest_rate(run: &RunName, conn: &Connection, payloads: &[Vec<u8>]) -> f64 {
    let url = amqp_url();
    // Declares the run's topology (the aggregator's queue) before the fill.
    let bus = AmqpBus::connect(&url, run.clone(), BusOptions::new("sensor-aggregator"))
        .await
        .expect("bus");
    fill(
        conn,
        &run.exchange(),
        "sensor-aggregator.heartbeat",
        payloads,
    )
    .await;
    let mut cfg = AggregatorConfig::new(run.clone());
    cfg.bus.amqp_url = url;
    let metrics = Metrics::new();
    let agg = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: Arc::new(bus.clone()),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: metrics.clone(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let start = Instant::now();
    let running = agg.start().await.expect("start");
    let counter = || {
        metrics
            .encode()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("epu_sensor_heartbeats_total "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    while counter() < payloads.len() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if start.elapsed() > Duration::from_secs(600) {
            panic!("ingest did not finish");
        }
    }
    let rate = payloads.len() as f64 / start.elapsed().as_secs_f64();
    running.stop().await;
    let _ = bus.delete_topology().await;
    bus.close().await;
    rate
}

/// Node `node-<i>`'s record: RUNNING, revision `i + 1` (the fake's feed holds the
/// 100,000 records at revisions 1..=100,000, none changing).
fn record(node_id: &str, run: &RunName) -> Option<NodeRecord> {
    let i: usize = node_id.strip_prefix("node-")?.parse().ok()?;
    Some(record_at(i, run))
}

fn record_at(i: usize, run: &RunName) -> NodeRecord {
    node(
        &format!("domain-{:03}", i % DOMAINS),
        &format!("node-{i:06}"),
    )
    .run(run)
    .state(NodeState::Running)
    .driver("local")
    .launch(&format!("launch-{}", i / 10))
    .iaas(&format!("{}", 10_000 + i))
    .revision(i as u64 + 1)
    .build()
}

fn reported(agg: &Aggregator) -> usize {
    (0..DOMAINS)
        .map(|d| agg.reading(&format!("domain-{d:03}")).nodes.len())
        .sum()
}

/// What the bench's provisioner answered, by kind of request.
#[derive(Default)]
struct Served {
    /// Holds the 100,000 records (before: an empty store at revision 0).
    holding: AtomicBool,
    feed_requests: AtomicUsize,
    feed_records: AtomicUsize,
    feed_bytes: AtomicUsize,
    by_id_requests: AtomicUsize,
    live_bytes: AtomicUsize,
    live_records: AtomicUsize,
}

/// The provisioner's answer to `req` over 100,000 unchanging RUNNING records: the
/// change feed (`since`/`limit`), by id, or the whole live listing.
fn answer(req: &DescribeNodesRequest, served: &Served, run: &RunName) -> DescribeNodesReply {
    let head = if served.holding.load(Ordering::SeqCst) {
        TRACKED as u64
    } else {
        0
    };
    if req.since.is_some() || req.limit.is_some() {
        let since = req.since.unwrap_or(0);
        let full = since == 0 || since > head;
        let from = if full { 0 } else { since } as usize;
        let limit = req.limit.unwrap_or(usize::MAX).max(1);
        let to = (head as usize).min(from.saturating_add(limit));
        let nodes: Vec<NodeRecord> = (from..to).map(|i| record_at(i, run)).collect();
        let more = to < head as usize;
        return DescribeNodesReply {
            enabled: true,
            next: if more { to as u64 } else { head },
            nodes,
            revision: head,
            more,
            full,
        };
    }
    let nodes: Vec<NodeRecord> = if !served.holding.load(Ordering::SeqCst) {
        Vec::new()
    } else if req.node_ids.is_empty() {
        (0..TRACKED)
            .map(|i| record_at(i, run))
            .filter(|r| !req.live_only || r.state.is_live())
            .collect()
    } else {
        req.node_ids
            .iter()
            .filter_map(|id| record(id, run))
            .collect()
    };
    DescribeNodesReply {
        enabled: true,
        nodes,
        revision: head,
        next: head,
        more: false,
        full: true,
    }
}

/// Runs in a fresh process (`ingest --memory`), so nothing else has touched the heap:
/// RSS empty, with 100,000 nodes heard, with the provisioner's facts for each
/// (learned through the change feed's full listing, pages of 1000), and the cost of
/// a steady-state poll: the feed's (measured over several polls) next to the
/// whole `live_only` listing the aggregator used to fetch every poll (asked once,
/// of the same provisioner, in the same run).
fn memory_child() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = test_run("bench-mem");
        let bus = LocalBus::new(run.clone(), BusOptions::new("host"));
        let served = Arc::new(Served::default());
        let (srv, prov_run) = (served.clone(), run.clone());
        let prov = bus
            .serve(
                Service::Provisioner,
                Arc::new(FnHandler(move |msg: epu_core::bus::Incoming| {
                    let (served, run) = (srv.clone(), prov_run.clone());
                    async move {
                        let req: DescribeNodesRequest = msg.envelope.parse_body()?;
                        let reply = answer(&req, &served, &run);
                        let value = json!(reply);
                        let bytes = serde_json::to_vec(&value).map_or(0, |v| v.len());
                        if req.since.is_some() {
                            served.feed_requests.fetch_add(1, Ordering::SeqCst);
                            served.feed_records.fetch_add(reply.nodes.len(), Ordering::SeqCst);
                            served.feed_bytes.fetch_add(bytes, Ordering::SeqCst);
                        } else if req.live_only {
                            served.live_records.fetch_add(reply.nodes.len(), Ordering::SeqCst);
                            served.live_bytes.fetch_add(bytes, Ordering::SeqCst);
                        } else {
                            served.by_id_requests.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, ReplyError>(value)
                    }
                })),
            )
            .await
            .expect("provisioner");
        // The controller takes the readings (else they pile up in its local queue).
        let controller = bus
            .serve(
                Service::Controller,
                Arc::new(FnHandler(|_msg: epu_core::bus::Incoming| async {
                    Ok::<_, ReplyError>(json!({}))
                })),
            )
            .await
            .expect("controller");
        let mut cfg = AggregatorConfig::new(run.clone());
        cfg.nodes_poll_secs = 0.5;
        for d in 0..DOMAINS {
            cfg.domains.push(DomainSensors::new(format!("domain-{d:03}")));
        }
        let agg = Aggregator::new(
            cfg,
            AggregatorDeps {
                bus: Arc::new(bus.view(BusOptions::new("sensor-aggregator"))),
                store: Arc::new(MemStore::new()),
                clock: SystemClock::shared(),
                metrics: Metrics::new(),
                readiness: Default::default(),
            },
        )
        .expect("aggregator");
        let running = agg.start().await.expect("start");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let empty = rss_kib();
        for i in 0..TRACKED {
            agg.record_heartbeat(heartbeat(i));
        }
        assert_eq!(agg.tracked_nodes(), TRACKED);
        let heard = rss_kib();
        let pages_before = served.feed_requests.load(Ordering::SeqCst);
        let records_before = served.feed_records.load(Ordering::SeqCst);
        served.holding.store(true, Ordering::SeqCst);
        let t = Instant::now();
        // Timed on the provisioner's side (reading 100 domains sweeps the table 100
        // times, which would slow the sync it measures), then checked.
        while served.feed_records.load(Ordering::SeqCst) - records_before < TRACKED {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(t.elapsed() < Duration::from_secs(300), "facts never arrived");
        }
        let synced_in = t.elapsed();
        let sync_pages = served.feed_requests.load(Ordering::SeqCst) - pages_before;
        while reported(&agg) < TRACKED {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(t.elapsed() < Duration::from_secs(300), "facts never applied");
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let with_facts = rss_kib();
        let peak = hwm_kib();

        const STEADY_POLLS: usize = 5;
        let (requests, records, bytes) = (
            served.feed_requests.load(Ordering::SeqCst),
            served.feed_records.load(Ordering::SeqCst),
            served.feed_bytes.load(Ordering::SeqCst),
        );
        let by_id = served.by_id_requests.load(Ordering::SeqCst);
        while served.feed_requests.load(Ordering::SeqCst) < requests + 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        while served.feed_requests.load(Ordering::SeqCst) < requests + 1 + STEADY_POLLS {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let poll_cycle = t.elapsed() / STEADY_POLLS as u32;
        let polls = served.feed_requests.load(Ordering::SeqCst) - requests;
        let feed_records = (served.feed_records.load(Ordering::SeqCst) - records) / polls;
        let feed_bytes = (served.feed_bytes.load(Ordering::SeqCst) - bytes) / polls;
        let by_id = served.by_id_requests.load(Ordering::SeqCst) - by_id;
        let after_steady = rss_kib();

        // The poll the aggregator made before the feed, asked of the same provisioner.
        let live = DescribeNodesRequest {
            live_only: true,
            ..Default::default()
        };
        let cli = bus.view(BusOptions::new("bench"));
        let got = epu_core::request::call(&cli, "bench", &live, Duration::from_secs(60))
            .await
            .expect("describe_nodes live_only");
        assert_eq!(got.nodes.len(), TRACKED);
        drop(got);
        let live_bytes = served.live_bytes.load(Ordering::SeqCst);
        let live_records = served.live_records.load(Ordering::SeqCst);

        running.stop().await;
        prov.stop().await;
        controller.stop().await;
        let per = |kib: u64| (kib.saturating_sub(empty) * 1024) as f64 / TRACKED as f64;
        println!("memory (VmRSS) with {TRACKED} tracked nodes in {DOMAINS} domains (fresh process):");
        println!("  aggregator started, no nodes:            {empty:>8} KiB");
        println!("  100,000 nodes heard (heartbeats only):   {heard:>8} KiB  ({:.0} B/node)", per(heard));
        println!("  + the provisioner's facts for each:      {with_facts:>8} KiB  ({:.0} B/node; the feed's full listing, {sync_pages} pages of 1000, {synced_in:.1?})", per(with_facts));
        println!("  peak (VmHWM) through the full listing:   {peak:>8} KiB");
        let steady = format!("after {polls} steady-state polls:");
        println!("  {steady:<39}  {after_steady:>8} KiB  (a poll every {poll_cycle:.1?}; {by_id} by-id queries)");
        println!("bytes fetched per steady-state poll at {TRACKED} unchanged nodes (reply bodies, this run):");
        println!("  before (describe_nodes live_only, whole listing): {live_bytes:>10} bytes, {live_records} records");
        println!("  after  (change feed since the last revision):     {feed_bytes:>10} bytes, {feed_records} records");
    });
}

fn main() {
    if std::env::args().any(|a| a == "--memory") {
        memory_child();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = test_run("bench-ingest");
        let payloads = payloads(&run);
        let bytes = payloads.first().map_or(0, Vec::len);
        println!("heartbeat ingest over RabbitMQ: {MESSAGES} transient heartbeats of {bytes} bytes from {NODES_IN_STREAM} nodes, pre-filled, then drained:");
        let raw1 = raw_consume_rate(&run, &payloads, true).await;
        let conn = connect().await;
        let agg = aggregator_ingest_rate(&run, &conn, &payloads).await;
        let _ = conn.close(200, "done".into()).await;
        let raw2 = raw_consume_rate(&run, &payloads, true).await;
        let no_ack = raw_consume_rate(&run, &payloads, false).await;
        let raw = raw1.max(raw2);
        println!("  raw lapin consumer, prefetch 64, ack each:  {raw1:>8.0} msg/s before, {raw2:>8.0} msg/s after");
        println!("  raw lapin consumer, no acks (upper bound):  {no_ack:>8.0} msg/s");
        println!("  sensor-aggregator over its AMQP bus:        {agg:>8.0} heartbeats/s");
        println!("  ratio aggregator / raw (ack each, best):    {:>8.2}", agg / raw);
        println!("  ratio aggregator / raw (no acks):           {:>8.2}", agg / no_ack);
    });
    drop(rt);
    // Memory in a fresh process, so the ingest's buffers do not blur it.
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .arg("--memory")
        .status()
        .expect("memory run");
    assert!(status.success());
}
