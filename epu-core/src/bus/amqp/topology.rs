//! The run's topology: declared on every (re)connect, deleted on purge.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::connection::connect_err;
use super::{AmqpBus, CLOSE_STEP_TIMEOUT};
use crate::bus::BusError;
use crate::config::QueueType;
use crate::wire::{RunName, Service};

impl AmqpBus {
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
}

/// Declares the run's exchange and queues on a channel of its own (a refused declare
/// closes its channel, which must not be the publishing one), then closes it.
pub(super) async fn declare_topology(
    conn: &Connection,
    run: &RunName,
    reply_queue: &str,
    queue_type: Option<QueueType>,
) -> Result<(), BusError> {
    let mut ch = conn.create_channel().await.map_err(connect_err)?;
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
        ch = declare_durable(conn, ch, &q, queue_type).await?;
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
    ch = declare_durable(conn, ch, &run.dead_queue(), queue_type).await?;
    // Always classic: a quorum queue can be neither exclusive nor auto-delete.
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
    let _ = tokio::time::timeout(CLOSE_STEP_TIMEOUT, ch.close(200, "declared".into())).await;
    Ok(())
}

/// The arguments of a durable queue of type `t`. Classic queues carry none, as they
/// always have: a classic queue declared without `x-queue-type` refuses a redeclare
/// that names it.
pub(super) fn queue_args(t: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if t == QueueType::Quorum {
        args.insert(
            X_QUEUE_TYPE.into(),
            AMQPValue::LongString(t.as_str().into()),
        );
    }
    args
}

const X_QUEUE_TYPE: &str = "x-queue-type";

/// One durable queue (durable, not exclusive, not auto-delete: what a quorum queue
/// must be). With a type, declared as that type; a queue that exists as another type
/// is [`BusError::QueueType`]. Without one, the queue is used as it is: a passive
/// declare, and only a queue that does not exist is created, classic. Returns the
/// channel to go on with (a fresh one where the broker closed the last).
async fn declare_durable(
    conn: &Connection,
    ch: Channel,
    queue: &str,
    queue_type: Option<QueueType>,
) -> Result<Channel, BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match queue_type {
        Some(t) => match ch.queue_declare(queue.into(), durable, queue_args(t)).await {
            Ok(_) => Ok(ch),
            Err(e) => match refusal(&e) {
                Some((AMQPSoftError::PRECONDITIONFAILED, detail))
                    if detail.contains(X_QUEUE_TYPE) =>
                {
                    Err(BusError::QueueType {
                        queue: queue.to_string(),
                        configured: t,
                        detail,
                    })
                }
                _ => Err(connect_err(e)),
            },
        },
        None => {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match ch
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
            {
                Ok(_) => Ok(ch),
                Err(e) if matches!(refusal(&e), Some((AMQPSoftError::NOTFOUND, _))) => {
                    let ch = conn.create_channel().await.map_err(connect_err)?;
                    ch.queue_declare(queue.into(), durable, queue_args(QueueType::Classic))
                        .await
                        .map_err(connect_err)?;
                    Ok(ch)
                }
                Err(e) => Err(connect_err(e)),
            }
        }
    }
}

/// The channel-level refusal in `e` (its code and the broker's text), if it is one.
fn refusal(e: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => {
                Some((soft.clone(), amqp.get_message().as_str().to_string()))
            }
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queues_say_so_and_classic_ones_say_nothing() {
        let quorum = queue_args(QueueType::Quorum);
        assert_eq!(
            quorum.inner().get(X_QUEUE_TYPE),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(quorum.inner().len(), 1);
        assert!(queue_args(QueueType::Classic).inner().is_empty());
    }
}
