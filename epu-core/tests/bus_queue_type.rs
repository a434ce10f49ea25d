//! `bus.queue_type` and broker URL lists against the one broker on 127.0.0.1:5672:
//! quorum queues work on a single node, a run keeps its queues' type (a service
//! configured otherwise is refused with what to do), clients without a `[bus]`
//! section use a run's queues whatever their type, and a URL list skips a dead broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::{Bus, BusError, BusOptions, FnHandler, Incoming};
use epu_core::config::QueueType;
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run, wait_until};
use epu_core::wire::{Envelope, Headers, Op, RunName, Service};
use serde_json::json;
use uuid::Uuid;

fn typed(sender: &str, t: QueueType) -> BusOptions {
    test_options(sender).with_queue_type(t)
}

async fn connect(run: &RunName, opts: BusOptions) -> Result<AmqpBus, BusError> {
    AmqpBus::connect(&amqp_url(), run.clone(), opts).await
}

/// Serves the controller's queue, counting deliveries by id.
async fn counting_server(bus: &AmqpBus) -> (epu_core::bus::Server, Arc<Mutex<Vec<Uuid>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = Arc::new(FnHandler(move |m: Incoming| {
        let s = s.clone();
        async move {
            s.lock().expect("lock").push(m.envelope.msg_id);
            Ok(json!({"ok": true}))
        }
    }));
    let server = bus
        .serve(Service::Controller, handler)
        .await
        .expect("serve");
    (server, seen)
}

async fn round_trip(run: &RunName, server: &AmqpBus, client: &AmqpBus) {
    let (consumer, seen) = counting_server(server).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let env = Envelope::new(run, Op::InstanceInfo, "cli", json!({"i": i}));
        client
            .send(Service::Controller, &env)
            .await
            .expect("confirmed publish");
        sent.push(env.msg_id);
    }
    let ask = Envelope::new(run, Op::ListDomains, "cli", json!({}));
    let answer = client
        .request(Service::Controller, &ask, Duration::from_secs(10))
        .await
        .expect("request answered");
    assert_eq!(answer, json!({"ok": true}));
    let all = wait_until(Duration::from_secs(20), || {
        let s = seen.lock().expect("lock");
        sent.iter().all(|id| s.contains(id))
    })
    .await;
    assert!(all, "not every confirmed message arrived");
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_work_on_a_single_node_and_keep_their_type() {
    let run = test_run("qq");
    let server = connect(&run, typed("svc", QueueType::Quorum))
        .await
        .expect("a quorum run on the single local broker");
    let client = amqp_bus(&run, typed("cli", QueueType::Quorum)).await;
    round_trip(&run, &server, &client).await;

    // Dead-lettering goes through the quorum dead-letter queue.
    let mut headers = Headers::new();
    headers.insert("x-test".into(), "1".into());
    client
        .publish_raw(Service::Controller, b"not json".to_vec(), headers)
        .await
        .expect("raw publish");
    let consumer = counting_server(&server).await.0;
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dead.is_empty() && tokio::time::Instant::now() < deadline {
        dead = server.take_dead_letters(10).await.expect("dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = !dead.is_empty();
    assert!(
        got,
        "the refused message never reached the dead-letter queue"
    );
    assert_eq!(dead[0].payload, b"not json");
    consumer.stop().await;

    // A service configured classic is refused, saying what to do.
    let err = connect(&run, typed("svc2", QueueType::Classic))
        .await
        .err()
        .expect("a classic declare of quorum queues must be refused");
    let shown = err.to_string();
    assert!(
        matches!(
            err,
            BusError::QueueType {
                configured: QueueType::Classic,
                ..
            }
        ),
        "{shown}"
    );
    for want in [
        "bus.queue_type = \"classic\"",
        "EPU_BUS__QUEUE_TYPE",
        "epumgmt killrun",
        "x-queue-type",
        run.exchange().as_str(),
    ] {
        assert!(shown.contains(want), "missing {want:?} in: {shown}");
    }

    // A client without a [bus] section (CLI, agent, killrun) uses the queues as they are.
    let cli = connect(&run, test_options("epumgmt"))
        .await
        .expect("an untyped client accepts quorum queues");
    round_trip(&run, &server, &cli).await;
    cli.delete_topology()
        .await
        .expect("an untyped client can purge");
    cli.close().await;
    client.close().await;
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_run_refuses_a_quorum_service_and_an_untyped_client_keeps_classic() {
    let run = test_run("qc");
    // An untyped client first: it creates the missing queues classic.
    let first = connect(&run, test_options("cli")).await.expect("connect");
    let err = connect(&run, typed("svc", QueueType::Quorum))
        .await
        .err()
        .expect("a quorum declare of classic queues must be refused");
    let shown = err.to_string();
    assert!(
        matches!(
            err,
            BusError::QueueType {
                configured: QueueType::Quorum,
                ..
            }
        ),
        "{shown}"
    );
    assert!(shown.contains("bus.queue_type = \"quorum\""), "{shown}");
    assert!(shown.contains("killrun"), "{shown}");
    assert!(!shown.contains("guest:guest"), "{shown}");

    // Classic, as configured, is the run's type: accepted.
    let svc = connect(&run, typed("svc", QueueType::Classic))
        .await
        .expect("classic matches");
    round_trip(&run, &svc, &first).await;
    svc.delete_topology().await.expect("cleanup");
    svc.close().await;
    first.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_list_skips_a_dead_broker_and_names_every_one_that_failed() {
    let run = test_run("urls");
    // Port 1 on localhost refuses at once.
    let dead = "amqp://guest:deadpw@127.0.0.1:1/%2f";
    let list = format!("{dead}, {}", amqp_url());
    let bus = AmqpBus::connect(&list, run.clone(), test_options("svc"))
        .await
        .expect("the second broker of the list answers");
    let at = bus.connected_broker().expect("connected");
    assert!(at.contains("5672") && !at.contains(":1/"), "{at}");
    assert!(!at.contains("guest:guest"), "password shown: {at}");
    bus.delete_topology().await.expect("cleanup");
    bus.close().await;

    let both_dead = "amqp://u:pw-one@127.0.0.1:1/%2f,amqp://u:pw-two@127.0.0.1:2/%2f";
    let err = AmqpBus::connect(both_dead, run.clone(), test_options("svc"))
        .await
        .err()
        .expect("no broker answers");
    let shown = err.to_string();
    assert!(shown.contains("none of the 2 brokers answered"), "{shown}");
    assert!(shown.contains("amqp://u:***@127.0.0.1:1/%2f"), "{shown}");
    assert!(shown.contains("amqp://u:***@127.0.0.1:2/%2f"), "{shown}");
    assert!(
        !shown.contains("pw-one") && !shown.contains("pw-two"),
        "{shown}"
    );

    let err = AmqpBus::connect(" , ", run, test_options("svc"))
        .await
        .err()
        .expect("no URL");
    assert!(err.to_string().contains("bus.amqp_url is empty"), "{err}");
}
