//! Services resume by themselves after the broker drops them, and nothing
//! confirmed is lost. Uses `rabbitmqctl` on the local broker, so it lives in its
//! own test binary and its cases run one after the other.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epu_core::bus::{Bus, FnHandler, Incoming};
use epu_core::testing::{amqp_bus, test_options, test_run, wait_until};
use epu_core::wire::{Envelope, Op, Service};
use serde_json::json;
use uuid::Uuid;

const MESSAGES: usize = 1000;

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test drives the local broker with rabbitmqctl and could not run it: {e}; \
             install rabbitmq-server (bash .ci/run does)"
            )
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn await_broker() {
    for _ in 0..120 {
        let ok = Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("broker did not come back within a minute");
}

/// Publishes 1,000 confirmed messages while `outage` runs, and checks every one arrives.
async fn survives(name: &str, outage: impl std::future::Future<Output = ()>) {
    let run = test_run(name);
    let server = amqp_bus(&run, test_options("svc")).await;
    let client = amqp_bus(&run, test_options("cli")).await;
    let seen: Arc<Mutex<HashSet<Uuid>>> = Arc::new(Mutex::new(HashSet::new()));
    let deliveries = Arc::new(Mutex::new(0usize));
    let (s, d) = (seen.clone(), deliveries.clone());
    let handler = Arc::new(FnHandler(move |m: Incoming| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            *d.lock().expect("lock") += 1;
            s.lock().expect("lock").insert(m.envelope.msg_id);
            Ok(json!(null))
        }
    }));
    let consumer = server
        .serve(Service::Controller, handler)
        .await
        .expect("serve");

    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0usize);
    let publisher = {
        let client = client.clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(MESSAGES);
            for i in 0..MESSAGES {
                let env = Envelope::new(&run, Op::InstanceInfo, "cli", json!({"i": i}));
                client
                    .send(Service::Controller, &env)
                    .await
                    .expect("confirmed publish");
                ids.push(env.msg_id);
                let _ = progress_tx.send(i + 1);
                // Spread the publishing so the outage falls in the middle of it.
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ids
        })
    };
    // Break the broker a third of the way through.
    progress_rx
        .wait_for(|n| *n >= MESSAGES / 3)
        .await
        .expect("publisher alive");
    outage.await;
    let ids = tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publisher finished in time")
        .expect("publisher task");
    assert_eq!(ids.len(), MESSAGES);
    let all_seen = wait_until(Duration::from_secs(60), || {
        let s = seen.lock().expect("lock");
        ids.iter().all(|id| s.contains(id))
    })
    .await;
    let distinct = seen.lock().expect("lock").len();
    let total = *deliveries.lock().expect("lock");
    assert!(
        all_seen,
        "only {distinct} of {MESSAGES} confirmed messages arrived"
    );
    println!("{name}: {MESSAGES} confirmed, {distinct} distinct consumed, {total} deliveries (duplicates {})", total - distinct);
    consumer.stop().await;
    server.delete_topology().await.expect("cleanup");
    server.close().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_connections_are_closed_and_after_a_broker_restart() {
    await_broker().await;
    survives("closeall", async {
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["close_all_connections", "epu reconnect test"])
        })
        .await
        .expect("rabbitmqctl");
    })
    .await;
    survives("restart", async {
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["stop_app"]);
            std::thread::sleep(Duration::from_secs(2));
            rabbitmqctl(&["start_app"]);
        })
        .await
        .expect("rabbitmqctl");
        await_broker().await;
    })
    .await;
}
