//! The AMQP transport (RabbitMQ through `lapin`). The only module that knows lapin.
//!
//! Topology, declared on every (re)connect so a reset broker gets it back:
//! a durable topic exchange `epu.<run>`; durable queues `epu.<run>.<service>` bound
//! with `<service>.#`; a durable `epu.<run>.dead`; and per bus an exclusive reply
//! queue `epu.<run>.reply.<uuid>`. Messages go out with routing key `<service>.<op>`.
//!
//! Reconnecting: one connection per bus, shared by its publisher and consumers.
//! Whoever finds it dead makes a new one (under a lock, so only one), with the
//! project's [`Backoff`]; consumers re-create their channel and consume again, and
//! `send` retries a confirmed publish until the broker confirms it or
//! `publish_timeout` passes. A message whose confirm was lost in an outage may be
//! delivered twice: receivers deduplicate by `msg_id`. We run our own reconnect
//! loop rather than lapin's `enable_auto_recover`, whose TCP retries stop after a
//! fixed count: a service must come back after an outage of any length, and one
//! explicit path is easier to reason about than replayed topology plus ours.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::{
    dead_letter_headers, parse_reply, Bus, BusError, BusOptions, DeadLetter, Dispatcher, Handler,
    Server,
};
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
    url: String,
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
    /// declares the run's topology.
    pub async fn connect(url: &str, run: RunName, opts: BusOptions) -> Result<Self, BusError> {
        let reply_queue = format!("{}.reply.{}", run.exchange(), Uuid::new_v4().simple());
        let bus = AmqpBus {
            inner: Arc::new(Inner {
                url: url.to_string(),
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

    /// Deletes the run's exchange and queues (test cleanup, `killrun --purge`).
    pub async fn delete_topology(&self) -> Result<(), BusError> {
        let link = self.link().await?;
        let ch = link.conn.create_channel().await.map_err(connect_err)?;
        for svc in Service::ALL {
            let _ = ch
                .queue_delete(self.inner.run.queue(svc).into(), Default::default())
                .await;
        }
        let _ = ch
            .queue_delete(self.inner.run.dead_queue().into(), Default::default())
            .await;
        let _ = ch
            .exchange_delete(self.inner.run.exchange().into(), Default::default())
            .await;
        Ok(())
    }

    /// The live link, reconnecting once if it is dead.
    async fn link(&self) -> Result<Link, BusError> {
        let mut guard = self.inner.link.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.conn.status().connected() && link.publish.status().connected() {
                return Ok(link.clone());
            }
            if link.conn.status().connected() {
                // Only the channel died (a channel-level error): open another.
                let publish = open_publish_channel(&link.conn).await?;
                let fresh = Link {
                    conn: link.conn.clone(),
                    publish,
                    generation: self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1,
                };
                *guard = Some(fresh.clone());
                return Ok(fresh);
            }
            close_connection(&link.conn, "reconnecting").await;
            self.inner.opts.metrics.reconnects.inc();
        }
        let props = ConnectionProperties::default().with_connection_name(
            format!("epu {} {}", self.inner.run, self.inner.opts.sender).into(),
        );
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&self.inner.url, props),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(BusError::Connect(format!(
                    "{} ({e})",
                    redacted(&self.inner.url)
                )))
            }
            Err(_) => {
                return Err(BusError::Connect(format!(
                    "{} did not complete the AMQP handshake within {CONNECT_TIMEOUT:?}",
                    redacted(&self.inner.url)
                )))
            }
        };
        let conn = Arc::new(conn);
        let publish = open_publish_channel(&conn).await?;
        declare_topology(&publish, &self.inner.run, &self.inner.reply_queue).await?;
        let link = Link {
            conn,
            publish,
            generation: self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1,
        };
        tracing::info!(event = "bus_connected", run = %self.inner.run, generation = link.generation, "connected to the broker");
        *guard = Some(link.clone());
        Ok(link)
    }

    /// Retries `link()` with backoff until `deadline`, or until `stop` is set.
    async fn link_until(
        &self,
        deadline: Option<Instant>,
        stop: Option<&watch::Receiver<bool>>,
    ) -> Result<Link, BusError> {
        let mut backoff = self.inner.reconnect.state();
        loop {
            match self.link().await {
                Ok(l) => return Ok(l),
                Err(e) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(e);
                    }
                    if stop.is_some_and(|s| *s.borrow()) {
                        return Err(BusError::Closed);
                    }
                    tracing::warn!(event = "bus_reconnect_wait", error = %e, "broker unreachable; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// One publish on the current link; `confirm` waits for the broker's ack.
    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
        confirm: bool,
    ) -> Result<(), BusError> {
        let link = self.link().await?;
        let result = async {
            let pending = link
                .publish
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    props,
                )
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?;
            if !confirm {
                return Ok(());
            }
            match pending
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?
            {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                Confirmation::Ack(Some(_)) => Err(BusError::Publish(format!(
                    "unroutable: nothing bound to {exchange:?} / {routing_key:?}"
                ))),
                Confirmation::Nack(_) => Err(BusError::Publish("broker nacked the message".into())),
            }
        }
        .await;
        if result.is_err() {
            self.invalidate(link.generation).await;
        }
        result
    }

    /// Drops the link if it is still the one that failed, so the next user reconnects.
    async fn invalidate(&self, generation: u64) {
        let mut guard = self.inner.link.lock().await;
        if guard.as_ref().is_some_and(|l| l.generation == generation)
            && guard
                .as_ref()
                .is_some_and(|l| !l.conn.status().connected() || !l.publish.status().connected())
        {
            if let Some(old) = guard.take() {
                close_connection(&old.conn, "reconnecting").await;
                self.inner.opts.metrics.reconnects.inc();
            }
        }
    }

    /// A confirmed publish, retried across reconnects until `publish_timeout`.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.opts.publish_timeout;
        let mut backoff = self.inner.reconnect.state();
        loop {
            match self
                .publish_once(exchange, routing_key, payload, props.clone(), true)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(BusError::Timeout {
                        what: format!("confirmed publish to {routing_key} (last error: {e})"),
                        after: self.inner.opts.publish_timeout,
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    fn routing_key(service: Service, op: &str) -> String {
        format!("{}.{}", service.as_str(), op)
    }

    async fn ensure_reply_consumer(&self) -> Result<(), BusError> {
        let mut guard = self.inner.reply_consumer.lock().await;
        if guard.as_ref().is_some_and(|s| !s.is_finished()) {
            return Ok(());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let bus = self.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(async move { bus.reply_loop(stop_rx, ready_tx).await });
        *guard = Some(Server::new(stop_tx, task));
        drop(guard);
        // Wait until the first consume is in place (or give up quietly: requests time out).
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        Ok(())
    }

    async fn reply_loop(self, mut stop: watch::Receiver<bool>, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut backoff = self.inner.reconnect.state();
        while !*stop.borrow() {
            let Ok(link) = self.link_until(None, Some(&stop)).await else {
                break;
            };
            let consumer = async {
                let ch = link.conn.create_channel().await?;
                // The reply queue is exclusive to this connection; (re)declare it here too.
                ch.queue_declare(
                    self.inner.reply_queue.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
                ch.basic_consume(
                    self.inner.reply_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            }
            .await;
            let mut consumer = match consumer {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "reply consumer could not start; retrying");
                    self.invalidate(link.generation).await;
                    backoff.wait().await;
                    continue;
                }
            };
            backoff.reset();
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    d = consumer.next() => match d {
                        Some(Ok(delivery)) => {
                            let corr = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_string());
                            if let Some(corr) = corr {
                                if let Some(tx) = lock(&self.inner.pending).remove(&corr) {
                                    let _ = tx.send(delivery.data);
                                }
                            }
                        }
                        _ => break,
                    }
                }
            }
            self.invalidate(link.generation).await;
        }
    }

    async fn serve_loop(self, dispatcher: Dispatcher, mut stop: watch::Receiver<bool>) {
        let queue = self.inner.run.queue(dispatcher.service);
        let mut backoff = self.inner.reconnect.state();
        while !*stop.borrow() {
            let Ok(link) = self.link_until(None, Some(&stop)).await else {
                break;
            };
            let started = async {
                let ch = link.conn.create_channel().await?;
                ch.basic_qos(self.inner.opts.prefetch, BasicQosOptions::default())
                    .await?;
                let consumer = ch
                    .basic_consume(
                        queue.as_str().into(),
                        format!("{}-{}", dispatcher.service, Uuid::new_v4().simple()).into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((ch, consumer))
            }
            .await;
            let (ch, mut consumer) = match started {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(event = "bus_consume_retry", queue = %queue, error = %e, "cannot consume; retrying");
                    self.invalidate(link.generation).await;
                    backoff.wait().await;
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(event = "bus_consuming", queue = %queue, "consuming");
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = stop.changed() => {
                        let _ = tokio::time::timeout(CLOSE_STEP_TIMEOUT, ch.close(200, "stopping".into())).await;
                        return;
                    }
                    d = consumer.next() => d,
                };
                let delivery = match delivery {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(event = "bus_consumer_lost", queue = %queue, error = %e, "consumer lost; reconnecting");
                        break;
                    }
                    None => break,
                };
                let headers = headers_of(&delivery.properties);
                let reply_to = delivery
                    .properties
                    .reply_to()
                    .as_ref()
                    .map(|s| s.as_str().to_string());
                let corr = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string());
                let out = dispatcher
                    .process(
                        &delivery.data,
                        &headers,
                        reply_to.is_some(),
                        delivery.redelivered,
                    )
                    .await;
                if let Some(dead) = &out.dead {
                    let props = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(field_table(&dead_letter_headers(dead)));
                    if let Err(e) = self
                        .publish_confirmed("", &self.inner.run.dead_queue(), &dead.payload, props)
                        .await
                    {
                        // Never lose it: put it back and try again later.
                        tracing::error!(error = %e, "cannot dead-letter a refused message; requeueing it");
                        let _ = delivery
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await;
                        continue;
                    }
                }
                if let (Some(reply_to), Some(bytes)) = (reply_to, out.reply) {
                    let mut props = BasicProperties::default().with_delivery_mode(1);
                    if let Some(c) = corr {
                        props = props.with_correlation_id(c.into());
                    }
                    // A caller that has gone away has no queue: the reply is dropped.
                    let _ = self.publish_once("", &reply_to, &bytes, props, false).await;
                }
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                    break;
                }
            }
            self.invalidate(link.generation).await;
        }
    }
}

