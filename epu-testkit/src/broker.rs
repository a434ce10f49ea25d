//! Against the test RabbitMQ (`epu_core::testing::amqp_url`): a guard that deletes a
//! test run's topology, and plain work queues. Like every broker test helper, these
//! fail (never skip) when the broker is missing, saying how to start it.

use epu_core::testing::amqp_url;
use epu_core::wire::{RunName, Service};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// Deletes the run's topology and the work queues a test declared when dropped —
/// also when the test panics. Declare it first in a test so it is dropped last.
pub struct Cleanup {
    run: RunName,
    queues: Vec<String>,
}

impl Cleanup {
    pub fn new(run: &RunName) -> Self {
        Cleanup {
            run: run.clone(),
            queues: Vec::new(),
        }
    }

    /// Also delete this work queue.
    pub fn queue(&mut self, name: &str) {
        self.queues.push(name.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let run = self.run.clone();
        let queues = std::mem::take(&mut self.queues);
        // A fresh runtime on its own thread: Drop cannot await, and may run while
        // the test's runtime is panicking. Best effort: every failure is ignored.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                let mut names: Vec<String> = Service::ALL.iter().map(|s| run.queue(*s)).collect();
                names.push(run.dead_queue());
                names.extend(queues);
                for q in names {
                    // A fresh channel each: deleting a missing queue closes the channel.
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(run.exchange().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// A lapin connection to the test broker, or a panic that says how to start it.
pub async fn lapin_conn() -> Connection {
    let url = amqp_url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "this test needs RabbitMQ at {} and could not reach it: {e}\n\
             start it with `rabbitmq-server -detached`; set EPU_AMQP_URL for another broker",
            epu_core::config::redact_url(&url)
        ),
    }
}

/// Declares a durable work queue.
pub async fn declare_queue(conn: &Connection, name: &str) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}
