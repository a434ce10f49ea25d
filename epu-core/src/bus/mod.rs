//! The bus: one trait, two transports.
//!
//! * [`amqp::AmqpBus`] — RabbitMQ through `lapin`, for real deployments. Only that
//!   module knows lapin.
//! * [`local::LocalBus`] — in-process routing for the standalone mode and fast tests,
//!   plus [`socket`]: a Unix socket through which another process (the CLI) sends
//!   requests into a `LocalBus` and gets replies.
//!
//! Both hand every delivery to [`Dispatcher::process`], the one place where a
//! message is decoded ([`crate::wire::decode`]), dead-lettered when refused,
//! handed to the service's [`Handler`], and answered.

pub mod amqp;
pub mod local;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire::{
    decode, sign, Destination, Envelope, ErrorCode, Headers, Op, RejectReason, ReplyBody,
    ReplyError, RunName, Service, WireError, REJECT_QUEUE_HEADER, REJECT_REASON_HEADER,
    SIGNATURE_HEADER,
};

/// A delivered, validated message as a service's handler sees it.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub envelope: Envelope,
    /// The transport delivered it before (a crash or reconnect came between).
    pub redelivered: bool,
    /// The sender waits for a reply.
    pub wants_reply: bool,
}

/// A service's message handler. Returning (`Ok` or `Err`) means "handled": the
/// message is acknowledged after the reply is sent. A handler that must not lose
/// a message on a crash does its durable work before it returns.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError>;
}

/// A refused message, as it sits in `epu.<run>.dead`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The `x-epu-reject-reason` header.
    pub reason: String,
    /// The queue it was refused on.
    pub queue: String,
    /// The original bytes, untouched.
    pub payload: Vec<u8>,
}

/// Transport failures (not service answers: those are [`ReplyError`]).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot reach the broker: {0}; is RabbitMQ running and is bus.amqp_url right?")]
    Connect(String),
    #[error("broker refused or lost a message: {0}")]
    Publish(String),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the service {0} is already being served on this bus")]
    AlreadyServed(Service),
    #[error("this bus cannot {0}")]
    Unsupported(&'static str),
    #[error("bus i/o error: {0}")]
    Io(String),
    #[error("bus is shut down")]
    Closed,
    /// The run's queue exists with another type than this bus declares it with.
    #[error(
        "the run's queue {queue} already exists as another queue type than bus.queue_type = \"{configured}\" \
         (the broker said: {detail}); a queue keeps the type it was created with. Either set \
         bus.queue_type (EPU_BUS__QUEUE_TYPE) back to the type the run was created with, or stop \
         the run and delete its queues (`epumgmt killrun <run>` does both; messages still queued \
         are lost) and start it again with the new type"
    )]
    QueueType {
        /// The queue the broker refused to redeclare.
        queue: String,
        /// The type this bus asked for.
        configured: crate::config::QueueType,
        /// The broker's own words (`PRECONDITION_FAILED - inequivalent arg 'x-queue-type' …`).
        detail: String,
    },
}

impl From<BusError> for ReplyError {
    fn from(e: BusError) -> Self {
        let code = match e {
            BusError::Timeout { .. } => ErrorCode::Timeout,
            _ => ErrorCode::Unavailable,
        };
        ReplyError::new(code, e.to_string())
    }
}

/// The operations every transport offers.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    fn run(&self) -> &RunName;

    /// One-way message to a service's queue. Control operations are signed; all but
    /// transient ones (heartbeats) are persistent and wait for the broker's confirm.
    async fn send(&self, to: Service, envelope: &Envelope) -> Result<(), BusError>;

    /// Request/reply with a caller-side timeout. A service's typed error arrives as
    /// `Err(ReplyError)`; a timeout or transport failure as code `timeout`/`unavailable`.
    async fn request(
        &self,
        to: Service,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Value, ReplyError>;

    /// Raw bytes and headers to a service's queue, no checks: for other programs
    /// speaking the protocol and for tests of what services refuse.
    async fn publish_raw(
        &self,
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
    ) -> Result<(), BusError>;

    /// Consume a service's queue with `handler` until the returned [`Server`] stops.
    async fn serve(&self, service: Service, handler: Arc<dyn Handler>) -> Result<Server, BusError>;

    /// Removes and returns up to `max` messages from the dead-letter queue.
    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BusError>;
}

/// Settings common to both transports.
#[derive(Clone)]
pub struct BusOptions {
    /// This process's name in `sender`.
    pub sender: String,
    /// Shared secret for signing and checking control operations.
    pub secret: Option<Arc<[u8]>>,
    /// Unacked deliveries a consumer may hold (AMQP prefetch).
    pub prefetch: u16,
    /// How long `send` keeps trying (across reconnects) before it gives up.
    pub publish_timeout: Duration,
    /// The type the AMQP bus declares the run's durable queues with (the service
    /// queues and the dead-letter queue; the reply queue is always classic, exclusive).
    /// `Some`: declared as that type, and a run whose queues are of another type is
    /// refused at connect ([`BusError::QueueType`]). `None` (the default, for clients
    /// that carry no `[bus]` section: the CLI, agents, `killrun`): the queues are used
    /// as they are, whatever their type, and the missing ones created classic. The
    /// services set it from `bus.queue_type` ([`crate::service::bus_options`]).
    pub queue_type: Option<crate::config::QueueType>,
    pub metrics: BusMetrics,
}