/// How long one step of [`AmqpBus::close`] may take before it is abandoned.
pub const CLOSE_STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a connection (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `Connection::close`, abandoned after [`CLOSE_STEP_TIMEOUT`] (see [`AmqpBus::close`]).
async fn close_connection(conn: &Connection, why: &str) {
    match tokio::time::timeout(CLOSE_STEP_TIMEOUT, conn.close(200, why.into())).await {
        Ok(_) => {}
        Err(_) => {
            tracing::debug!(
                event = "bus_close_abandoned",
                "the broker's close-ok did not come within {CLOSE_STEP_TIMEOUT:?}; leaving the connection"
            );
        }
    }
}

fn connect_err(e: lapin::Error) -> BusError {
    BusError::Connect(e.to_string())
}

async fn open_publish_channel(conn: &Connection) -> Result<Channel, BusError> {
    let ch = conn.create_channel().await.map_err(connect_err)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(connect_err)?;
    Ok(ch)
}

async fn declare_topology(ch: &Channel, run: &RunName, reply_queue: &str) -> Result<(), BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        run.exchange().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(connect_err)?;
    for svc in Service::ALL {
        let q = run.queue(svc);
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await
            .map_err(connect_err)?;
        ch.queue_bind(
            q.as_str().into(),
            run.exchange().into(),
            format!("{}.#", svc.as_str()).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(connect_err)?;
    }
    ch.queue_declare(run.dead_queue().into(), durable, FieldTable::default())
        .await
        .map_err(connect_err)?;
    ch.queue_declare(
        reply_queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(connect_err)?;
    Ok(())
}

fn field_table(h: &Headers) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in h {
        t.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(v.as_str().into()),
        );
    }
    t
}

fn headers_of(props: &BasicProperties) -> Headers {
    let mut h = Headers::new();
    if let Some(t) = props.headers() {
        for (k, v) in t.inner() {
            let s = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                _ => continue,
            };
            h.insert(k.as_str().to_string(), s);
        }
    }
    h
}

fn message_props(envelope: &Envelope, persistent: bool, headers: &Headers) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_content_type("application/json".into())
        .with_message_id(envelope.msg_id.to_string().into())
        .with_headers(field_table(headers))
}

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
