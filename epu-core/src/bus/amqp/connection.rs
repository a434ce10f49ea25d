//! The connection and its reconnect path: one live `Link` per bus, replaced under a
//! lock by whoever finds it dead.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use super::topology::declare_topology;
use super::{lock, redacted, AmqpBus, Link, CLOSE_STEP_TIMEOUT, CONNECT_TIMEOUT};
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
        let last = *lock(&self.inner.current_url);
        let mut failures = Vec::new();
        for i in connect_order(self.inner.urls.len(), last) {
            let url = &self.inner.urls[i];
            match self.open(url).await {
                Ok((conn, publish)) => {
                    let link = Link {
                        conn,
                        publish,
                        generation: self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1,
                    };
                    *lock(&self.inner.current_url) = Some(i);
                    tracing::info!(
                        event = "bus_connected",
                        run = %self.inner.run,
                        broker = %redacted(url),
                        generation = link.generation,
                        "connected to the broker"
                    );
                    *guard = Some(link.clone());
                    return Ok(link);
                }
                // The run's queues are of the other type: the same on every node.
                Err(e @ BusError::QueueType { .. }) => return Err(e),
                Err(e) => {
                    if self.inner.urls.len() > 1 {
                        tracing::warn!(event = "bus_broker_unreachable", broker = %redacted(url), error = %e, "broker unreachable; trying the next");
                    }
                    failures.push(e);
                }
            }
        }
        Err(all_failed(failures))
    }

    /// One broker: the connection, its publishing channel, the run's topology.
    async fn open(&self, url: &str) -> Result<(Arc<Connection>, Channel), BusError> {
        let props = ConnectionProperties::default().with_connection_name(
            format!("epu {} {}", self.inner.run, self.inner.opts.sender).into(),
        );
        let conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(BusError::Connect(format!(
                        "{} ({})",
                        redacted(url),
                        scrub(&e.to_string(), url)
                    )))
                }
                Err(_) => {
                    return Err(BusError::Connect(format!(
                        "{} did not complete the AMQP handshake within {CONNECT_TIMEOUT:?}",
                        redacted(url)
                    )))
                }
            };
        let conn = Arc::new(conn);
        let setup = async {
            let publish = open_publish_channel(&conn).await?;
            declare_topology(
                &conn,
                &self.inner.run,
                &self.inner.reply_queue,
                self.inner.opts.queue_type,
            )
            .await?;
            Ok::<_, BusError>(publish)
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(publish)) => Ok(publish),
            Ok(Err(BusError::Connect(e))) => Err(BusError::Connect(format!(
                "{} (declaring the run's exchange and queues: {e})",
                redacted(url)
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BusError::Connect(format!(
                "{} did not declare the run's exchange and queues within {CONNECT_TIMEOUT:?}",
                redacted(url)
            ))),
        };
        match result {
            Ok(publish) => Ok((conn, publish)),
            Err(e) => {
                close_connection(&conn, "setup failed").await;
                Err(e)
            }
        }
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

/// The order in which a (re)connect tries `n` brokers: all of them, each once. The
/// first connect (`last` = `None`) goes in the order given; a reconnect after losing
/// broker `last` starts with the one after it and tries `last` itself last, so a
/// stopped node costs nothing while the others answer, and the rotation spreads
/// successive losses over the cluster.
pub fn connect_order(n: usize, last: Option<usize>) -> Vec<usize> {
    let start = match last {
        Some(i) if n > 0 => (i % n + 1) % n,
        _ => 0,
    };
    (0..n).map(|k| (start + k) % n).collect()
}

/// One error for a connect where every broker failed: the broker's own for one URL,
/// each broker's in order for several.
fn all_failed(mut failures: Vec<BusError>) -> BusError {
    if failures.len() == 1 {
        return failures.remove(0);
    }
    let each: Vec<String> = failures
        .iter()
        .map(|e| match e {
            BusError::Connect(m) => m.clone(),
            other => other.to_string(),
        })
        .collect();
    BusError::Connect(format!(
        "none of the {} brokers answered: {}",
        failures.len(),
        each.join("; ")
    ))
}

/// `text` (a lapin error) with `url` replaced by its redacted form: a URL the parser
/// refuses is quoted whole, password included.
fn scrub(text: &str, url: &str) -> String {
    if url.is_empty() {
        return text.to_string();
    }
    text.replace(url, &redacted(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_order_table() {
        let cases: &[(usize, Option<usize>, &[usize])] = &[
            (0, None, &[]),
            (0, Some(3), &[]),
            (1, None, &[0]),
            (1, Some(0), &[0]),
            (3, None, &[0, 1, 2]),
            (3, Some(0), &[1, 2, 0]),
            (3, Some(1), &[2, 0, 1]),
            (3, Some(2), &[0, 1, 2]),
            // An index from a longer list (cannot happen; still a full rotation).
            (3, Some(7), &[2, 0, 1]),
            (2, Some(0), &[1, 0]),
        ];
        for (n, last, want) in cases {
            assert_eq!(connect_order(*n, *last), *want, "n={n} last={last:?}");
        }
    }

    #[test]
    fn all_failed_names_every_broker() {
        let one = all_failed(vec![BusError::Connect("amqp://h1 (refused)".into())]);
        assert_eq!(
            one.to_string(),
            BusError::Connect("amqp://h1 (refused)".into()).to_string()
        );
        let two = all_failed(vec![
            BusError::Connect("amqp://u:***@h1 (refused)".into()),
            BusError::Connect("amqp://u:***@h2 (timed out)".into()),
        ]);
        let shown = two.to_string();
        assert!(shown.contains("none of the 2 brokers answered"), "{shown}");
        assert!(shown.contains("amqp://u:***@h1 (refused)"), "{shown}");
        assert!(shown.contains("amqp://u:***@h2 (timed out)"), "{shown}");
    }

    #[test]
    fn scrub_hides_a_quoted_url() {
        assert_eq!(
            scrub("Invalid URL: 'user:pw@host'", "user:pw@host"),
            "Invalid URL: 'user:***@host'"
        );
        assert_eq!(scrub("refused", ""), "refused");
    }
}