impl std::fmt::Debug for BusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusOptions")
            .field("sender", &self.sender)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("prefetch", &self.prefetch)
            .field("publish_timeout", &self.publish_timeout)
            .field("queue_type", &self.queue_type)
            .finish()
    }
}

impl BusOptions {
    pub fn new(sender: &str) -> Self {
        BusOptions {
            sender: sender.to_string(),
            secret: None,
            prefetch: 64,
            publish_timeout: Duration::from_secs(30),
            queue_type: None,
            metrics: BusMetrics::unregistered(),
        }
    }

    /// Declares the run's durable queues as `queue_type` (see [`BusOptions::queue_type`]).
    pub fn with_queue_type(mut self, queue_type: crate::config::QueueType) -> Self {
        self.queue_type = Some(queue_type);
        self
    }

    pub fn with_secret(mut self, secret: &[u8]) -> Self {
        self.secret = Some(Arc::from(secret));
        self
    }

    pub fn with_metrics(mut self, metrics: BusMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Headers for an outgoing envelope: the signature when the op is control.
    pub(crate) fn headers_for(&self, op: Op, payload: &[u8]) -> Headers {
        let mut h = Headers::new();
        if op.is_control() {
            if let Some(secret) = &self.secret {
                h.insert(SIGNATURE_HEADER.to_string(), sign(secret, payload));
            }
        }
        h
    }
}

/// Counters every bus keeps.
#[derive(Clone)]
pub struct BusMetrics {
    pub received: IntCounterVec,
    pub rejected: IntCounterVec,
    pub published: IntCounterVec,
    pub reconnects: prometheus::IntCounter,
}

impl BusMetrics {
    fn build() -> Result<Self, prometheus::Error> {
        Ok(BusMetrics {
            received: IntCounterVec::new(
                Opts::new(
                    "epu_bus_received_total",
                    "messages handled, by queue and op",
                ),
                &["service", "op"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "epu_bus_rejected_total",
                    "messages refused and dead-lettered, by reason",
                ),
                &["service", "reason"],
            )?,
            published: IntCounterVec::new(
                Opts::new("epu_bus_published_total", "messages published, by op"),
                &["op"],
            )?,
            reconnects: prometheus::IntCounter::new(
                "epu_bus_reconnects_total",
                "connections to the broker made after the first",
            )?,
        })
    }

    /// Metrics not registered anywhere (tests, or when the caller does not export).
    pub fn unregistered() -> Self {
        // The metric names are static and valid, so building cannot fail; fall back
        // to a panic-free path regardless.
        match Self::build() {
            Ok(m) => m,
            Err(e) => unreachable_metrics(e),
        }
    }

    /// Metrics registered in `registry` (once per registry).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        Ok(m)
    }
}

#[cold]
fn unreachable_metrics(e: prometheus::Error) -> BusMetrics {
    // Only reachable if the static metric definitions above are edited into
    // something invalid; that is a programming error caught by every test.
    panic!("static bus metric definitions are invalid: {e}")
}

/// How long [`Server::stop`] waits for the message being handled to finish.
pub const SERVER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running consumer of one service queue.
pub struct Server {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    pub(crate) fn new(stop: watch::Sender<bool>, task: JoinHandle<()>) -> Self {
        Server { stop, task }
    }

    /// Stops consuming. A message being handled finishes first; unacked ones go
    /// back to the queue.
    pub async fn stop(self) {
        self.stop_within(SERVER_STOP_TIMEOUT).await;
    }

    /// Like [`stop`](Self::stop), but gives up waiting after `limit` and aborts the
    /// task (a handler stuck on IO, a channel close the broker never confirms).
    /// Returns whether the task finished on its own.
    pub async fn stop_within(self, limit: std::time::Duration) -> bool {
        let _ = self.stop.send(true);
        let mut task = self.task;
        match tokio::time::timeout(limit, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    event = "server_stop_abandoned",
                    "a consumer did not stop within {limit:?}; aborting it"
                );
                task.abort();
                false
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// What to do with a delivery after [`Dispatcher::process`].
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The reply to send when the sender asked for one.
    pub reply: Option<Vec<u8>>,
    /// Set when refused: to be put in the dead-letter queue.
    pub dead: Option<DeadLetter>,
}

/// Decode → dead-letter or handle → reply. Shared by all transports.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub run: RunName,
    pub service: Service,
    pub opts: BusOptions,
    pub handler: Arc<dyn Handler>,
}

