//! What a domain answers about itself: its summary (`list_domains`, and the
//! answer to `add_domain` and `reconfigure`) and its description
//! (`describe_domain`), as the typed replies of `epu_model::messages`.

use epu_core::config::redact_url;
use epu_model::health::SensorPolicy;
use epu_model::messages::{DomainDescription, DomainNode, DomainSummary};
use epu_model::NodeState;

use super::{Domain, NodeView};
use crate::policy::DomainPolicy;

/// A domain's sensors as a reply shows them: a broker password never leaves the
/// controller in a reply (it is `***`).
fn shown(sensors: &SensorPolicy) -> SensorPolicy {
    SensorPolicy {
        broker_url: sensors.broker_url.as_deref().map(redact_url),
        ..sensors.clone()
    }
}

/// Live nodes by what they count as: (running, pending, unhealthy, terminating).
type Counts = (usize, usize, usize, usize);

/// Counts live nodes. A sick node counts as unhealthy whatever its state;
/// terminal nodes do not count at all.
pub(super) fn counts<'a>(nodes: impl Iterator<Item = &'a NodeView>) -> Counts {
    let (mut running, mut pending, mut unhealthy, mut terminating) = (0, 0, 0, 0);
    for v in nodes {
        let s = v.record.state;
        if s.is_terminal() {
            continue;
        }
        if v.health.is_unhealthy() || s == NodeState::RunningFailed {
            unhealthy += 1;
        } else if s == NodeState::Running {
            running += 1;
        } else if s.is_booting() {
            pending += 1;
        } else if s == NodeState::Terminating {
            terminating += 1;
        }
    }
    (running, pending, unhealthy, terminating)
}

impl Domain {
    pub(super) fn summary(&self) -> DomainSummary {
        let (running, pending, unhealthy, terminating) = counts(self.nodes.values());
        DomainSummary {
            domain: self.policy.name.clone(),
            engine: self.policy.engine.clone(),
            engine_state: self.engine.report().state,
            desired: self.desired,
            running,
            pending,
            unhealthy,
            terminating,
            backlog: self.backlog.as_ref().map(|r| r.value),
            dry_run: self.policy.dry_run,
            paused: self.policy.paused,
            engine_conf: self.policy.engine_conf.clone(),
        }
    }

    pub(super) fn describe(&self) -> DomainDescription {
        let nodes = self
            .nodes
            .values()
            .map(|n| DomainNode {
                node_id: n.record.node_id.clone(),
                domain: n.record.domain.clone(),
                state: n.record.state,
                health: n.health,
                jobs: n.jobs,
                iaas_id: n.record.iaas_id.clone(),
                launch_id: n.record.launch_id.clone(),
                driver: n.record.driver.clone(),
                reason: n.record.reason,
                since: n.record.since(),
            })
            .collect();
        DomainDescription {
            summary: self.summary(),
            report: self.engine.report(),
            health: self.policy.health,
            sensors: shown(&self.policy.sensors),
            policy: serde_json::to_value(DomainPolicy {
                sensors: shown(&self.policy.sensors),
                ..self.policy.clone()
            })
            .unwrap_or_default(),
            nodes,
            decisions: self.decisions.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_model::Health;
    use epu_testkit::records::node;

    fn view(state: NodeState, health: Health) -> NodeView {
        let mut v = NodeView::new(node("d", "n").state(state).build());
        v.health = health;
        v
    }

    #[test]
    fn a_broker_password_is_never_shown() {
        let s = SensorPolicy {
            queue: Some("jobs".into()),
            broker_url: Some("amqp://worker:s3cret@broker:5672/%2f".into()),
        };
        let shown = shown(&s);
        assert_eq!(shown.queue.as_deref(), Some("jobs"));
        assert_eq!(
            shown.broker_url.as_deref(),
            Some("amqp://worker:***@broker:5672/%2f")
        );
        let none = SensorPolicy::default();
        assert_eq!(super::shown(&none), none);
    }

    #[test]
    fn nodes_count_by_what_they_are() {
        use Health::*;
        use NodeState::*;
        // (state, health) → (running, pending, unhealthy, terminating)
        let table: &[(&str, NodeState, Health, Counts)] = &[
            ("running and OK", Running, Ok, (1, 0, 0, 0)),
            ("running, not heard yet", Running, Unknown, (1, 0, 0, 0)),
            ("running but missing", Running, Missing, (0, 0, 1, 0)),
            ("running_failed", RunningFailed, Unknown, (0, 0, 1, 0)),
            ("requesting", Requesting, Unknown, (0, 1, 0, 0)),
            ("pending", Pending, Unknown, (0, 1, 0, 0)),
            (
                "booting but a process error",
                Started,
                ProcessError,
                (0, 0, 1, 0),
            ),
            ("terminating", Terminating, Ok, (0, 0, 0, 1)),
            ("terminated", Terminated, Ok, (0, 0, 0, 0)),
            ("failed and a zombie", Failed, Zombie, (0, 0, 0, 0)),
            ("rejected", Rejected, Unknown, (0, 0, 0, 0)),
        ];
        for (name, state, health, want) in table {
            let v = [view(*state, *health)];
            assert_eq!(counts(v.iter()), *want, "{name}");
        }
    }
}
