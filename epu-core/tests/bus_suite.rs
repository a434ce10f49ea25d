//! One suite, every transport: in-process (`local`), a client process's view of
//! it through the Unix socket (`socket`), and RabbitMQ (`amqp`, real broker).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epu_core::bus::local::LocalBus;
use epu_core::bus::socket::{SocketBus, SocketServer, SOCKET_FILE};
use epu_core::bus::{Bus, BusMetrics, BusOptions, FnHandler, Handler, Incoming};
use epu_core::testing::{amqp_bus, test_options, test_run, wait_until, TEST_SECRET};
use epu_core::wire::{
    sign, Envelope, ErrorCode, Headers, Op, ReplyError, RunName, Service, SIGNATURE_HEADER,
};
use serde_json::json;

/// What a suite test gets: a bus the service side serves on, and a client side.
struct Harness {
    run: RunName,
    server: Arc<dyn Bus>,
    client: Arc<dyn Bus>,
    /// A client whose shared secret is wrong.
    stranger: Arc<dyn Bus>,
    metrics: BusMetrics,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
    cleanup: Option<epu_core::bus::amqp::AmqpBus>,
}

impl Harness {
    async fn finish(self) {
        if let Some(amqp) = self.cleanup {
            amqp.delete_topology().await.expect("cleanup");
            amqp.close().await;
        }
    }
}

fn server_options(metrics: &BusMetrics) -> BusOptions {
    test_options("svc").with_metrics(metrics.clone())
}

async fn local(name: &str) -> Harness {
    let run = test_run(name);
    let metrics = BusMetrics::unregistered();
    let bus = LocalBus::new(run.clone(), server_options(&metrics));
    let stranger = bus.view(BusOptions::new("stranger").with_secret(b"wrong"));
    let client = bus.view(test_options("cli"));
    Harness {
        run,
        server: Arc::new(bus),
        client: Arc::new(client),
        stranger: Arc::new(stranger),
        metrics,
        _keep: vec![],
        cleanup: None,
    }
}

async fn socket(name: &str) -> Harness {
    let run = test_run(name);
    let metrics = BusMetrics::unregistered();
    let bus = LocalBus::new(run.clone(), server_options(&metrics));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(SOCKET_FILE);
    let server = SocketServer::bind(&path, bus.clone()).await.expect("bind");
    let client = SocketBus::new(&path, run.clone(), test_options("cli"));
    let stranger = SocketBus::new(
        &path,
        run.clone(),
        BusOptions::new("x").with_secret(b"wrong"),
    );
    Harness {
        run,
        server: Arc::new(bus),
        client: Arc::new(client),
        stranger: Arc::new(stranger),
        metrics,
        _keep: vec![Box::new(dir), Box::new(server)],
        cleanup: None,
    }
}

async fn amqp(name: &str) -> Harness {
    let run = test_run(name);
    let metrics = BusMetrics::unregistered();
    let server = amqp_bus(&run, server_options(&metrics)).await;
    let client = amqp_bus(&run, test_options("cli")).await;
    let mut bad = test_options("stranger");
    bad = bad.with_secret(b"wrong");
    let stranger = amqp_bus(&run, bad).await;
    Harness {
        run,
        server: Arc::new(server.clone()),
        client: Arc::new(client),
        stranger: Arc::new(stranger),
        metrics,
        _keep: vec![],
        cleanup: Some(server),
    }
}

/// A handler that records what it saw and answers `describe_nodes` with a typed error
/// for `{"missing": true}`.
fn recorder() -> (Arc<dyn Handler>, Arc<Mutex<Vec<Envelope>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let h = FnHandler(move |msg: Incoming| {
        let s = s.clone();
        async move {
            let env = msg.envelope;
            s.lock().expect("lock").push(env.clone());
            if env.body.get("missing") == Some(&json!(true)) {
                return Err(ReplyError::not_found("no such node"));
            }
            Ok(json!({"echo": env.body, "op": env.op.as_str()}))
        }
    });
    (Arc::new(h), seen)
}

fn count(seen: &Arc<Mutex<Vec<Envelope>>>) -> usize {
    seen.lock().expect("lock").len()
}

async fn one_way_messages_arrive_intact(h: Harness) {
    let (handler, seen) = recorder();
    let server = h
        .server
        .serve(Service::Provisioner, handler)
        .await
        .expect("serve");
    let env = Envelope::new(
        &h.run,
        Op::Provision,
        "test",
        json!({"count": 2, "launch_id": "l1"}),
    );
    h.client
        .send(Service::Provisioner, &env)
        .await
        .expect("send");
    assert!(wait_until(Duration::from_secs(10), || count(&seen) == 1).await);
    assert_eq!(seen.lock().expect("lock")[0], env);
    server.stop().await;
    h.finish().await;
}

