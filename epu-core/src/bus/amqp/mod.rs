//! The AMQP transport (RabbitMQ through `lapin`). The only module that knows lapin.
//!
//! Topology, declared on every (re)connect so a reset broker gets it back:
//! a durable topic exchange `epu.<run>`; durable queues `epu.<run>.<service>` bound
//! with `<service>.#`; a durable `epu.<run>.dead`; and per bus an exclusive reply
//! queue `epu.<run>.reply.<uuid>`. Messages go out with routing key `<service>.<op>`.
//! The durable queues are classic or quorum ([`BusOptions::queue_type`]: services
//! declare them as `bus.queue_type` says and refuse a run whose queues are of the
//! other type; clients without a `[bus]` section use them as they are); the reply
//! queue is always classic (a quorum queue cannot be exclusive).
//!
//! Brokers: the URL given may list several (the nodes of one cluster, see
//! [`crate::config::split_amqp_urls`]). A connect tries them in order, each once;
//! a reconnect starts with the one after the node it lost, so a stopped node is
//! tried last ([`connect_order`]).
//!
//! Reconnecting: one connection per bus, shared by its publisher and consumers.
//! Whoever finds it dead makes a new one (under a lock, so only one), with the
//! project's [`Backoff`]; consumers re-create their channel and consume again, and
//! `send` retries a confirmed publish until the broker confirms it or
//! `publish_timeout` passes. Each attempt is bounded (10 s), and a nacked publish is
//! retried on a fresh channel: after a quorum queue lost its leader, RabbitMQ 3.10
//! was seen nacking every later publish on the channel for minutes. A message whose
//! confirm was lost in an outage, or that was nacked, may be delivered twice:
//! receivers deduplicate by `msg_id`. We run our own reconnect
//! loop rather than lapin's `enable_auto_recover`, whose TCP retries stop after a
//! fixed count: a service must come back after an outage of any length, and one
//! explicit path is easier to reason about than replayed topology plus ours.

mod connection;
mod publish;
mod reply;
mod serve;
mod topology;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

pub use self::connection::connect_order;
use self::connection::{close_connection, connect_err};
use self::publish::{field_table, headers_of, message_props};
use super::{parse_reply, Bus, BusError, BusOptions, DeadLetter, Dispatcher, Handler, Server};
use crate::backoff::Backoff;
use crate::wire::{
    Envelope, ErrorCode, Headers, ReplyError, RunName, Service, REJECT_QUEUE_HEADER,
    REJECT_REASON_HEADER,
};

/// The current connection and its publishing channel (confirm mode).
#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    publish: Channel,
    generation: u64,
}

struct Inner {
    /// The brokers to try, in order (at least one).
    urls: Vec<String>,
    /// The index in `urls` of the last broker connected to.
    current_url: Mutex<Option<usize>>,
    run: RunName,
    opts: BusOptions,
    link: tokio::sync::Mutex<Option<Link>>,
    generation: AtomicU64,
    reply_queue: String,
    pending: Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>,
    reply_consumer: tokio::sync::Mutex<Option<Server>>,
    reconnect: Backoff,
}

/// The RabbitMQ bus. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AmqpBus {
    inner: Arc<Inner>,
}

