//! Stand-ins that record what reaches a service: the controller (every
//! `sensor_info`, or every `instance_info`) and the sensor aggregator (every
//! heartbeat), and heartbeat helpers.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use epu_core::bus::{Bus, BusError, FnHandler, Incoming, Server};
use epu_core::wire::{Envelope, Op, ReplyError, Service};
use epu_model::messages::{Heartbeat, NodeRecord, SensorInfo, WorkerState};
use epu_model::Health;
use serde_json::json;

/// What a recording handler has seen, with when it arrived.
#[derive(Clone)]
pub struct Recorded<T>(pub Arc<Mutex<Vec<(Instant, T)>>>);

impl<T> Default for Recorded<T> {
    fn default() -> Self {
        Recorded(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T: Clone> Recorded<T> {
    fn lock(&self) -> MutexGuard<'_, Vec<(Instant, T)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `v` as arriving now.
    pub fn push(&self, v: T) {
        self.lock().push((Instant::now(), v));
    }

    pub fn all(&self) -> Vec<(Instant, T)> {
        self.lock().clone()
    }

    pub fn find(&self, f: impl Fn(&T) -> bool) -> Option<(Instant, T)> {
        self.lock().iter().find(|(_, v)| f(v)).cloned()
    }

    pub fn find_after(&self, after: Instant, f: impl Fn(&T) -> bool) -> Option<(Instant, T)> {
        self.lock()
            .iter()
            .find(|(t, v)| *t >= after && f(v))
            .cloned()
    }

    /// The first record that matches, waiting up to `timeout` for it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        self.wait_after_opt(None, timeout, f).await
    }

    /// The first record since `after` that matches, waiting up to `timeout`.
    pub async fn wait_after(
        &self,
        after: Instant,
        timeout: Duration,
        f: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        self.wait_after_opt(Some(after), timeout, f).await
    }

    async fn wait_after_opt(
        &self,
        after: Option<Instant>,
        timeout: Duration,
        f: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = match after {
                Some(a) => self.find_after(a, &f),
                None => self.find(&f),
            };
            if found.is_some() {
                return found;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Serves `service` on `bus`, recording every `op` body as `T`; every message is
/// answered `{}`.
async fn record<T>(
    bus: &dyn Bus,
    service: Service,
    op: Op,
) -> Result<(Server, Recorded<T>), BusError>
where
    T: serde::de::DeserializeOwned + Clone + Send + 'static,
{
    let rec: Recorded<T> = Recorded::default();
    let r = rec.clone();
    let server = bus
        .serve(
            service,
            Arc::new(FnHandler(move |msg: Incoming| {
                let r = r.clone();
                async move {
                    if msg.envelope.op == op {
                        r.push(msg.envelope.parse_body()?);
                    }
                    Ok::<_, ReplyError>(json!({}))
                }
            })),
        )
        .await?;
    Ok((server, rec))
}

/// Serves the controller queue, recording every `sensor_info`.
pub async fn record_controller(bus: &dyn Bus) -> Result<(Server, Recorded<SensorInfo>), BusError> {
    record(bus, Service::Controller, Op::SensorInfo).await
}

/// Serves the controller queue, recording every `instance_info` (stands in for the
/// controller in provisioner tests).
pub async fn record_instance_info(
    bus: &dyn Bus,
) -> Result<(Server, Recorded<NodeRecord>), BusError> {
    record(bus, Service::Controller, Op::InstanceInfo).await
}

/// Serves the sensor-aggregator queue, recording every heartbeat (stands in for
/// the aggregator in agent tests).
pub async fn record_heartbeats(bus: &dyn Bus) -> Result<(Server, Recorded<Heartbeat>), BusError> {
    record(bus, Service::SensorAggregator, Op::Heartbeat).await
}

/// An OK heartbeat of `node_id` holding `jobs`, sent at `at`.
pub fn heartbeat(node_id: &str, domain: &str, jobs: u32, at: DateTime<Utc>) -> Heartbeat {
    Heartbeat {
        node_id: node_id.into(),
        domain: domain.into(),
        state: WorkerState::Ok,
        jobs,
        exit_code: None,
        stderr_tail: None,
        at,
    }
}

/// Sends a heartbeat the way the agent does.
pub async fn send_heartbeat(bus: &dyn Bus, hb: &Heartbeat) -> Result<(), BusError> {
    let env = Envelope::with_body(bus.run(), Op::Heartbeat, "test-agent", hb)?;
    bus.send(Service::SensorAggregator, &env).await
}

/// The health of `node` in `info`, if listed.
pub fn health_of(info: &SensorInfo, node: &str) -> Option<Health> {
    info.nodes
        .iter()
        .find(|n| n.node_id == node)
        .map(|n| n.health)
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_core::bus::local::LocalBus;
    use epu_core::testing::{test_options, test_run};

    #[tokio::test]
    async fn records_heartbeats_and_waits_with_a_deadline() {
        let run = test_run("kit-rec");
        let bus = LocalBus::new(run, test_options("host"));
        let (server, rec) = record_heartbeats(&bus).await.expect("serve");
        let before = Instant::now();
        send_heartbeat(&bus, &heartbeat("n1", "d", 2, Utc::now()))
            .await
            .expect("send");
        let (_, hb) = rec
            .wait_for(Duration::from_secs(5), |h| h.node_id == "n1")
            .await
            .expect("heartbeat of n1");
        assert_eq!(hb.jobs, 2);
        assert!(rec
            .wait_after(before, Duration::from_secs(5), |h| h.jobs == 2)
            .await
            .is_some());
        let t = Instant::now();
        assert!(rec
            .wait_for(Duration::from_millis(100), |h| h.node_id == "nope")
            .await
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(rec.all().len(), 1);
        server.stop().await;
    }
}
