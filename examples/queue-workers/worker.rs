//! `epu-queue-worker`: the queue-workers example's worker.
//!
//! Takes jobs from a durable RabbitMQ queue on the default exchange, one at a time
//! (prefetch 1), "works" each for its `seconds` (a sleep), acks it, and tells its
//! agent how many jobs it holds through `$EPU_JOBS_FILE` (1 while working, 0 when
//! idle). Run it under the agent: `epu-agent -- epu-queue-worker`.
//!
//! Environment:
//! * `EPU_WORK_QUEUE`: the queue (default `jobs.<EPU_RUN>`, or `jobs` without a run);
//! * `EPU_AMQP_URL` or `EPU_BUS__AMQP_URL`: the broker (default RabbitMQ on localhost);
//! * `EPU_JOBS_FILE`: set by the agent.
//!
//! A job is a persistent JSON message `{"seconds": N}`. A message that is not a job
//! is rejected (not requeued) and logged. On SIGTERM or SIGINT it stops at once: a
//! job in hand is not acked, so the broker gives it to another worker. A lost
//! connection is retried on the project's backoff schedule.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use epu_core::backoff::{Backoff, BackoffState};
use epu_core::config::redact_url;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Deserialize)]
struct Job {
    seconds: f64,
}

fn set_jobs(file: Option<&Path>, n: u32) {
    if let Some(path) = file {
        if let Err(e) = std::fs::write(path, format!("{n}\n")) {
            eprintln!(
                "epu-queue-worker: cannot write the jobs file {}: {e}",
                path.display()
            );
        }
    }
}

async fn work(
    url: &str,
    queue: &str,
    jobs_file: Option<&Path>,
    backoff: &mut BackoffState,
) -> Result<(), lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    backoff.reset();
    eprintln!("epu-queue-worker: consuming {queue} at {}", redact_url(url));
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        match serde_json::from_slice::<Job>(&delivery.data) {
            Ok(job) => {
                set_jobs(jobs_file, 1);
                let secs = if job.seconds.is_finite() {
                    job.seconds.clamp(0.0, 86_400.0)
                } else {
                    0.0
                };
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                delivery.ack(BasicAckOptions::default()).await?;
                set_jobs(jobs_file, 0);
            }
            Err(e) => {
                eprintln!("epu-queue-worker: rejecting a message that is not a job: {e}");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let url = env("EPU_AMQP_URL")
        .or_else(|| env("EPU_BUS__AMQP_URL"))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let queue = env("EPU_WORK_QUEUE").unwrap_or_else(|| match env("EPU_RUN") {
        Some(run) => format!("jobs.{run}"),
        None => "jobs".to_string(),
    });
    let jobs_file = env("EPU_JOBS_FILE").map(PathBuf::from);
    set_jobs(jobs_file.as_deref(), 0);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).state();
    let stop = epu_core::service::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            result = work(&url, &queue, jobs_file.as_deref(), &mut backoff) => {
                match result {
                    Ok(()) => eprintln!("epu-queue-worker: the consumer was cancelled; reconnecting"),
                    Err(e) => eprintln!("epu-queue-worker: {e}; reconnecting"),
                }
                tokio::select! {
                    _ = &mut stop => break,
                    _ = backoff.wait() => {}
                }
            }
        }
    }
    eprintln!("epu-queue-worker: stopping");
}
