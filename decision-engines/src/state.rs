//! What an engine sees: the domain's instances, its sensor readings, its recent launch
//! failures and the clock.
//!
//! [`NodeState`] and [`Health`] are the workspace's shared vocabulary from `epu-model`,
//! re-exported here so that engine authors need only this crate; they are the very
//! same types the provisioner, the aggregator and the controller use.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

pub use epu_model::{Health, NodeState, ParseStateError};

/// One worker instance of the domain, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The node id (the provisioner's launch/node id, not the IaaS id).
    pub id: String,
    /// Lifecycle state.
    pub state: NodeState,
    /// Health as judged by the sensor aggregator.
    #[serde(default)]
    pub health: Health,
    /// Jobs the worker holds, from its last heartbeat: `Some(0)` is idle, `None` unknown.
    #[serde(default)]
    pub busy: Option<u32>,
    /// When the launch was requested.
    pub launch_time: DateTime<Utc>,
    /// The unique-instance key it was launched for (npreserving `unique_instances`).
    #[serde(default)]
    pub unique_key: Option<String>,
}

impl Instance {
    /// A new instance record with UNKNOWN health and unknown busyness.
    pub fn new(id: impl Into<String>, state: NodeState, launch_time: DateTime<Utc>) -> Self {
        Instance {
            id: id.into(),
            state,
            health: Health::Unknown,
            busy: None,
            launch_time,
            unique_key: None,
        }
    }

    /// Builder: set the health.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Builder: set the number of jobs held.
    pub fn with_busy(mut self, busy: Option<u32>) -> Self {
        self.busy = busy;
        self
    }

    /// Builder: set the unique-instance key.
    pub fn with_unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Time since launch (zero if `now` is before the launch time).
    pub fn age(&self, now: DateTime<Utc>) -> TimeDelta {
        (now - self.launch_time).max(TimeDelta::zero())
    }

    /// Health MISSING, ZOMBIE or PROCESS_ERROR, or state RUNNING_FAILED.
    pub fn is_unhealthy(&self) -> bool {
        self.health.is_unhealthy() || self.state == NodeState::RunningFailed
    }

    /// Healthy and [live](NodeState::is_live): counts toward the domain's capacity
    /// (booting instances included, so that engines do not over-launch).
    pub fn counts_as_capacity(&self) -> bool {
        self.state.is_live() && !self.is_unhealthy()
    }

    /// Unhealthy and something to destroy: either not yet being terminated
    /// (REQUESTING ..= RUNNING_FAILED), or a ZOMBIE in a terminal state (it was
    /// terminated and still heartbeats, so the termination is sent again). A ZOMBIE in
    /// TERMINATING is left alone: its termination is under way.
    pub fn needs_termination(&self) -> bool {
        if self.state.is_terminable() {
            self.is_unhealthy()
        } else {
            self.health == Health::Zombie && self.state.is_terminal()
        }
    }

    /// Reports zero jobs held.
    pub fn is_idle(&self) -> bool {
        self.busy == Some(0)
    }
}

/// Orders instances from the best victim to the worst when an engine must remove some:
/// idle first (`busy == Some(0)`), then unknown busyness (booting workers, or no
/// heartbeat yet), then busy ones, fewest jobs first; within each group the newest
/// (latest `launch_time`) first; ties broken by id, ascending.
pub fn victim_order(a: &Instance, b: &Instance) -> Ordering {
    fn class(i: &Instance) -> (u8, u32) {
        match i.busy {
            Some(0) => (0, 0),
            None => (1, 0),
            Some(n) => (2, n),
        }
    }
    class(a)
        .cmp(&class(b))
        .then_with(|| b.launch_time.cmp(&a.launch_time))
        .then_with(|| a.id.cmp(&b.id))
}

/// One sensor value and when it was measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The value (for the backlog: a count of messages/jobs).
    pub value: f64,
    /// When the value was measured (not when it arrived).
    pub at: DateTime<Utc>,
}

impl Reading {
    /// A reading of `value` measured at `at`.
    pub fn new(value: f64, at: DateTime<Utc>) -> Self {
        Reading { value, at }
    }

