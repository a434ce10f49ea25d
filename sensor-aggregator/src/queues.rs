//! Watching the domains' work queues: one probe task per domain that names a
//! `queue` (see [`crate::queue`] for the measuring), its results kept per domain.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use epu_core::config::redact_url;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::queue::{QueueProbe, QueueStatus};
use crate::report::gauge;
use crate::{lock, DomainSensors, Inner};

/// The latest measurement of a domain's queue.
#[derive(Clone, Debug)]
pub(crate) struct QueueEntry {
    pub(crate) queue: String,
    pub(crate) status: QueueStatus,
    pub(crate) at: DateTime<Utc>,
    pub(crate) changed: bool,
}

pub(crate) struct Probe {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Inner {
    pub(crate) fn start_probe(self: &Arc<Self>, d: &DomainSensors) {
        let Some(queue) = d.queue.clone() else {
            return;
        };
        let url = d
            .broker_url
            .as_ref()
            .map(|s| s.expose().to_string())
            .unwrap_or_else(|| self.default_broker.clone());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(domain = %d.name, "cannot watch the queue outside the async runtime");
            return;
        };
        let (stop, rx) = watch::channel(false);
        let task =
            rt.spawn(
                self.clone()
                    .probe_loop(d.name.clone(), queue, url, d.poll_interval(), rx),
            );
        if let Some(old) = lock(&self.probes).insert(d.name.clone(), Probe { stop, task }) {
            let _ = old.stop.send(true);
        }
    }

    pub(crate) fn stop_probe(&self, domain: &str) {
        if let Some(p) = lock(&self.probes).remove(domain) {
            let _ = p.stop.send(true);
        }
    }

    /// Signals every probe to stop and hands over their tasks (to be awaited).
    pub(crate) fn take_probes(&self) -> Vec<JoinHandle<()>> {
        let probes: Vec<Probe> = lock(&self.probes).drain().map(|(_, p)| p).collect();
        probes
            .into_iter()
            .map(|p| {
                let _ = p.stop.send(true);
                p.task
            })
            .collect()
    }

    async fn probe_loop(
        self: Arc<Self>,
        domain: String,
        queue: String,
        url: String,
        period: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut global_stop = self.stop.subscribe();
        let mut probe = QueueProbe::new(&url, &queue);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(event = "queue_watch", domain = %domain, queue = %queue, broker = %redact_url(&url), "watching the domain's queue");
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = global_stop.changed() => break,
                _ = ticker.tick() => {}
            }
            let status = tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = global_stop.changed() => break,
                s = probe.measure(&self.brokers) => s,
            };
            self.record_queue(&domain, &queue, status);
        }
        probe.close().await;
    }

    fn record_queue(&self, domain: &str, queue: &str, status: QueueStatus) {
        let now = self.clock.now();
        let mut queues = lock(&self.queues);
        let previous = queues.get(domain).map(|q| q.status.clone());
        if previous.as_ref() != Some(&status) {
            let kind = |s: &QueueStatus| std::mem::discriminant(s);
            if previous.as_ref().map(kind) != Some(kind(&status)) {
                match &status {
                    QueueStatus::Ok { ready } => {
                        tracing::info!(event = "queue_measured", domain = %domain, queue = %queue, ready, "measuring the domain's queue")
                    }
                    QueueStatus::Missing => {
                        tracing::warn!(event = "queue_missing", domain = %domain, queue = %queue, "the domain's queue does not exist; reporting no backlog")
                    }
                    QueueStatus::Unreachable { error } => {
                        tracing::warn!(event = "queue_unreachable", domain = %domain, queue = %queue, error = %error, "cannot measure the domain's queue; reporting no backlog")
                    }
                }
            }
        }
        let changed = previous.as_ref() != Some(&status);
        match &status {
            QueueStatus::Ok { ready } => {
                self.metrics
                    .queue_ready
                    .with_label_values(&[domain])
                    .set(gauge(*ready));
                self.metrics.queue_up.with_label_values(&[domain]).set(1);
            }
            _ => self.metrics.queue_up.with_label_values(&[domain]).set(0),
        }
        let entry = queues.entry(domain.to_string()).or_insert(QueueEntry {
            queue: queue.to_string(),
            status: status.clone(),
            at: now,
            changed: true,
        });
        entry.queue = queue.to_string();
        entry.status = status;
        entry.at = now;
        entry.changed |= changed;
        drop(queues);
        if changed {
            self.notify.notify_one();
        }
    }
}
