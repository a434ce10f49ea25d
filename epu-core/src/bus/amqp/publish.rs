//! Publishing: one publish on the current link, a confirmed publish retried across
//! reconnects, and the message properties and headers that go with them.

use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};

use super::{AmqpBus, CLOSE_STEP_TIMEOUT};
use crate::bus::BusError;
use crate::wire::{Envelope, Headers, Service};

/// How long one publish attempt (write, and confirm when asked) may take before it is
/// abandoned and, for a confirmed publish, retried. A confirm from a healthy broker,
/// quorum queues included, comes in milliseconds.
pub const PUBLISH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl AmqpBus {
    /// One publish on the current link; `confirm` waits for the broker's ack. Bounded
    /// by [`PUBLISH_ATTEMPT_TIMEOUT`]: lapin's publish and confirm futures can stay
    /// pending when the connection dies under them (seen once in ten runs of
    /// `tests/broker_cluster.rs` when a cluster node stopped), and an attempt that
    /// never ends would keep `send` from retrying on the next link, or returning.
    pub(super) async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
        confirm: bool,
    ) -> Result<(), BusError> {
        let link = self.link().await?;
        let attempt = async {
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
                Confirmation::Nack(_) => {
                    // A fresh channel for the retry: after a quorum queue's leader was
                    // lost (its node crashed), RabbitMQ 3.10 kept nacking every publish
                    // on a channel opened before the new leader was elected, for minutes,
                    // while a new channel published at once (tests/broker_cluster.rs,
                    // EPU_CLUSTER_TEST_STOP=kill). `link()` opens the next one.
                    let _ = tokio::time::timeout(
                        CLOSE_STEP_TIMEOUT,
                        link.publish.close(200, "nacked; reopening".into()),
                    )
                    .await;
                    Err(BusError::Publish(
                        "broker nacked the message (retried on a new channel)".into(),
                    ))
                }
            }
        };
        let result = match tokio::time::timeout(PUBLISH_ATTEMPT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(BusError::Publish(format!(
                "no {} from the broker within {PUBLISH_ATTEMPT_TIMEOUT:?}",
                if confirm { "confirm" } else { "write" }
            ))),
        };
        if result.is_err() {
            self.invalidate(link.generation).await;
        }
        result
    }
    /// A confirmed publish, retried across reconnects until `publish_timeout`.
    pub(super) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.opts.publish_timeout;
        let mut backoff = self.inner.reconnect.state();
        loop {
            // The last attempt ends at the deadline too (a reconnect inside it may be
            // what takes the time).
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(
                left,
                self.publish_once(exchange, routing_key, payload, props.clone(), true),
            )
            .await
            .unwrap_or_else(|_| {
                Err(BusError::Publish(format!(
                    "no confirm within the {:?} left",
                    left
                )))
            });
            match attempt {
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

    pub(super) fn routing_key(service: Service, op: &str) -> String {
        format!("{}.{}", service.as_str(), op)
    }
}

pub(super) fn field_table(h: &Headers) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in h {
        t.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(v.as_str().into()),
        );
    }
    t
}

pub(super) fn headers_of(props: &BasicProperties) -> Headers {
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

pub(super) fn message_props(
    envelope: &Envelope,
    persistent: bool,
    headers: &Headers,
) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_content_type("application/json".into())
        .with_message_id(envelope.msg_id.to_string().into())
        .with_headers(field_table(headers))
}
