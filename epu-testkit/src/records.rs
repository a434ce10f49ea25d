//! Node records for tests: a builder with sane defaults instead of a struct literal.
//!
//! ```
//! use epu_model::NodeState;
//! use epu_testkit::node;
//!
//! let r = node("web", "n1").run("r1").state(NodeState::Failed).iaas("i-1").build();
//! assert_eq!(r.launch_id, "launch-n1");
//! assert!(r.state_times.contains_key(&NodeState::Failed));
//! ```

use std::collections::BTreeMap;
use std::fmt::Display;

use chrono::{DateTime, Utc};
use epu_model::messages::{FailReason, NodeRecord};
use epu_model::NodeState;

/// The run a record names when the test does not say.
pub const DEFAULT_RUN: &str = "test-run";
/// The driver a record names when the test does not say.
pub const DEFAULT_DRIVER: &str = "sim";

/// A node record of `node_id` in `domain`: RUNNING, run [`DEFAULT_RUN`], driver
/// [`DEFAULT_DRIVER`], launch `launch-<node_id>`, no IaaS id, entered REQUESTING and
/// its state now (see [`NodeBuilder::at`]).
pub fn node(domain: &str, node_id: &str) -> NodeBuilder {
    NodeBuilder {
        record: NodeRecord {
            node_id: node_id.to_string(),
            launch_id: format!("launch-{node_id}"),
            domain: domain.to_string(),
            run: DEFAULT_RUN.to_string(),
            driver: DEFAULT_DRIVER.to_string(),
            iaas_id: None,
            addresses: Vec::new(),
            state: NodeState::Running,
            reason: None,
            reason_detail: None,
            state_times: BTreeMap::new(),
            vars: BTreeMap::new(),
            revision: 0,
        },
        at: None,
        since: None,
        extra_times: BTreeMap::new(),
    }
}

/// Builds a [`NodeRecord`]; see [`node`].
#[derive(Clone, Debug)]
#[must_use = "call .build() for the record"]
pub struct NodeBuilder {
    record: NodeRecord,
    at: Option<DateTime<Utc>>,
    since: Option<DateTime<Utc>>,
    extra_times: BTreeMap<NodeState, DateTime<Utc>>,
}

impl NodeBuilder {
    /// The run (a `RunName` or a string).
    pub fn run(mut self, run: impl Display) -> Self {
        self.record.run = run.to_string();
        self
    }

    pub fn state(mut self, state: NodeState) -> Self {
        self.record.state = state;
        self
    }

    /// The provisioner store's revision of the record's last change.
    pub fn revision(mut self, revision: u64) -> Self {
        self.record.revision = revision;
        self
    }

    pub fn driver(mut self, driver: &str) -> Self {
        self.record.driver = driver.to_string();
        self
    }

    pub fn launch(mut self, launch_id: &str) -> Self {
        self.record.launch_id = launch_id.to_string();
        self
    }

    pub fn iaas(mut self, iaas_id: &str) -> Self {
        self.record.iaas_id = Some(iaas_id.to_string());
        self
    }

    pub fn address(mut self, address: &str) -> Self {
        self.record.addresses.push(address.to_string());
        self
    }

    pub fn reason(mut self, reason: FailReason, detail: Option<&str>) -> Self {
        self.record.reason = Some(reason);
        self.record.reason_detail = detail.map(str::to_string);
        self
    }

    pub fn var(mut self, key: &str, value: &str) -> Self {
        self.record.vars.insert(key.to_string(), value.to_string());
        self
    }

    pub fn vars(mut self, vars: BTreeMap<String, String>) -> Self {
        self.record.vars = vars;
        self
    }

    /// When the node was requested and, unless [`since`](Self::since) says
    /// otherwise, entered its state (default: the time of `build`).
    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.at = Some(at);
        self
    }

    /// When the node entered its (final) state, if not [`at`](Self::at).
    pub fn since(mut self, since: DateTime<Utc>) -> Self {
        self.since = Some(since);
        self
    }

    /// Also records that the node entered `state` at `at` (a history, e.g.
    /// RUNNING before TERMINATED).
    pub fn entered(mut self, state: NodeState, at: DateTime<Utc>) -> Self {
        self.extra_times.insert(state, at);
        self
    }

    pub fn build(self) -> NodeRecord {
        let at = self.at.unwrap_or_else(Utc::now);
        let mut record = self.record;
        record.state_times.insert(NodeState::Requesting, at);
        record.state_times.extend(self.extra_times);
        record
            .state_times
            .insert(record.state, self.since.unwrap_or(at));
        record
    }
}

impl From<NodeBuilder> for NodeRecord {
    fn from(b: NodeBuilder) -> Self {
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn defaults_are_a_running_node_requested_and_running_now() {
        let r = node("d", "n1").build();
        assert_eq!(
            (r.domain.as_str(), r.node_id.as_str(), r.launch_id.as_str()),
            ("d", "n1", "launch-n1")
        );
        assert_eq!(
            (r.run.as_str(), r.driver.as_str()),
            (DEFAULT_RUN, DEFAULT_DRIVER)
        );
        assert_eq!(r.state, NodeState::Running);
        assert_eq!(r.iaas_id, None);
        let req = r.state_times[&NodeState::Requesting];
        assert_eq!(r.since(), Some(req));
        assert!((Utc::now() - req).abs() < TimeDelta::seconds(5));
    }

    #[test]
    fn every_field_can_be_set_and_times_follow() {
        let t0 = Utc::now() - TimeDelta::hours(1);
        let t1 = t0 + TimeDelta::minutes(5);
        let t2 = t0 + TimeDelta::minutes(9);
        let r = node("d", "n1")
            .run("r")
            .state(NodeState::Terminated)
            .driver("local")
            .launch("l1")
            .iaas("i-1")
            .address("10.0.0.1")
            .reason(FailReason::ProcessExited, Some("exit 3"))
            .var("k", "v")
            .at(t0)
            .entered(NodeState::Running, t1)
            .since(t2)
            .build();
        assert_eq!(r.run, "r");
        assert_eq!(r.driver, "local");
        assert_eq!(r.launch_id, "l1");
        assert_eq!(r.iaas_id.as_deref(), Some("i-1"));
        assert_eq!(r.addresses, ["10.0.0.1"]);
        assert_eq!(r.reason, Some(FailReason::ProcessExited));
        assert_eq!(r.reason_detail.as_deref(), Some("exit 3"));
        assert_eq!(r.vars["k"], "v");
        assert_eq!(r.launched_at(), Some(t0));
        assert_eq!(r.state_times[&NodeState::Running], t1);
        assert_eq!(r.since(), Some(t2));
    }
}
