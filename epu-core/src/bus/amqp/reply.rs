//! The reply side of request/reply: one consumer per bus on its exclusive reply queue,
//! handing each reply to the request waiting on its correlation id.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::sync::{oneshot, watch};

use super::{lock, AmqpBus};
use crate::bus::{BusError, Server};

impl AmqpBus {
    pub(super) async fn ensure_reply_consumer(&self) -> Result<(), BusError> {
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
}