async fn requests_get_results_and_typed_errors(h: Harness) {
    let (handler, _seen) = recorder();
    let server = h
        .server
        .serve(Service::Controller, handler)
        .await
        .expect("serve");
    let t = Duration::from_secs(10);
    let env = Envelope::new(&h.run, Op::ListDomains, "test", json!({"x": 1}));
    let got = h
        .client
        .request(Service::Controller, &env, t)
        .await
        .expect("reply");
    assert_eq!(got, json!({"echo": {"x": 1}, "op": "list_domains"}));
    let env = Envelope::new(&h.run, Op::DescribeDomain, "test", json!({"missing": true}));
    let err = h
        .client
        .request(Service::Controller, &env, t)
        .await
        .expect_err("typed error");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.message, "no such node");
    // Every service answers `status`.
    let env = Envelope::new(&h.run, Op::Status, "test", json!({}));
    h.client
        .request(Service::Controller, &env, t)
        .await
        .expect("status");
    server.stop().await;
    h.finish().await;
}

async fn requests_time_out_when_nobody_serves(h: Harness) {
    let env = Envelope::new(&h.run, Op::DescribeNodes, "test", json!({}));
    let started = std::time::Instant::now();
    let err = h
        .client
        .request(Service::Provisioner, &env, Duration::from_millis(500))
        .await
        .expect_err("nobody answers");
    assert_eq!(err.code, ErrorCode::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    h.finish().await;
}

async fn messages_wait_for_a_late_server(h: Harness) {
    for i in 0..3 {
        let env = Envelope::new(&h.run, Op::InstanceInfo, "test", json!({"i": i}));
        h.client
            .send(Service::Controller, &env)
            .await
            .expect("send");
    }
    let (handler, seen) = recorder();
    let server = h
        .server
        .serve(Service::Controller, handler)
        .await
        .expect("serve");
    assert!(wait_until(Duration::from_secs(10), || count(&seen) == 3).await);
    let order: Vec<_> = seen
        .lock()
        .expect("l")
        .iter()
        .map(|e| e.body["i"].clone())
        .collect();
    assert_eq!(order, vec![json!(0), json!(1), json!(2)], "in order");
    server.stop().await;
    h.finish().await;
}

async fn refused_messages_go_to_the_dead_letter_queue(h: Harness) {
    let (handler, seen) = recorder();
    let server = h
        .server
        .serve(Service::Provisioner, handler)
        .await
        .expect("serve");
    let good = Envelope::new(&h.run, Op::Provision, "t", json!({}));
    let mut v = serde_json::to_value(&good).expect("v");
    let mut bad: Vec<(Vec<u8>, Headers, &str)> = vec![];
    bad.push((b"{not json".to_vec(), Headers::new(), "not_json"));
    v["op"] = json!("launch_rockets");
    bad.push((
        serde_json::to_vec(&v).expect("e"),
        Headers::new(),
        "unknown_op",
    ));
    v["op"] = json!("provision");
    v["v"] = json!(9);
    bad.push((
        serde_json::to_vec(&v).expect("e"),
        Headers::new(),
        "unknown_version",
    ));
    v["v"] = json!(1);
    v["run"] = json!("some-other-run");
    bad.push((
        serde_json::to_vec(&v).expect("e"),
        Headers::new(),
        "wrong_run",
    ));
    v["run"] = json!(h.run.as_str());
    v.as_object_mut().expect("o").remove("sender");
    bad.push((
        serde_json::to_vec(&v).expect("e"),
        Headers::new(),
        "bad_envelope",
    ));
    let ctl = Envelope::new(&h.run, Op::TerminateAll, "t", json!({}))
        .to_bytes()
        .expect("e");
    bad.push((ctl.clone(), Headers::new(), "missing_signature"));
    let mut wrong = Headers::new();
    wrong.insert(SIGNATURE_HEADER.into(), sign(b"not-the-secret", &ctl));
    bad.push((ctl, wrong, "bad_signature"));
    let n = bad.len();
    for (payload, headers, _) in &bad {
        h.client
            .publish_raw(Service::Provisioner, payload.clone(), headers.clone())
            .await
            .expect("publish");
    }
    // The stranger's signed control op is refused too.
    let ctl = Envelope::new(&h.run, Op::TerminateNodes, "t", json!({"nodes": ["n1"]}));
    h.stranger
        .send(Service::Provisioner, &ctl)
        .await
        .expect("send");
    // And the service keeps running: a good message after all that is handled.
    h.client
        .send(Service::Provisioner, &good)
        .await
        .expect("send");
    assert!(
        wait_until(Duration::from_secs(10), || count(&seen) == 1).await,
        "good one handled"
    );
    let mut dead = Vec::new();
    let ok = async {
        while dead.len() < n + 1 {
            dead.extend(h.client.take_dead_letters(100).await.expect("take"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ok)
        .await
        .expect("all dead-lettered");
    assert_eq!(count(&seen), 1, "nothing refused was handled");
    for (i, (payload, _, label)) in bad.iter().enumerate() {
        assert!(
            dead[i].reason.starts_with(label),
            "{} vs {label}",
            dead[i].reason
        );
        assert_eq!(&dead[i].payload, payload, "bytes kept untouched");
        assert_eq!(dead[i].queue, h.run.queue(Service::Provisioner));
    }
    assert!(
        dead[n].reason.starts_with("bad_signature"),
        "{}",
        dead[n].reason
    );
    let total: u64 = [
        "not_json",
        "unknown_op",
        "unknown_version",
        "wrong_run",
        "bad_envelope",
        "missing_signature",
        "bad_signature",
    ]
    .iter()
    .map(|l| {
        h.metrics
            .rejected
            .with_label_values(&["provisioner", l])
            .get()
    })
    .sum();
    assert_eq!(total, (n + 1) as u64, "each refusal counted");
    server.stop().await;
    h.finish().await;
}

async fn malformed_bodies_are_dead_lettered_and_answered(h: Harness) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Needs {
        node_id: String,
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let c = handled.clone();
    let handler = Arc::new(FnHandler(move |m: Incoming| {
        let c = c.clone();
        async move {
            let _: Needs = m.envelope.parse_body()?;
            c.fetch_add(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    }));
    let server = h
        .server
        .serve(Service::SensorAggregator, handler)
        .await
        .expect("serve");
    // One-way, with a body the service cannot read: dead-lettered, not lost.
    let bad = Envelope::new(&h.run, Op::Heartbeat, "t", json!({"nodeid": "typo"}));
    h.client
        .send(Service::SensorAggregator, &bad)
        .await
        .expect("send");
    // A request with such a body is answered bad_request, and dead-lettered too.
    let asked = Envelope::new(&h.run, Op::DescribeSensors, "t", json!({}));
    let err = h
        .client
        .request(Service::SensorAggregator, &asked, Duration::from_secs(10))
        .await
        .expect_err("bad body");
    assert_eq!(err.code, ErrorCode::BadRequest, "{err}");
    assert!(err.message.contains("node_id"), "{err}");
    let good = Envelope::new(&h.run, Op::Heartbeat, "t", json!({"node_id": "n1"}));
    h.client
        .send(Service::SensorAggregator, &good)
        .await
        .expect("send");
    assert!(
        wait_until(Duration::from_secs(10), || handled.load(Ordering::SeqCst)
            == 1)
        .await
    );
    let mut dead = Vec::new();
    let collect = async {
        while dead.len() < 2 {
            dead.extend(h.client.take_dead_letters(10).await.expect("take"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), collect)
        .await
        .expect("both dead-lettered");
    assert!(
        dead.iter().all(|d| d.reason.starts_with("bad_body")),
        "{dead:?}"
    );
    assert_eq!(dead[0].payload, bad.to_bytes().expect("bytes"));
    assert_eq!(
        h.metrics
            .rejected
            .with_label_values(&["sensor-aggregator", "bad_body"])
            .get(),
        2
    );
    server.stop().await;
    h.finish().await;
}

async fn signed_control_ops_are_accepted_and_bad_ones_answered(h: Harness) {
    let (handler, seen) = recorder();
    let server = h
        .server
        .serve(Service::Provisioner, handler)
        .await
        .expect("serve");
    let t = Duration::from_secs(10);
    let env = Envelope::new(&h.run, Op::TerminateAll, "t", json!({}));
    h.client
        .request(Service::Provisioner, &env, t)
        .await
        .expect("signed and accepted");
    assert_eq!(count(&seen), 1);
    // Someone without the secret asks: refused with a typed error, not a timeout.
    let err = h
        .stranger
        .request(Service::Provisioner, &env, t)
        .await
        .expect_err("refused");
    assert_eq!(err.code, ErrorCode::Unauthenticated, "{err}");
    assert_eq!(count(&seen), 1, "the stranger's request was not handled");
    // An op sent to the wrong service is refused as unknown there.
    let env = Envelope::new(&h.run, Op::Heartbeat, "t", json!({}));
    let err = h
        .client
        .request(Service::Provisioner, &env, t)
        .await
        .expect_err("wrong service");
    assert_eq!(err.code, ErrorCode::UnknownOp);
    server.stop().await;
    h.finish().await;
}

async fn runs_never_see_each_other(h: Harness) {
    let other = test_run("other");
    assert_ne!(other, h.run);
    let (handler, seen) = recorder();
    let server = h
        .server
        .serve(Service::Controller, handler)
        .await
        .expect("serve");
    // A second run on the same transport, with its own server.
    let (h2_handler, seen2) = recorder();
    let h2 = match h.cleanup {
        Some(_) => {
            let b = amqp_bus(&other, test_options("b")).await;
            Some(b)
        }
        None => None,
    };
    let other_bus: Arc<dyn Bus> = match &h2 {
        Some(b) => Arc::new(b.clone()),
        None => Arc::new(LocalBus::new(other.clone(), test_options("b"))),
    };
    let server2 = other_bus
        .serve(Service::Controller, h2_handler)
        .await
        .expect("serve2");
    for i in 0..5 {
        let env = Envelope::new(&h.run, Op::SensorInfo, "t", json!({"i": i}));
        h.client
            .send(Service::Controller, &env)
            .await
            .expect("send");
        let env = Envelope::new(&other, Op::SensorInfo, "t", json!({"j": i}));
        other_bus
            .send(Service::Controller, &env)
            .await
            .expect("send");
    }
    assert!(
        wait_until(Duration::from_secs(10), || count(&seen) == 5
            && count(&seen2) == 5)
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.lock().expect("l").iter().all(|e| e.run == h.run));
    assert!(seen2.lock().expect("l").iter().all(|e| e.run == other));
    assert_eq!((count(&seen), count(&seen2)), (5, 5));
    server.stop().await;
    server2.stop().await;
    if let Some(b) = h2 {
        b.delete_topology().await.expect("cleanup");
        b.close().await;
    }
    h.finish().await;
}

async fn a_stopped_server_leaves_messages_for_the_next(h: Harness) {
    let handled = Arc::new(AtomicUsize::new(0));
    let c = handled.clone();
    let handler = Arc::new(FnHandler(move |_m: Incoming| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    }));
    let server = h
        .server
        .serve(Service::SensorAggregator, handler.clone())
        .await
        .expect("serve");
    server.stop().await;
    for _ in 0..4 {
        let env = Envelope::new(&h.run, Op::DescribeSensors, "t", json!({}));
        h.client
            .send(Service::SensorAggregator, &env)
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "no server, nothing handled"
    );
    let server = h
        .server
        .serve(Service::SensorAggregator, handler)
        .await
        .expect("serve again");
    assert!(
        wait_until(Duration::from_secs(10), || handled.load(Ordering::SeqCst)
            == 4)
        .await
    );
    server.stop().await;
    h.finish().await;
}

macro_rules! suite {
    ($transport:ident) => {
        mod $transport {
            use super::*;
            #[tokio::test]
            async fn one_way() {
                one_way_messages_arrive_intact(super::$transport("ow").await).await
            }
            #[tokio::test]
            async fn request_reply() {
                requests_get_results_and_typed_errors(super::$transport("rr").await).await
            }
            #[tokio::test]
            async fn request_timeout() {
                requests_time_out_when_nobody_serves(super::$transport("to").await).await
            }
            #[tokio::test]
            async fn late_server() {
                messages_wait_for_a_late_server(super::$transport("late").await).await
            }
            #[tokio::test]
            async fn dead_letters() {
                refused_messages_go_to_the_dead_letter_queue(super::$transport("dl").await).await
            }
            #[tokio::test]
            async fn bad_bodies() {
                malformed_bodies_are_dead_lettered_and_answered(super::$transport("bb").await).await
            }
            #[tokio::test]
            async fn control_signatures() {
                signed_control_ops_are_accepted_and_bad_ones_answered(
                    super::$transport("sig").await,
                )
                .await
            }
            #[tokio::test]
            async fn run_isolation() {
                runs_never_see_each_other(super::$transport("iso").await).await
            }
            #[tokio::test]
            async fn server_restart() {
                a_stopped_server_leaves_messages_for_the_next(super::$transport("rs").await).await
            }
        }
    };
}

suite!(local);
suite!(socket);
suite!(amqp);

#[test]
fn the_test_secret_is_not_empty() {
    assert!(!TEST_SECRET.is_empty());
}