impl Dispatcher {
    pub async fn process(
        &self,
        payload: &[u8],
        headers: &Headers,
        wants_reply: bool,
        redelivered: bool,
    ) -> Outcome {
        let dest = Destination {
            run: &self.run,
            service: Some(self.service),
            secret: self.opts.secret.as_deref(),
        };
        match decode(payload, headers, dest) {
            Err(reason) => {
                let reply = if wants_reply {
                    let code = match reason {
                        RejectReason::UnknownOp(_) | RejectReason::WrongService { .. } => {
                            ErrorCode::UnknownOp
                        }
                        RejectReason::MissingSignature
                        | RejectReason::BadSignature
                        | RejectReason::NoSecretConfigured => ErrorCode::Unauthenticated,
                        _ => ErrorCode::BadRequest,
                    };
                    self.reply_bytes(Err(ReplyError::new(code, reason.to_string())))
                } else {
                    None
                };
                Outcome {
                    reply,
                    dead: Some(self.refuse(payload, reason)),
                }
            }
            Ok(envelope) => {
                let op = envelope.op;
                self.opts
                    .metrics
                    .received
                    .with_label_values(&[self.service.as_str(), op.as_str()])
                    .inc();
                let result = self
                    .handler
                    .handle(Incoming {
                        envelope,
                        redelivered,
                        wants_reply,
                    })
                    .await;
                let mut dead = None;
                if let Err(e) = &result {
                    tracing::debug!(service = %self.service, %op, error = %e, "handler answered with an error");
                    if e.malformed {
                        dead = Some(self.refuse(payload, RejectReason::BadBody(e.message.clone())));
                    }
                }
                let reply = if wants_reply {
                    self.reply_bytes(result)
                } else {
                    None
                };
                Outcome { reply, dead }
            }
        }
    }

    /// Counts and logs a refusal; the dead letter to store.
    fn refuse(&self, payload: &[u8], reason: RejectReason) -> DeadLetter {
        self.opts
            .metrics
            .rejected
            .with_label_values(&[self.service.as_str(), reason.label()])
            .inc();
        tracing::warn!(
            event = "message_rejected",
            service = %self.service,
            reason = %reason,
            bytes = payload.len(),
            "refused a message; it goes to the dead-letter queue"
        );
        DeadLetter {
            reason: reason.to_string(),
            queue: self.run.queue(self.service),
            payload: payload.to_vec(),
        }
    }

    fn reply_bytes(&self, result: Result<Value, ReplyError>) -> Option<Vec<u8>> {
        reply_envelope(&self.run, &self.opts.sender, result)
    }
}

/// Encodes a reply envelope.
pub(crate) fn reply_envelope(
    run: &RunName,
    sender: &str,
    result: Result<Value, ReplyError>,
) -> Option<Vec<u8>> {
    let body = ReplyBody::from_result(result);
    let env = Envelope::with_body(run, Op::Reply, sender, &body).ok()?;
    env.to_bytes().ok()
}

/// Decodes a reply envelope a caller received.
pub(crate) fn parse_reply(run: &RunName, payload: &[u8]) -> Result<Value, ReplyError> {
    let dest = Destination {
        run,
        service: None,
        secret: None,
    };
    let env = decode(payload, &Headers::new(), dest)
        .map_err(|r| ReplyError::internal(format!("unreadable reply: {r}")))?;
    let body: ReplyBody = serde_json::from_value(env.body)
        .map_err(|e| ReplyError::internal(format!("unreadable reply body: {e}")))?;
    body.into_result()
}

/// Headers of a dead letter.
pub(crate) fn dead_letter_headers(dead: &DeadLetter) -> Headers {
    let mut h = Headers::new();
    h.insert(REJECT_REASON_HEADER.to_string(), dead.reason.clone());
    h.insert(REJECT_QUEUE_HEADER.to_string(), dead.queue.clone());
    h
}

/// A handler built from a closure, for tests and small services.
pub struct FnHandler<F>(pub F);

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, ReplyError>> + Send + 'static,
{
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        (self.0)(msg).await
    }
}

#[cfg(test)]
mod server_stop_tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn server(obeys: bool) -> Server {
        let (tx, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            if obeys {
                let _ = rx.changed().await;
            } else {
                // A consumer stuck on a close the broker never confirms.
                std::future::pending::<()>().await;
            }
        });
        Server::new(tx, task)
    }

    #[tokio::test]
    async fn a_consumer_that_stops_is_waited_for() {
        let finished = tokio::time::timeout(
            Duration::from_secs(10),
            server(true).stop_within(Duration::from_secs(5)),
        )
        .await
        .expect("stop_within returns");
        assert!(finished);
    }

    #[tokio::test]
    async fn a_stuck_consumer_is_abandoned_at_the_limit() {
        let t = Instant::now();
        let finished = tokio::time::timeout(
            Duration::from_secs(5),
            server(false).stop_within(Duration::from_millis(200)),
        )
        .await
        .expect("stop_within returns at its limit, not never");
        assert!(!finished);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}
