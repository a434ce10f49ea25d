//! Bus throughput over the real broker, next to raw lapin measured in the same run.
//!
//! `cargo bench -p epu-core --bench bus_throughput` (RabbitMQ on 127.0.0.1:5672 or
//! EPU_AMQP_URL). Prints messages/s for confirmed publishes of 1 KB messages (each
//! publish waits for its confirm, as `Bus::send` does) and for consuming them
//! (manual acks, prefetch 64), and the bus/raw ratio.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epu_core::bus::{Bus, FnHandler, Incoming};
use epu_core::testing::{amqp_bus, amqp_url, test_options, test_run};
use epu_core::wire::{Envelope, Op, Service};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

const N: usize = 5_000;
/// Measured rounds of each, interleaved (raw, bus, raw, bus, ...) after a warm-up.
const ROUNDS: usize = 3;

async fn raw_lapin(payload: &[u8], n: usize) -> (f64, f64) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = format!("epu-bench-raw-{}", uuid::Uuid::new_v4().simple());
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let start = Instant::now();
    for _ in 0..n {
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let publish = n as f64 / start.elapsed().as_secs_f64();
    let cch = conn.create_channel().await.expect("channel");
    cch.basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let d = consumer.next().await.expect("stream").expect("delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        got += 1;
    }
    let consume = n as f64 / start.elapsed().as_secs_f64();
    let _ = ch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    (publish, consume)
}

async fn epu_bus(body: &str, n: usize) -> (f64, f64) {
    let run = test_run("bench");
    let bus = amqp_bus(&run, test_options("bench")).await;
    let start = Instant::now();
    for _ in 0..n {
        let env = Envelope::new(&run, Op::InstanceInfo, "bench", json!({ "pad": body }));
        bus.send(Service::Controller, &env).await.expect("send");
    }
    let publish = n as f64 / start.elapsed().as_secs_f64();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let start = Instant::now();
    let server = bus
        .serve(
            Service::Controller,
            Arc::new(FnHandler(move |_m: Incoming| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::Relaxed);
                    Ok(serde_json::Value::Null)
                }
            })),
        )
        .await
        .expect("serve");
    while count.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let consume = n as f64 / start.elapsed().as_secs_f64();
    server.stop().await;
    bus.delete_topology().await.expect("cleanup");
    bus.close().await;
    (publish, consume)
}

#[tokio::main]
async fn main() {
    // The envelope around a 1 KB body is about 1.2 KB; raw lapin sends the same size.
    let body = "x".repeat(1024);
    let sample = Envelope::new(
        &test_run("s"),
        Op::InstanceInfo,
        "bench",
        json!({ "pad": body }),
    );
    let payload = sample.to_bytes().expect("encode");
    // Warm the broker (and its disk) up for both, then interleave measured rounds.
    raw_lapin(&payload, 500).await;
    epu_bus(&body, 500).await;
    let (mut raw_pub, mut raw_con, mut bus_pub, mut bus_con) = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..ROUNDS {
        let (p, c) = raw_lapin(&payload, N).await;
        raw_pub += p / ROUNDS as f64;
        raw_con += c / ROUNDS as f64;
        let (p, c) = epu_bus(&body, N).await;
        bus_pub += p / ROUNDS as f64;
        bus_con += c / ROUNDS as f64;
    }
    println!(
        "bus throughput, {N} messages of {} bytes, confirmed one at a time, mean of {ROUNDS} interleaved rounds",
        payload.len()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>7}",
        "", "raw lapin/s", "epu bus/s", "ratio"
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}",
        "publish with confirm",
        raw_pub,
        bus_pub,
        bus_pub / raw_pub
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}",
        "consume (manual ack)",
        raw_con,
        bus_con,
        bus_con / raw_con
    );
}
