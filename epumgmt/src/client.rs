//! Reaching a run's services: through the standalone host's socket or RabbitMQ,
//! the same requests either way.
//! `http_status` probes a service's own HTTP endpoints (`/readyz`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::socket::{SocketBus, SOCKET_FILE};
use epu_core::bus::{Bus, BusOptions};
use epu_core::request::{self, Request};
use epu_core::wire::{ErrorCode, ReplyError, RunName};

use crate::plan::PlanTransport;
use crate::rundir::{user_error, RunRecord};

/// Exit code: a service did not answer.
pub const EXIT_UNREACHABLE: i32 = 6;

pub struct Client {
    pub bus: Arc<dyn Bus>,
    amqp: Option<AmqpBus>,
    pub run: RunName,
    pub timeout: Duration,
}

impl Client {
    pub async fn connect(rec: &RunRecord) -> anyhow::Result<Self> {
        let run = RunName::new(&rec.run).map_err(|e| anyhow::anyhow!("{e}"))?;
        let secret = rec.secret()?;
        let opts = BusOptions::new("epumgmt").with_secret(secret.as_bytes());
        let (bus, amqp): (Arc<dyn Bus>, Option<AmqpBus>) = match rec.transport {
            PlanTransport::Standalone => (
                Arc::new(SocketBus::new(
                    &rec.run_dir.join(SOCKET_FILE),
                    run.clone(),
                    opts,
                )),
                None,
            ),
            PlanTransport::Amqp => {
                let url = rec.amqp_url.clone().unwrap_or_default();
                crate::deadline::waiting_for(format!(
                    "a connection to the run's broker at {}",
                    epu_core::config::redact_url(&url)
                ));
                let b = AmqpBus::connect(&url, run.clone(), opts)
                    .await
                    .context("connecting to the run's broker")?;
                (Arc::new(b.clone()), Some(b))
            }
        };
        Ok(Client {
            bus,
            amqp,
            run,
            timeout: Duration::from_secs(10),
        })
    }

    /// A typed request to its service; a service's typed error comes back as
    /// `Err(ReplyError)`, and so does an answer that is not `R::Reply`.
    pub async fn ask<R: Request>(&self, req: &R) -> Result<R::Reply, ReplyError> {
        crate::deadline::waiting_for(format!("the {}'s answer to {}", R::TO, R::OP));
        request::call(self.bus.as_ref(), "epumgmt", req, self.timeout).await
    }

    /// Like [`ask`](Self::ask), but a failure is an error for the operator.
    pub async fn must<R: Request>(&self, req: &R) -> anyhow::Result<R::Reply> {
        let (to, op) = (R::TO, R::OP);
        self.ask(req).await.map_err(|e| match e.code {
            ErrorCode::Timeout | ErrorCode::Unavailable => user_error(
                EXIT_UNREACHABLE,
                format!(
                    "the {to} of run {} did not answer {op}: {} (is the run up? `epumgmt status --run {}`)",
                    self.run, e.message, self.run
                ),
            ),
            _ => anyhow::anyhow!("{to} refused {op}: {}", e.message),
        })
    }

    /// Closes the broker connection (bounded: see `AmqpBus::close`).
    pub async fn close(self) {
        if let Some(a) = self.amqp {
            crate::deadline::waiting_for("the broker connection to close");
            a.close().await;
        }
    }

    /// Sets how long one request waits for its answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// GET `path` on a service's HTTP address; the status code, if it answered.
pub async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: epu\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}
