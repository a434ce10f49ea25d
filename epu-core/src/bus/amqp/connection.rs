//! The connection and its reconnect path: one live `Link` per bus, replaced under a
//! lock by whoever finds it dead.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::topology::declare_topology;
use super::{redacted, AmqpBus, Link, CLOSE_STEP_TIMEOUT, CONNECT_TIMEOUT};
use crate::bus::BusError;

impl AmqpBus {
    /// The live link, reconnecting once if it is dead.
    pub(super) async fn link(&self) -> Result<Link, BusError> {
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
    pub(super) async fn link_until(
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
    /// Drops the link if it is still the one that failed, so the next user reconnects.
    pub(super) async fn invalidate(&self, generation: u64) {
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
}

/// `Connection::close`, abandoned after [`CLOSE_STEP_TIMEOUT`] (see [`AmqpBus::close`]).
pub(super) async fn close_connection(conn: &Connection, why: &str) {
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

pub(super) fn connect_err(e: lapin::Error) -> BusError {
    BusError::Connect(e.to_string())
}

pub(super) async fn open_publish_channel(conn: &Connection) -> Result<Channel, BusError> {
    let ch = conn.create_channel().await.map_err(connect_err)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(connect_err)?;
    Ok(ch)
}
