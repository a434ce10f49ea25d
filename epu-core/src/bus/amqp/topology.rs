//! The run's topology: declared on every (re)connect, deleted on purge.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::connection::connect_err;
use super::AmqpBus;
use crate::bus::BusError;
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

pub(super) async fn declare_topology(
    ch: &Channel,
    run: &RunName,
    reply_queue: &str,
) -> Result<(), BusError> {
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
