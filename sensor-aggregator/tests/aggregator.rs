//! The aggregator against the real broker (and once on the in-process bus).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::{Clock, ManualClock, SystemClock};
use epu_core::store::{MemStore, SledStore, Store};
use epu_core::telemetry::Metrics;
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run, wait_until};
use epu_core::wire::{Envelope, Op, RunName, Service};
use epu_model::health::Secs;
use epu_model::messages::WorkerState;
use epu_model::{Health, NodeState};
use epu_testkit::{
    declare_queue, health_of, heartbeat, lapin_conn, node, record_controller, send_heartbeat,
    Cleanup, FakeProvisioner,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sensor_aggregator::tracker::LAST_HEARD_TREE;
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, DomainSensors};
use serde_json::json;

const EVENTUALLY: Duration = Duration::from_secs(15);

fn config(run: &RunName, domains: Vec<DomainSensors>) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::new(run.clone());
    cfg.bus.amqp_url = amqp_url();
    cfg.nodes_poll_secs = 0.2;
    cfg.domains = domains;
    cfg
}

async fn publish(conn: &lapin::Connection, queue: &str, n: usize) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                br#"{"seconds": 1}"#,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(p.await.expect("confirm").is_ack());
    }
    let _ = ch.close(200, "ok".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_is_ready_messages_plus_jobs_workers_hold() {
    let run = test_run("sa-backlog");
    let mut cleanup = Cleanup::new(&run);
    let queue = format!("jobs.{run}");
    cleanup.queue(&queue);
    let conn = lapin_conn().await;
    declare_queue(&conn, &queue)
        .await
        .expect("declare the work queue");
    // Five "workers": prefetch 1, never ack.
    let mut workers = Vec::new();
    for i in 0..5 {
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                format!("worker-{i}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        workers.push((ch, consumer));
    }
    publish(&conn, &queue, 25).await;
    for (_, consumer) in workers.iter_mut() {
        let got = tokio::time::timeout(EVENTUALLY, consumer.next()).await;
        assert!(matches!(got, Ok(Some(Ok(_)))), "each worker holds one job");
    }

    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let mut d = DomainSensors::new("workers");
    d.queue = Some(queue.clone());
    d.poll_secs = 0.2;
    let agg = Aggregator::new(
        config(&run, vec![d]),
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
    for i in 0..5 {
        send_heartbeat(
            &test_bus,
            &heartbeat(&format!("w{i}"), "workers", 1, Utc::now()),
        )
        .await
        .expect("send a heartbeat");
    }
    let got = rec
        .wait_for(EVENTUALLY, |i| {
            i.domain == "workers" && i.backlog.as_ref().is_some_and(|b| b.total == 25)
        })
        .await;
    let Some((_, info)) = got else {
        panic!("no backlog of 25; last readings: {:?}", rec.all().last());
    };
    let b = info.backlog.expect("backlog");
    assert_eq!((b.ready, b.busy, b.total), (20, 5, 25));
    assert_eq!(b.queue, queue);

    running.stop().await;
    ctl.stop().await;
    agg_bus.close().await;
    test_bus.close().await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_queue_reaches_the_controller_within_two_seconds() {
    let run = test_run("sa-grow");
    let mut cleanup = Cleanup::new(&run);
    let queue = format!("work.{run}");
    cleanup.queue(&queue);
    let conn = lapin_conn().await;
    declare_queue(&conn, &queue)
        .await
        .expect("declare the work queue");
    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    // The default period (1 s) meets the bound.
    let mut d = DomainSensors::new("grow");
    d.queue = Some(queue.clone());
    let agg = Aggregator::new(
        config(&run, vec![d]),
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
    let empty = rec
        .wait_for(EVENTUALLY, |i| {
            i.backlog.as_ref().is_some_and(|b| b.total == 0)
        })
        .await;
    assert!(empty.is_some(), "the empty queue is measured first");

    publish(&conn, &queue, 500).await;
    let last_publish = Instant::now();
    let got = rec
        .wait_for(EVENTUALLY, |i| {
            i.backlog.as_ref().is_some_and(|b| b.total >= 500)
        })
        .await;
    let Some((at, info)) = got else {
        panic!("backlog never reached 500: {:?}", rec.all().last());
    };
    let delay = at.saturating_duration_since(last_publish);
    assert!(
        delay <= Duration::from_secs(2),
        "the controller saw backlog {:?} {delay:?} after the last publish",
        info.backlog
    );

    running.stop().await;
    ctl.stop().await;
    agg_bus.close().await;
    test_bus.close().await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_reported_then_measured_once_it_exists() {
    let run = test_run("sa-missing");
    let mut cleanup = Cleanup::new(&run);
    let queue = format!("late.{run}");
    cleanup.queue(&queue);
    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let mut d = DomainSensors::new("late");
    d.queue = Some(queue.clone());
    d.poll_secs = 0.2;
    let metrics = Metrics::new();
    let agg = Aggregator::new(
        config(&run, vec![d]),
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: metrics.clone(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");

    let describe = || async {
        let env = Envelope::new(&run, Op::DescribeSensors, "test", json!({"domain": "late"}));
        test_bus
            .request(Service::SensorAggregator, &env, Duration::from_secs(10))
            .await
            .expect("describe_sensors")
    };
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let v = describe().await;
        if v["domains"][0]["queue_status"]["status"] == "missing" {
            assert!(v["domains"][0]["backlog"].is_null(), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "never reported missing: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics
        .encode()
        .expect("metrics")
        .contains("epu_sensor_queue_up{domain=\"late\"} 0"));
    let r = rec.wait_for(EVENTUALLY, |i| i.domain == "late").await;
    assert!(r.is_some_and(|(_, i)| i.backlog.is_none()));

    // The probe's channel was closed by the 404; it reopens and finds the queue.
    let conn = lapin_conn().await;
    declare_queue(&conn, &queue)
        .await
        .expect("declare the work queue");
    publish(&conn, &queue, 3).await;
    let got = rec
        .wait_for(EVENTUALLY, |i| {
            i.backlog.as_ref().is_some_and(|b| b.ready == 3)
        })
        .await;
    assert!(got.is_some(), "{:?}", rec.all().last());

    running.stop().await;
    ctl.stop().await;
    agg_bus.close().await;
    test_bus.close().await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heartbeats_are_dead_lettered_and_it_keeps_going() {
    let run = test_run("sa-dead");
    let _cleanup = Cleanup::new(&run);
    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes([node("d", "n1").run(&run).build()])
        .serve(Arc::new(test_bus.clone()))
        .await
        .expect("serve the fake provisioner");
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let metrics = Metrics::new();
    let agg = Aggregator::new(
        config(&run, vec![DomainSensors::new("d")]),
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: metrics.clone(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");

    let good = heartbeat("n1", "d", 0, Utc::now());
    let mut v2 =
        serde_json::to_value(Envelope::with_body(&run, Op::Heartbeat, "x", &good).expect("env"))
            .expect("json");
    v2["v"] = json!(2);
    let other_run =
        Envelope::with_body(&test_run("other"), Op::Heartbeat, "x", &good).expect("env");
    for payload in [
        b"{not json".to_vec(),
        serde_json::to_vec(&v2).expect("bytes"),
        other_run.to_bytes().expect("bytes"),
    ] {
        test_bus
            .publish_raw(Service::SensorAggregator, payload, Default::default())
            .await
            .expect("raw");
    }
    // A valid envelope whose body is not a heartbeat: counted, and dead-lettered as bad_body.
    let bad_body = Envelope::new(&run, Op::Heartbeat, "x", json!({"node": "n1"}));
    test_bus
        .send(Service::SensorAggregator, &bad_body)
        .await
        .expect("send");
    send_heartbeat(&test_bus, &good)
        .await
        .expect("send a heartbeat");

    let got = rec
        .wait_for(EVENTUALLY, |i| health_of(i, "n1") == Some(Health::Ok))
        .await;
    assert!(
        got.is_some(),
        "the good heartbeat after the bad ones is handled"
    );
    let mut dead = Vec::new();
    let found = {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            dead.extend(test_bus.take_dead_letters(10).await.expect("dead"));
            if dead.len() >= 4 || Instant::now() > deadline {
                break dead.len() >= 4;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(found, "dead letters: {dead:?}");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d.reason.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        reasons,
        ["not_json", "unknown_version", "wrong_run", "bad_body"]
    );
    assert!(dead
        .iter()
        .all(|d| d.queue == run.queue(Service::SensorAggregator)));
    let text = metrics.encode().expect("metrics");
    assert!(
        text.contains("epu_sensor_heartbeats_invalid_total 1"),
        "{text}"
    );
    assert!(text.contains("epu_sensor_heartbeats_total 1"), "{text}");

    running.stop().await;
    ctl.stop().await;
    prov.stop().await;
    agg_bus.close().await;
    test_bus.close().await;
}

fn open_store_retrying(path: &std::path::Path) -> SledStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot reopen the store: {e}"),
        }
    }
}

/// A restart (drop everything, reopen the same store) restores last-heard times:
/// a node heard 1 s before the crash with missing_timeout 5 s is not MISSING right
/// after the restart, and is MISSING once 5 s have passed since it was heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_last_heard_times() {
    let run = test_run("sa-restart");
    let _cleanup = Cleanup::new(&run);
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::default();
    let t0 = clock.now();
    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes([node("d", "n1")
            .run(&run)
            .at(t0 - TimeDelta::seconds(100))
            .build()])
        .serve(Arc::new(test_bus.clone()))
        .await
        .expect("serve the fake provisioner");
    let mut d = DomainSensors::new("d");
    d.health.boot_timeout_secs = Secs::new(1.0).expect("valid seconds");
    d.health.missing_timeout_secs = Secs::new(5.0).expect("valid seconds");
    let mut cfg = config(&run, vec![d]);
    cfg.persist_interval_ms = 50;

    // First life: hear n1 at t0, let it be written, crash at t0 + 1 s.
    let store = Arc::new(SledStore::open(dir.path()).expect("store"));
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let agg = Aggregator::new(
        cfg.clone(),
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store: store.clone(),
            clock: clock.shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");
    send_heartbeat(&test_bus, &heartbeat("n1", "d", 0, t0))
        .await
        .expect("send a heartbeat");
    assert!(
        wait_until(EVENTUALLY, || health_of(&agg.reading("d"), "n1")
            == Some(Health::Ok))
        .await
    );
    assert!(
        wait_until(EVENTUALLY, || store
            .get(LAST_HEARD_TREE, "n1")
            .ok()
            .flatten()
            .is_some())
        .await,
        "last-heard written within the persist interval"
    );
    clock.advance(Duration::from_secs(1));
    running.abort().await;
    agg_bus.close().await;
    drop(agg);
    drop(store);

    // Second life, right after the crash.
    let store = Arc::new(open_store_retrying(dir.path()));
    let agg_bus = amqp_bus(&run, test_options("sensor-aggregator")).await;
    let agg = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: Arc::new(agg_bus.clone()),
            store,
            clock: clock.shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let restarted = Instant::now();
    let running = agg.start().await.expect("start");
    // Without the restored time it would be MISSING at once (never heard, RUNNING
    // for 101 s, boot_timeout 1 s).
    let first = rec
        .wait_after(restarted, EVENTUALLY, |i| health_of(i, "n1").is_some())
        .await
        .expect("a reading after the restart");
    assert_eq!(health_of(&first.1, "n1"), Some(Health::Ok), "{:?}", first.1);
    let heard = first.1.nodes[0].last_heard.expect("last heard");
    assert!(
        heard >= t0 - TimeDelta::milliseconds(100) && heard <= t0,
        "{heard}"
    );
    clock.set(t0 + TimeDelta::milliseconds(4900));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        health_of(&agg.reading("d"), "n1"),
        Some(Health::Ok),
        "not MISSING early"
    );
    let before = Instant::now();
    clock.set(t0 + TimeDelta::milliseconds(5100));
    let missing = rec
        .wait_after(before, EVENTUALLY, |i| {
            health_of(i, "n1") == Some(Health::Missing)
        })
        .await;
    assert!(missing.is_some(), "MISSING once silent for missing_timeout");

    running.stop().await;
    ctl.stop().await;
    prov.stop().await;
    agg_bus.close().await;
    test_bus.close().await;
}

/// Kills the process on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_binary(config: &std::path::Path, log: &std::path::Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sensor-aggregator"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sensor-aggregator");
    Proc(child)
}

/// The binary, killed with SIGKILL and started again over the same store: the
/// restored last-heard time is used (not MISSING at once, MISSING on time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_sigkill_with_its_last_heard_times() {
    let run = test_run("sa-kill");
    let _cleanup = Cleanup::new(&run);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("aggregator.toml");
    let log = dir.path().join("aggregator.log");
    std::fs::write(
        &cfg_path,
        format!(
            "run = \"{run}\"\nnodes_poll_secs = 0.2\nsensor_info_interval_secs = 1\npersist_interval_ms = 200\n\
             [bus]\namqp_url = \"{}\"\n[store]\npath = \"{}\"\n\
             [[domains]]\nname = \"d\"\nboot_timeout_secs = 1\nmissing_timeout_secs = 4\n",
            amqp_url(),
            dir.path().join("store").display()
        ),
    )
    .expect("config");
    let test_bus = amqp_bus(&run, test_options("test")).await;
    let (ctl, rec) = record_controller(&test_bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes([node("d", "n1")
            .run(&run)
            .at(Utc::now() - TimeDelta::seconds(60))
            .build()])
        .serve(Arc::new(test_bus.clone()))
        .await
        .expect("serve the fake provisioner");

    let first = start_binary(&cfg_path, &log);
    let mut last_beat;
    let ok = {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            send_heartbeat(&test_bus, &heartbeat("n1", "d", 0, Utc::now()))
                .await
                .expect("send a heartbeat");
            last_beat = Instant::now();
            if rec
                .find(|i| health_of(i, "n1") == Some(Health::Ok))
                .is_some()
                || Instant::now() > deadline
            {
                break rec
                    .find(|i| health_of(i, "n1") == Some(Health::Ok))
                    .is_some();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(
        ok,
        "first process reports n1 OK; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Let the last heartbeat be written (persist every 200 ms), then SIGKILL.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    drop(first);

    let restarted = Instant::now();
    let _second = start_binary(&cfg_path, &log);
    let again = rec
        .wait_after(restarted, EVENTUALLY, |i| health_of(i, "n1").is_some())
        .await
        .expect("the restarted process reports n1");
    assert_eq!(
        health_of(&again.1, "n1"),
        Some(Health::Ok),
        "restored, so not MISSING at once (never-heard would be: boot_timeout 1 s)"
    );
    let missing = rec
        .wait_after(restarted, EVENTUALLY, |i| {
            health_of(i, "n1") == Some(Health::Missing)
        })
        .await
        .expect("MISSING eventually");
    let after_beat = missing.0.duration_since(last_beat);
    // missing_timeout 4 s; persisted up to 200 ms early; the reporter sweeps every 100 ms.
    assert!(
        after_beat >= Duration::from_millis(3700) && after_beat <= Duration::from_millis(5500),
        "MISSING {after_beat:?} after the last heartbeat"
    );

    ctl.stop().await;
    prov.stop().await;
    test_bus.close().await;
}

/// The standalone path: a LocalBus, a manual clock, runtime domain changes, and the
/// `describe_sensors` and `status` operations.
#[tokio::test]
async fn in_process_on_the_local_bus() {
    let run = test_run("sa-local");
    let clock = ManualClock::default();
    let t0 = clock.now();
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let (ctl, rec) = record_controller(&bus)
        .await
        .expect("serve the controller queue");
    let prov = FakeProvisioner::builder()
        .nodes(["a", "b"].map(|id| node("web", id).run(&run).at(t0).build()))
        .serve(Arc::new(bus.clone()))
        .await
        .expect("serve the fake provisioner");
    let mut cfg = AggregatorConfig::new(run.clone());
    cfg.nodes_poll_secs = 0.05;
    let mut web = DomainSensors::new("web");
    web.health.missing_timeout_secs = Secs::new(5.0).expect("valid seconds");
    web.health.boot_timeout_secs = Secs::new(30.0).expect("valid seconds");
    cfg.domains.push(web.clone());
    let agg = Aggregator::new(
        cfg,
        AggregatorDeps {
            bus: Arc::new(bus.view(test_options("sensor-aggregator"))),
            store: Arc::new(MemStore::new()),
            clock: clock.shared(),
            metrics: Metrics::new(),
            readiness: Default::default(),
        },
    )
    .expect("aggregator");
    let running = agg.start().await.expect("start");

    send_heartbeat(&bus, &heartbeat("a", "web", 2, t0))
        .await
        .expect("send a heartbeat");
    let mut err = heartbeat("b", "web", 0, t0);
    err.state = WorkerState::ProcessError;
    err.exit_code = Some(3);
    err.stderr_tail = Some("boom\n".into());
    send_heartbeat(&bus, &err).await.expect("send a heartbeat");
    let got = rec
        .wait_for(EVENTUALLY, |i| {
            health_of(i, "a") == Some(Health::Ok) && health_of(i, "b") == Some(Health::ProcessError)
        })
        .await
        .expect("readings");
    let b = got.1.nodes.iter().find(|n| n.node_id == "b").expect("b");
    assert_eq!(
        (b.exit_code, b.stderr_tail.as_deref()),
        (Some(3), Some("boom\n"))
    );
    assert_eq!(
        got.1
            .nodes
            .iter()
            .find(|n| n.node_id == "a")
            .and_then(|n| n.jobs),
        Some(2)
    );

    // Silent 6 s > missing_timeout 5 s: MISSING. A tighter setting applies at once.
    let before = Instant::now();
    clock.advance(Duration::from_secs(6));
    assert!(rec
        .wait_after(before, EVENTUALLY, |i| health_of(i, "a")
            == Some(Health::Missing))
        .await
        .is_some());
    send_heartbeat(&bus, &heartbeat("a", "web", 0, clock.now()))
        .await
        .expect("send a heartbeat");
    assert!(
        rec.wait_after(before, EVENTUALLY, |i| health_of(i, "a")
            == Some(Health::Ok))
            .await
            .is_some(),
        "an OK heartbeat clears MISSING"
    );
    web.health.missing_timeout_secs = Secs::new(1.0).expect("valid seconds");
    agg.set_domain(web).expect("set_domain");
    let before = Instant::now();
    clock.advance(Duration::from_secs(2));
    assert!(rec
        .wait_after(before, EVENTUALLY, |i| health_of(i, "a")
            == Some(Health::Missing))
        .await
        .is_some());

    // A terminated node that keeps heartbeating past zombie_secs is a ZOMBIE.
    prov.put(
        node("web", "a")
            .run(&run)
            .state(NodeState::Terminated)
            .at(clock.now())
            .entered(NodeState::Running, t0)
            .build(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    clock.advance(Duration::from_secs(11));
    let before = Instant::now();
    send_heartbeat(&bus, &heartbeat("a", "web", 0, clock.now()))
        .await
        .expect("send a heartbeat");
    assert!(rec
        .wait_after(before, EVENTUALLY, |i| health_of(i, "a")
            == Some(Health::Zombie))
        .await
        .is_some());

    let env = Envelope::new(&run, Op::DescribeSensors, "cli", json!({}));
    let v = bus
        .request(Service::SensorAggregator, &env, Duration::from_secs(5))
        .await
        .expect("describe");
    assert_eq!(v["domains"][0]["name"], "web", "{v}");
    assert_eq!(v["domains"][0]["missing_timeout_secs"], 1.0, "{v}");
    let env = Envelope::new(&run, Op::DescribeSensors, "cli", json!({"domain": "nope"}));
    let e = bus
        .request(Service::SensorAggregator, &env, Duration::from_secs(5))
        .await
        .expect_err("unknown domain");
    assert_eq!(e.code, epu_core::wire::ErrorCode::NotFound);
    let env = Envelope::new(&run, Op::Status, "cli", json!({}));
    let v = bus
        .request(Service::SensorAggregator, &env, Duration::from_secs(5))
        .await
        .expect("status");
    assert_eq!(v["service"], "sensor-aggregator");
    assert_eq!(v["heartbeats_received"], 4);

    running.stop().await;
    ctl.stop().await;
    prov.stop().await;
}
