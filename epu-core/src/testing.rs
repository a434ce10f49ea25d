//! Helpers for tests of every crate that talk to the real broker.
//!
//! Tests never skip when the broker is missing: they fail with a message that says
//! how to start it.

use std::time::Duration;

use crate::bus::amqp::AmqpBus;
use crate::bus::BusOptions;
use crate::wire::RunName;

/// The shared secret test buses sign control operations with.
pub const TEST_SECRET: &[u8] = b"epu-test-secret";

/// The broker tests use: `EPU_AMQP_URL`, or RabbitMQ on localhost.
pub fn amqp_url() -> String {
    std::env::var("EPU_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A fresh run name for one test, so parallel tests never share queues.
pub fn test_run(prefix: &str) -> RunName {
    RunName::random(&format!("t-{prefix}"))
}

/// Options with the test secret and short timeouts.
pub fn test_options(sender: &str) -> BusOptions {
    let mut o = BusOptions::new(sender).with_secret(TEST_SECRET);
    o.publish_timeout = Duration::from_secs(60);
    o
}

/// Connects to the test broker or panics with what to do.
pub async fn amqp_bus(run: &RunName, opts: BusOptions) -> AmqpBus {
    let url = amqp_url();
    match AmqpBus::connect(&url, run.clone(), opts).await {
        Ok(b) => b,
        Err(e) => panic!(
            "this test needs RabbitMQ at {} and could not reach it: {e}\n\
             start it with `rabbitmq-server -detached` (Debian: apt-get install -y rabbitmq-server),\n\
             or run the whole suite with `bash .ci/run`, which does both; set EPU_AMQP_URL for another broker",
            crate::config::redact_url(&url)
        ),
    }
}

/// Polls `check` every 20 ms until it is true or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut check: F) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
