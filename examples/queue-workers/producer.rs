//! `epu-queue-producer --queue jobs.RUN --count 300 --seconds 1`: fills the
//! queue-workers example's work queue.
//!
//! Declares the queue (durable, on the default exchange) and publishes `count`
//! persistent jobs `{"seconds": N}` with publisher confirms, then exits.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use epu_core::config::redact_url;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Publishes jobs for the example queue workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The work queue (default `jobs.$EPU_RUN`).
    #[arg(long)]
    queue: Option<String>,
    /// How many jobs.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// How long each job takes a worker, in seconds.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// The broker.
    #[arg(
        long,
        env = "EPU_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true
    )]
    url: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let queue = match args.queue {
        Some(q) => q,
        None => format!(
            "jobs.{}",
            std::env::var("EPU_RUN").context("give --queue, or set EPU_RUN")?
        ),
    };
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", redact_url(&args.url)))?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let body = serde_json::to_vec(&serde_json::json!({ "seconds": args.seconds }))?;
    let mut confirms = Vec::new();
    for _ in 0..args.count {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?;
        confirms.push(confirm);
    }
    for c in confirms {
        let confirmation = c.await?;
        if confirmation.is_nack() {
            anyhow::bail!("the broker refused a job");
        }
    }
    let _ = conn.close(200, "done".into()).await;
    println!(
        "published {} jobs of {}s to {queue}",
        args.count, args.seconds
    );
    Ok(())
}
