//! Serving: consume a service's queue, hand each delivery to the [`Dispatcher`], then
//! dead-letter, reply and ack; consume again after every reconnect.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::sync::watch;
use uuid::Uuid;

use super::publish::{field_table, headers_of};
use super::{AmqpBus, CLOSE_STEP_TIMEOUT};
use crate::bus::{dead_letter_headers, Dispatcher};

impl AmqpBus {
    pub(super) async fn serve_loop(self, dispatcher: Dispatcher, mut stop: watch::Receiver<bool>) {
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
