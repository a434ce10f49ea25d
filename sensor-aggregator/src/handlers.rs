//! The bus [`Handler`] of the `sensor-aggregator` queue: one function per op
//! (`heartbeat`, `describe_sensors`, `status`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use epu_core::bus::{Handler, Incoming};
use epu_core::config::redact_url;
use epu_core::request;
use epu_core::wire::{ErrorCode, Op, ReplyError};
use epu_model::lifecycle::Health;
use epu_model::messages::{
    Ack, AggregatorStatus, DescribeSensorsReply, DescribeSensorsRequest, DomainSensorsView,
    Heartbeat, StatusRequest,
};
use serde_json::Value;

use crate::report::build_reading;
use crate::{lock, Inner, SENDER};

impl Inner {
    fn describe_sensors(
        &self,
        req: DescribeSensorsRequest,
    ) -> Result<DescribeSensorsReply, ReplyError> {
        let now = self.clock.now();
        let domains = lock(&self.domains).clone();
        let mut tracker = lock(&self.tracker);
        tracker.sweep(now);
        let queues = lock(&self.queues);
        if let Some(name) = &req.domain {
            if !domains.contains_key(name) && !tracker.domains().contains(name) {
                return Err(ReplyError::not_found(format!(
                    "the aggregator knows no domain {name:?}"
                )));
            }
        }
        let mut names: BTreeSet<String> = domains.keys().cloned().collect();
        names.extend(tracker.domains());
        let counts = tracker.counts();
        let mut out = Vec::new();
        for name in names {
            if req.domain.as_ref().is_some_and(|d| d != &name) {
                continue;
            }
            let settings = domains.get(&name);
            let policy = tracker.policy(&name);
            let reading = build_reading(&name, &tracker, queues.get(&name), now);
            let by_health: BTreeMap<Health, u64> = counts
                .iter()
                .filter(|((d, _), _)| d == &name)
                .map(|((_, h), n)| (*h, *n))
                .collect();
            out.push(DomainSensorsView {
                configured: settings.is_some(),
                queue: settings.and_then(|s| s.queue.clone()),
                broker: settings.and_then(|s| {
                    s.queue.as_ref().map(|_| {
                        redact_url(
                            s.broker_url
                                .as_ref()
                                .map_or(self.default_broker.as_str(), |u| u.expose()),
                        )
                    })
                }),
                queue_status: queues.get(&name).map(|q| q.status.clone()),
                backlog: reading.backlog,
                nodes: by_health,
                boot_timeout_secs: policy.boot_timeout.as_seconds_f64(),
                missing_timeout_secs: policy.missing_timeout.as_seconds_f64(),
                zombie_secs: policy.zombie.as_seconds_f64(),
                node_list: req.domain.is_some().then_some(reading.nodes),
                name,
            });
        }
        Ok(DescribeSensorsReply {
            run: self.run.to_string(),
            tracked_nodes: tracker.len(),
            domains: out,
        })
    }

    fn status(&self) -> AggregatorStatus {
        let started = *lock(&self.started);
        AggregatorStatus {
            service: SENDER.to_string(),
            run: self.run.to_string(),
            tracked_nodes: self.tracked_nodes(),
            domains: lock(&self.domains).keys().cloned().collect(),
            heartbeats_received: self.metrics.heartbeats.get(),
            uptime_secs: started.map(|t| t.elapsed().as_secs_f64()),
        }
    }
}

pub(crate) struct AggregatorHandler(pub(crate) Arc<Inner>);

#[async_trait]
impl Handler for AggregatorHandler {
    async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
        let env = msg.envelope;
        match env.op {
            Op::Heartbeat => {
                request::serve(&env, |hb: Heartbeat| async {
                    self.0.record_heartbeat(hb);
                    Ok(Ack {})
                })
                .await
                .inspect_err(|e| {
                    if e.malformed {
                        self.0.metrics.heartbeats_invalid.inc();
                        tracing::warn!(event = "heartbeat_invalid", sender = %env.sender, error = %e, "ignoring a heartbeat whose body is not a heartbeat");
                    }
                })
            }
            Op::DescribeSensors => {
                request::serve(&env, |req: DescribeSensorsRequest| async {
                    self.0.describe_sensors(req)
                })
                .await
            }
            Op::Status => {
                request::serve(&env, |_: StatusRequest<AggregatorStatus>| async {
                    Ok(self.0.status())
                })
                .await
            }
            other => Err(ReplyError::new(
                ErrorCode::UnknownOp,
                format!("the sensor aggregator does not serve {other}"),
            )),
        }
    }
}