    /// Time since the reading was measured (zero if `now` is before it).
    pub fn age(&self, now: DateTime<Utc>) -> TimeDelta {
        (now - self.at).max(TimeDelta::zero())
    }
}

/// The domain's latest sensor readings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SensorReadings {
    /// The work backlog of the domain's queue: ready messages **plus** jobs held by busy
    /// workers, as computed by the sensor aggregator. Engines use it as is and never add
    /// `Instance::busy` to it. `None` until the first reading arrives.
    #[serde(default)]
    pub backlog: Option<Reading>,
    /// Any other named readings (for custom engines).
    #[serde(default)]
    pub other: BTreeMap<String, Reading>,
}

/// Consecutive launch failures of the domain, for launch backoff.
///
/// A launch failure is a node that went FAILED or REJECTED without having reached
/// RUNNING; a node reaching RUNNING is a success and resets the count. The controller
/// keeps one of these per domain and feeds every node state change to
/// [`LaunchFailures::observe`]; it should persist it with the domain so that a restart
/// does not forget a backoff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFailures {
    /// Launch failures since the last success.
    pub consecutive: u32,
    /// When the latest of them happened.
    pub last_at: Option<DateTime<Utc>>,
}

impl LaunchFailures {
    /// Count one launch failure at `at`.
    pub fn record_failure(&mut self, at: DateTime<Utc>) {
        self.consecutive = self.consecutive.saturating_add(1);
        self.last_at = Some(self.last_at.map_or(at, |t| t.max(at)));
    }

    /// A launch succeeded: forget the failures.
    pub fn record_success(&mut self) {
        *self = LaunchFailures::default();
    }

    /// Apply one node state change (`previous` is `None` for a node first seen).
    /// FAILED/REJECTED reached from a state before RUNNING is a failure; RUNNING reached
    /// from a state before it is a success; anything else changes nothing. Returns
    /// whether the record changed.
    pub fn observe(
        &mut self,
        previous: Option<NodeState>,
        next: NodeState,
        at: DateTime<Utc>,
    ) -> bool {
        let before_running = previous.is_none_or(|p| p < NodeState::Running);
        if !before_running {
            return false;
        }
        match next {
            NodeState::Failed | NodeState::Rejected => {
                self.record_failure(at);
                true
            }
            NodeState::Running => {
                let changed = *self != LaunchFailures::default();
                self.record_success();
                changed
            }
            _ => false,
        }
    }
}

/// Everything an engine decides from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The decision's clock. Engines never read the system clock.
    pub now: DateTime<Utc>,
    /// The domain's name.
    pub domain: String,
    /// The domain's instances, including booting ones, and recently terminated ones if
    /// the controller keeps them. The controller must show its own intents here: an
    /// instance it asked to launch appears (at least as REQUESTING) and one it asked to
    /// destroy appears as TERMINATING (or later), before the next decision.
    pub instances: Vec<Instance>,
    /// Sensor readings.
    #[serde(default)]
    pub sensors: SensorReadings,
    /// Launch failures since the last successful launch.
    #[serde(default)]
    pub launch_failures: LaunchFailures,
}

impl State {
    /// An empty domain at `now`.
    pub fn new(domain: impl Into<String>, now: DateTime<Utc>) -> Self {
        State {
            now,
            domain: domain.into(),
            instances: Vec::new(),
            sensors: SensorReadings::default(),
            launch_failures: LaunchFailures::default(),
        }
    }

    /// Builder: add an instance.
    pub fn with_instance(mut self, instance: Instance) -> Self {
        self.instances.push(instance);
        self
    }

    /// Builder: set the backlog reading.
    pub fn with_backlog(mut self, value: f64, at: DateTime<Utc>) -> Self {
        self.sensors.backlog = Some(Reading::new(value, at));
        self
    }

    /// Builder: set the launch failure record.
    pub fn with_launch_failures(mut self, consecutive: u32, last_at: DateTime<Utc>) -> Self {
        self.launch_failures = LaunchFailures {
            consecutive,
            last_at: Some(last_at),
        };
        self
    }

    /// The instances that count toward capacity (healthy and live, booting included).
    pub fn capacity(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| i.counts_as_capacity())
    }
}
