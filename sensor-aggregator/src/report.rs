//! Readings to the controller: a domain's `sensor_info` within ~100 ms of a
//! change and at least every `sensor_info_interval_secs` while unchanged.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use epu_core::wire::{Envelope, Op, Service};
use epu_model::messages::{QueueBacklog, SensorInfo};
use tokio::sync::watch;

use crate::queue::QueueStatus;
use crate::queues::QueueEntry;
use crate::tracker::Tracker;
use crate::{lock, Inner, SENDER};

/// How often health is re-judged when nothing else wakes the reporter (time alone
/// turns nodes MISSING).
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// At most one reporting pass per this, however many changes arrive.
const MIN_PASS_GAP: Duration = Duration::from_millis(20);
/// How long one `sensor_info` send may take before the reporter moves on.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

impl Inner {
    pub(crate) async fn report_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last_sent: HashMap<String, Instant> = HashMap::new();
        let mut retry: HashSet<String> = HashSet::new();
        let mut last_pass: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            if let Some(gap) = last_pass.map(|t| t.elapsed()) {
                if gap < MIN_PASS_GAP {
                    tokio::time::sleep(MIN_PASS_GAP - gap).await;
                }
            }
            last_pass = Some(Instant::now());
            let readings = self.due_readings(&last_sent, &retry);
            for (info, forget) in readings {
                let name = info.domain.clone();
                match self.send_reading(&info).await {
                    Ok(()) => {
                        retry.remove(&name);
                        if forget {
                            last_sent.remove(&name);
                        } else {
                            last_sent.insert(name, Instant::now());
                        }
                    }
                    Err(e) => {
                        if retry.insert(name.clone()) {
                            tracing::warn!(domain = %name, error = %e, "cannot send sensor_info to the controller; retrying");
                        }
                    }
                }
            }
        }
    }

    /// Sweeps, then picks the readings to send: changed, or due by the interval.
    /// The bool says the domain is gone (send its empty reading once, then forget it).
    fn due_readings(
        &self,
        last_sent: &HashMap<String, Instant>,
        retry: &HashSet<String>,
    ) -> Vec<(SensorInfo, bool)> {
        let now = self.clock.now();
        let configured: BTreeSet<String> = lock(&self.domains).keys().cloned().collect();
        let mut tracker = lock(&self.tracker);
        tracker.sweep(now);
        let mut queues = lock(&self.queues);
        let mut names: BTreeSet<String> = configured.clone();
        let tracked: BTreeSet<String> = tracker.domains().into_iter().collect();
        names.extend(tracked.iter().cloned());
        names.extend(last_sent.keys().cloned());
        let mut out = Vec::new();
        for name in names {
            let node_change = tracker.take_changed(&name);
            let queue_change = queues
                .get_mut(&name)
                .is_some_and(|q| std::mem::take(&mut q.changed));
            let due = last_sent
                .get(&name)
                .is_none_or(|t| t.elapsed() >= self.info_interval);
            if !(node_change || queue_change || due || retry.contains(&name)) {
                continue;
            }
            let info = build_reading(&name, &tracker, queues.get(&name), now);
            let known = configured.contains(&name) || tracked.contains(&name);
            if !known {
                out.push((info, true));
                continue;
            }
            let silent = info.nodes.is_empty() && info.backlog.is_none();
            if silent && !configured.contains(&name) && !last_sent.contains_key(&name) {
                // Nothing to say about a domain nobody configured and nothing reported.
                continue;
            }
            self.metrics
                .backlog
                .with_label_values(&[name.as_str()])
                .set(info.backlog.as_ref().map_or(0, |b| gauge(b.total)));
            out.push((info, false));
        }
        self.metrics.tracked.set(gauge(tracker.len() as u64));
        self.metrics.nodes.reset();
        for ((domain, health), n) in tracker.counts() {
            self.metrics
                .nodes
                .with_label_values(&[domain.as_str(), health.as_str()])
                .set(gauge(n));
        }
        out
    }

    async fn send_reading(&self, info: &SensorInfo) -> Result<(), String> {
        let env = Envelope::with_body(&self.run, Op::SensorInfo, SENDER, info)
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(SEND_TIMEOUT, self.bus.send(Service::Controller, &env)).await {
            Ok(Ok(())) => {
                self.metrics.sensor_info_sent.inc();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {SEND_TIMEOUT:?}")),
        }
    }
}

pub(crate) fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn build_reading(
    domain: &str,
    tracker: &Tracker,
    queue: Option<&QueueEntry>,
    now: DateTime<Utc>,
) -> SensorInfo {
    let r = tracker.reading(domain);
    let backlog = match queue {
        Some(QueueEntry {
            queue,
            status: QueueStatus::Ok { ready },
            at,
            ..
        }) => Some(QueueBacklog {
            queue: queue.clone(),
            ready: *ready,
            busy: r.busy,
            total: ready.saturating_add(r.busy),
            at: *at,
        }),
        _ => None,
    };
    SensorInfo {
        domain: domain.to_string(),
        backlog,
        nodes: r.nodes,
        at: now,
    }
}
