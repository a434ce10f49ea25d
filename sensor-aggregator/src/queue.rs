//! Queue depth: a passive `queue.declare` per watched queue, against whatever
//! broker the domain names (not only the run's own).
//!
//! **This module and `epu_core::bus::amqp` are the only code that knows lapin**
//! (besides the example queue workers): the bus carries epu's own messages; this
//! measures *somebody else's* queue, on a broker the bus may not even use.
//!
//! One connection per broker URL, shared by the queues on it; one dedicated channel
//! per queue, because a passive declare of a missing queue makes the broker close
//! the channel (404). A closed channel is reopened at the next measurement; a dead
//! connection is remade, the first attempt at once and then on the project's backoff
//! schedule. A passive declare counts *ready* messages only: jobs workers hold
//! (unacked) come from their heartbeats (see the crate docs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epu_core::backoff::{Backoff, BackoffState};
use epu_core::config::redact_url;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// How long one connect or declare may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub use epu_model::messages::QueueStatus;

struct BrokerConn {
    conn: Option<Arc<Connection>>,
    backoff: BackoffState,
    next_try: Instant,
}

/// The connections to the brokers the domains name, one per URL.
#[derive(Default)]
pub struct Brokers {
    conns: tokio::sync::Mutex<HashMap<String, BrokerConn>>,
}

impl Brokers {
    pub fn new() -> Self {
        Brokers::default()
    }

    async fn connection(&self, url: &str) -> Result<Arc<Connection>, String> {
        let mut conns = self.conns.lock().await;
        let slot = conns.entry(url.to_string()).or_insert_with(|| BrokerConn {
            conn: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)).state(),
            next_try: Instant::now(),
        });
        if let Some(c) = &slot.conn {
            if c.status().connected() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if Instant::now() < slot.next_try {
            return Err("broker unreachable; waiting before the next try".into());
        }
        let props = ConnectionProperties::default()
            .with_connection_name("epu sensor-aggregator queue probe".into());
        let result = tokio::time::timeout(CALL_TIMEOUT, Connection::connect(url, props)).await;
        match result {
            Ok(Ok(c)) => {
                slot.backoff.reset();
                let c = Arc::new(c);
                slot.conn = Some(c.clone());
                tracing::info!(event = "queue_probe_connected", broker = %redact_url(url), "connected to the broker for queue depths");
                Ok(c)
            }
            Ok(Err(e)) => {
                slot.next_try = Instant::now() + slot.backoff.next_delay();
                Err(format!("cannot connect to {}: {e}", redact_url(url)))
            }
            Err(_) => {
                slot.next_try = Instant::now() + slot.backoff.next_delay();
                Err(format!("connecting to {} timed out", redact_url(url)))
            }
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        let mut conns = self.conns.lock().await;
        for (_, slot) in conns.drain() {
            if let Some(c) = slot.conn {
                let _ = c.close(200, "stopping".into()).await;
            }
        }
    }
}

/// Measures one queue on one broker.
pub struct QueueProbe {
    url: String,
    queue: String,
    channel: Option<Channel>,
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404)
}

impl QueueProbe {
    pub fn new(url: &str, queue: &str) -> Self {
        QueueProbe {
            url: url.to_string(),
            queue: queue.to_string(),
            channel: None,
        }
    }

    /// One passive declare.
    pub async fn measure(&mut self, brokers: &Brokers) -> QueueStatus {
        let conn = match brokers.connection(&self.url).await {
            Ok(c) => c,
            Err(error) => {
                self.channel = None;
                return QueueStatus::Unreachable { error };
            }
        };
        if !self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            self.channel = None;
            match tokio::time::timeout(CALL_TIMEOUT, conn.create_channel()).await {
                Ok(Ok(ch)) => self.channel = Some(ch),
                Ok(Err(e)) => {
                    return QueueStatus::Unreachable {
                        error: format!("cannot open a channel: {e}"),
                    }
                }
                Err(_) => {
                    return QueueStatus::Unreachable {
                        error: "opening a channel timed out".into(),
                    }
                }
            }
        }
        let Some(ch) = &self.channel else {
            return QueueStatus::Unreachable {
                error: "no channel".into(),
            };
        };
        let declared = tokio::time::timeout(
            CALL_TIMEOUT,
            ch.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Ok(Ok(q)) => QueueStatus::Ok {
                ready: u64::from(q.message_count()),
            },
            Ok(Err(e)) if is_not_found(&e) => {
                // The broker closed this channel; the next measurement opens another.
                self.channel = None;
                QueueStatus::Missing
            }
            Ok(Err(e)) => {
                self.channel = None;
                QueueStatus::Unreachable {
                    error: format!("passive declare failed: {e}"),
                }
            }
            Err(_) => {
                self.channel = None;
                QueueStatus::Unreachable {
                    error: "passive declare timed out".into(),
                }
            }
        }
    }

    /// Closes the probe's channel.
    pub async fn close(&mut self) {
        if let Some(ch) = self.channel.take() {
            if ch.status().connected() {
                let _ = ch.close(200, "stopping".into()).await;
            }
        }
    }
}