fn redacted(url: &str) -> String {
    crate::config::redact_url(url)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AmqpBus {
    /// Connects (once, failing fast: callers at startup want a clear error) and
    /// declares the run's topology. `url` is one broker URL or several separated by
    /// commas (see [`crate::config::split_amqp_urls`]); they are tried in order.
    pub async fn connect(url: &str, run: RunName, opts: BusOptions) -> Result<Self, BusError> {
        let urls = crate::config::split_amqp_urls(url);
        if urls.is_empty() {
            return Err(BusError::Connect(
                "no broker URL given (bus.amqp_url is empty)".to_string(),
            ));
        }
        let reply_queue = format!("{}.reply.{}", run.exchange(), Uuid::new_v4().simple());
        let bus = AmqpBus {
            inner: Arc::new(Inner {
                urls,
                current_url: Mutex::new(None),
                run,
                opts,
                link: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                reply_queue,
                pending: Mutex::new(HashMap::new()),
                reply_consumer: tokio::sync::Mutex::new(None),
                reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            }),
        };
        bus.link().await?;
        Ok(bus)
    }

    pub fn options(&self) -> &BusOptions {
        &self.inner.opts
    }

    /// The broker this bus is connected to, or was last (password redacted); `None`
    /// before the first connect.
    pub fn connected_broker(&self) -> Option<String> {
        let i = (*lock(&self.inner.current_url))?;
        self.inner.urls.get(i).map(|u| redacted(u))
    }

    /// Closes the connection; consumers stop reconnecting once their servers stop.
    ///
    /// Bounded: each step gets [`CLOSE_STEP_TIMEOUT`] and is abandoned after it. The
    /// AMQP close handshake (`Connection.Close` → `Close-Ok`) is a promise inside
    /// lapin that can stay pending after the socket is already gone, and a caller
    /// that is done (a CLI that printed its answer, a service that is stopping) must
    /// not wait on it: the broker drops an abandoned connection's exclusive queues
    /// when the TCP connection ends.
    pub async fn close(&self) {
        let server = match tokio::time::timeout(
            CLOSE_STEP_TIMEOUT,
            self.inner.reply_consumer.lock(),
        )
        .await
        {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(server) = server {
            server.stop_within(CLOSE_STEP_TIMEOUT).await;
        }
        let link = match tokio::time::timeout(CLOSE_STEP_TIMEOUT, self.inner.link.lock()).await {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(link) = link {
            close_connection(&link.conn, "bye").await;
        }
    }
}

/// How long one step of [`AmqpBus::close`] may take before it is abandoned.
pub const CLOSE_STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a connection (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
#[async_trait]
impl Bus for AmqpBus {
    fn run(&self) -> &RunName {
        &self.inner.run
    }

    async fn send(&self, to: Service, envelope: &Envelope) -> Result<(), BusError> {
        let payload = envelope.to_bytes()?;
        let headers = self.inner.opts.headers_for(envelope.op, &payload);
        let rk = Self::routing_key(to, envelope.op.as_str());
        let exchange = self.inner.run.exchange();
        self.inner
            .opts
            .metrics
            .published
            .with_label_values(&[envelope.op.as_str()])
            .inc();
        if envelope.op.is_transient() {
            // Only the latest heartbeat counts: no persistence, no confirm, no retry.
            let props = message_props(envelope, false, &headers);
            self.publish_once(&exchange, &rk, &payload, props, false)
                .await
        } else {
            let props = message_props(envelope, true, &headers);
            self.publish_confirmed(&exchange, &rk, &payload, props)
                .await
        }
    }

    async fn request(
        &self,
        to: Service,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Value, ReplyError> {
        self.ensure_reply_consumer().await?;
        let payload = envelope
            .to_bytes()
            .map_err(|e| ReplyError::new(ErrorCode::BadRequest, e.to_string()))?;
        let headers = self.inner.opts.headers_for(envelope.op, &payload);
        let corr = Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(corr.clone(), tx);
        let props = message_props(envelope, false, &headers)
            .with_reply_to(self.inner.reply_queue.as_str().into())
            .with_correlation_id(corr.as_str().into());
        let rk = Self::routing_key(to, envelope.op.as_str());
        let exchange = self.inner.run.exchange();
        let sent = tokio::time::timeout(
            timeout,
            self.publish_confirmed(&exchange, &rk, &payload, props),
        )
        .await;
        let result = match sent {
            Ok(Ok(())) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(bytes)) => parse_reply(&self.inner.run, &bytes),
                Ok(Err(_)) => Err(BusError::Closed.into()),
                Err(_) => Err(BusError::Timeout {
                    what: format!("{} request to {to}", envelope.op),
                    after: timeout,
                }
                .into()),
            },
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(BusError::Timeout {
                what: format!("{} request to {to}", envelope.op),
                after: timeout,
            }
            .into()),
        };
        lock(&self.inner.pending).remove(&corr);
        result
    }

    async fn publish_raw(
        &self,
        to: Service,
        payload: Vec<u8>,
        headers: Headers,
    ) -> Result<(), BusError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(field_table(&headers));
        let rk = Self::routing_key(to, "raw");
        self.publish_confirmed(&self.inner.run.exchange(), &rk, &payload, props)
            .await
    }

    async fn serve(&self, service: Service, handler: Arc<dyn Handler>) -> Result<Server, BusError> {
        self.link().await?;
        let dispatcher = Dispatcher {
            run: self.inner.run.clone(),
            service,
            opts: self.inner.opts.clone(),
            handler,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let bus = self.clone();
        let task = tokio::spawn(async move { bus.serve_loop(dispatcher, stop_rx).await });
        Ok(Server::new(stop_tx, task))
    }

    async fn take_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BusError> {
        let link = self.link().await?;
        let ch = link.conn.create_channel().await.map_err(connect_err)?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = ch
                .basic_get(
                    self.inner.run.dead_queue().into(),
                    BasicGetOptions::default(),
                )
                .await
                .map_err(connect_err)?;
            let Some(msg) = got else { break };
            let h = headers_of(&msg.delivery.properties);
            out.push(DeadLetter {
                reason: h.get(REJECT_REASON_HEADER).cloned().unwrap_or_default(),
                queue: h.get(REJECT_QUEUE_HEADER).cloned().unwrap_or_default(),
                payload: msg.delivery.data.clone(),
            });
            msg.delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(connect_err)?;
        }
        let _ = tokio::time::timeout(CLOSE_STEP_TIMEOUT, ch.close(200, "done".into())).await;
        Ok(out)
    }
}
