//! `cargo bench -p sensor-aggregator`: heartbeat ingest over the real broker next to
//! a raw lapin consume of the same messages in the same run, and the aggregator's
//! memory (VmRSS) at 100,000 tracked nodes. Prints numbers; asserts nothing.
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

fn record(node_id: &str, run: &RunName) -> Option<NodeRecord> {
    let i: usize = node_id.strip_prefix("node-")?.parse().ok()?;
    Some(
        node(&format!("domain-{:03}", i % DOMAINS), node_id)
            .run(run)
            .state(NodeState::Running)
            .driver("local")
            .launch(&format!("launch-{}", i / 10))
            .iaas(&format!("{}", 10_000 + i))
            .build(),
    )
}

fn reported(agg: &Aggregator) -> usize {
    (0..DOMAINS)
        .map(|d| agg.reading(&format!("domain-{d:03}")).nodes.len())
        .sum()
}

/// Runs in a fresh process (`ingest --memory`), so nothing else has touched the heap:
/// RSS empty, with 100,000 nodes heard, with the provisioner's facts for each
/// (learned through by-id queries of 500), and after full `live_only` polls that
/// list all 100,000 (the transient JSON of such a reply is the high-water mark).
fn memory_child() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = test_run("bench-mem");
        let bus = LocalBus::new(run.clone(), BusOptions::new("host"));
        let full_polls = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicUsize::new(0));
        let (full, count, prov_run) = (full_polls.clone(), polls.clone(), run.clone());
        let prov = bus
            .serve(
                Service::Provisioner,
                Arc::new(FnHandler(move |msg: epu_core::bus::Incoming| {
                    let (full, count, run) = (full.clone(), count.clone(), prov_run.clone());
                    async move {
                        let req: DescribeNodesRequest = msg.envelope.parse_body()?;
                        let nodes: Vec<NodeRecord> = if req.live_only {
                            count.fetch_add(1, Ordering::SeqCst);
                            if full.load(Ordering::SeqCst) {
                                (0..TRACKED)
                                    .filter_map(|i| record(&format!("node-{i:06}"), &run))
                                    .collect()
                            } else {
                                Vec::new()
                            }
                        } else {
                            req.node_ids.iter().filter_map(|id| record(id, &run)).collect()
                        };
                        Ok::<_, ReplyError>(json!(DescribeNodesReply {
                            enabled: true,
                            nodes
                        }))
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
        cfg.nodes_poll_secs = 1.0;
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
        let t = Instant::now();
        while reported(&agg) < TRACKED {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(t.elapsed() < Duration::from_secs(300), "facts never arrived");
        }
        let resolved_in = t.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let with_facts = rss_kib();
        full_polls.store(true, Ordering::SeqCst);
        let before = polls.load(Ordering::SeqCst);
        let t = Instant::now();
        while polls.load(Ordering::SeqCst) < before + 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let full_poll_cycle = t.elapsed() / 3;
        let after_full = rss_kib();
        running.stop().await;
        prov.stop().await;
        controller.stop().await;
        let one = record("node-000001", &run)
            .and_then(|r| serde_json::to_vec(&r).ok())
            .map_or(0, |v| v.len());
        let reply_mb = one * TRACKED / 1_000_000;
        let per = |kib: u64| (kib.saturating_sub(empty) * 1024) as f64 / TRACKED as f64;
        println!("memory (VmRSS) with {TRACKED} tracked nodes in {DOMAINS} domains (fresh process):");
        println!("  aggregator started, no nodes:            {empty:>8} KiB");
        println!("  100,000 nodes heard (heartbeats only):   {heard:>8} KiB  ({:.0} B/node)", per(heard));
        println!("  + the provisioner's facts for each:      {with_facts:>8} KiB  ({:.0} B/node; by-id queries, {resolved_in:.1?})", per(with_facts));
        println!("  after full live polls listing all 100k:  {after_full:>8} KiB  (high-water of a {} MB describe_nodes reply; a poll cycle every {full_poll_cycle:.1?})", reply_mb);
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
