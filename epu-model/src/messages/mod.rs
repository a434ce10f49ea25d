//! The body of every operation, by service. `PROTOCOL.md` documents the same.
//!
//! Request bodies reject unknown fields, so a typo in a field name is a
//! `bad_request` rather than a silently ignored setting.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lifecycle::{Health, NodeState};

mod replies;
pub use replies::*;

// ---------------------------------------------------------------- provisioner

/// What to launch: the driver and its settings. The `driver` tag picks the variant,
/// so an unknown driver or a missing required field (an EC2 deployable without
/// `image`) fails to parse and is answered `bad_request`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase", deny_unknown_fields)]
pub enum Deployable {
    Local(LocalDeployable),
    Ec2(Ec2Deployable),
    Sim(SimDeployable),
}

impl Deployable {
    pub fn driver(&self) -> &'static str {
        match self {
            Deployable::Local(_) => "local",
            Deployable::Ec2(_) => "ec2",
            Deployable::Sim(_) => "sim",
        }
    }
}

/// A worker that is an OS process on this machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDeployable {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; default: the node's directory under the run directory.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A worker that is an EC2 (or EC2-compatible) instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Deployable {
    pub image: String,
    #[serde(default = "default_instance_type")]
    pub instance_type: String,
    #[serde(default)]
    pub key_name: Option<String>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub iam_profile: Option<String>,
    /// User data template; `{{node_id}}`, `{{run}}`, `{{domain}}`, `{{heartbeat}}`
    /// and `{{var.NAME}}` are filled in per node.
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn default_instance_type() -> String {
    "t3.micro".to_string()
}

/// A virtual instance of the sim driver.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDeployable {
    /// Seconds from request to RUNNING on the provisioner's clock.
    #[serde(default)]
    pub boot_secs: Option<f64>,
    /// Probability in 0..=1 that a launch fails.
    #[serde(default)]
    pub failure_rate: Option<f64>,
}

/// `provision`: launch `count` nodes of one domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// Chosen (and stored) by the caller before sending: a retried request with the
    /// same launch id launches nothing new.
    pub launch_id: String,
    pub domain: String,
    /// Signed so that a negative count is a clear `bad_request`, not a parse error.
    pub count: i64,
    /// Node ids chosen by the caller, one per node; generated when absent.
    #[serde(default)]
    pub node_ids: Vec<String>,
    pub deployable: Deployable,
    /// Per-launch variables (a unique instance's launch vars), passed to the worker.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Where `instance_info` updates go; default the run's controller.
    #[serde(default)]
    pub subscriber: Option<String>,
    /// Only ask whether the provisioner would launch this deployable (its driver
    /// enabled, its command allowed): answered `bad_request` with the reason, or
    /// with no nodes; nothing is recorded or launched. The controller asks this
    /// when a domain is added at runtime.
    #[serde(default)]
    pub check_only: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProvisionReply {
    pub launch_id: String,
    pub nodes: Vec<NodeRecord>,
}

/// `terminate_nodes` (signed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateNodesRequest {
    pub node_ids: Vec<String>,
    /// The nodes' domain. An id the provisioner does not know yet (a launch that
    /// has not reached it) gets a tombstone in this domain: a TERMINATED record
    /// (`CANCELLED`) that a later `provision` naming the id cannot start.
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminateNodesReply {
    pub terminating: Vec<String>,
    /// Ids the provisioner did not know (each now a tombstone when the request
    /// named a domain).
    pub unknown: Vec<String>,
}

/// `terminate_all` (signed): disable, terminate everything, report what is left.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateAllRequest {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminateAllReply {
    pub disabled: bool,
    /// Nodes not yet TERMINATED/FAILED/REJECTED; poll until 0.
    pub remaining: usize,
}

/// `enable` (signed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {}

/// `dump_state` and `describe_nodes`: node records, optionally filtered, and the
/// provisioner's change feed.
///
/// Every change of a record takes the next revision of the provisioner's store
/// ([`NodeRecord::revision`]). `since` asks for the records changed after a
/// revision, oldest change first; `limit` pages the answer: ask again `since`
/// the reply's [`next`](DescribeNodesReply::next) while it says `more`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeNodesRequest {
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub node_ids: Vec<String>,
    /// Only nodes not in a terminal state.
    #[serde(default)]
    pub live_only: bool,
    /// Only records changed after this revision (absent or 0: every record).
    #[serde(default)]
    pub since: Option<u64>,
    /// At most this many records (absent: all of them).
    #[serde(default)]
    pub limit: Option<usize>,
    /// This asks a further page of a `full` listing: answered from `since`
    /// without judging it again (such a `since` is often older than what was
    /// pruned, which would otherwise start the listing over for ever).
    #[serde(default)]
    pub listing: bool,
}

impl DescribeNodesRequest {
    /// The change feed's page after `since`: every domain, terminal records too.
    pub fn changes(since: u64, limit: usize) -> Self {
        DescribeNodesRequest {
            since: Some(since),
            limit: Some(limit),
            ..Default::default()
        }
    }

    /// The next page of a `full` listing, after `since`.
    pub fn listing_page(since: u64, limit: usize) -> Self {
        DescribeNodesRequest {
            listing: true,
            ..Self::changes(since, limit)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DescribeNodesReply {
    pub enabled: bool,
    /// Oldest change first.
    pub nodes: Vec<NodeRecord>,
    /// The provisioner's revision when it answered.
    #[serde(default)]
    pub revision: u64,
    /// Where the next page, or the next resync, starts: the last record's
    /// revision while `more`, else `revision`.
    #[serde(default)]
    pub next: u64,
    /// More records match than `limit` allowed.
    #[serde(default)]
    pub more: bool,
    /// This listing (with its further pages) is every record the provisioner
    /// holds, not a list of changes: `since` was absent or 0, older than records
    /// it has since pruned, or newer than its revision (a provisioner with a new
    /// store). A node the caller holds that it does not list is gone.
    #[serde(default)]
    pub full: bool,
}

/// `describe_iaas`: what the IaaS itself lists for this run (by its run tag,
/// or for local workers the live processes), not what the records say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IaasInstance {
    pub driver: String,
    pub iaas_id: String,
    #[serde(default)]
    pub node_id: Option<String>,
    /// The IaaS's own word: `pending`, `running`, `stopping`, `terminated`.
    pub state: String,
    /// Exists and costs (anything but terminated).
    pub alive: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DescribeIaasReply {
    pub instances: Vec<IaasInstance>,
    /// Drivers that could not be listed, with the error.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Why a node failed or was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailReason {
    /// The IaaS is out of capacity or over its instance limit.
    IaasFull,
    IaasTimeout,
    IaasRateLimited,
    IaasAuth,
    IaasBadRequest,
    IaasError,
    /// The IaaS no longer lists the instance.
    NodeDisappeared,
    /// `terminate_all` disabled the provisioner.
    ProvisionerDisabled,
    /// A local worker process exited without being asked to.
    ProcessExited,
    /// The sim driver's configured failure.
    SimulatedFailure,
    /// The provisioner refused the request itself (a driver it does not enable, a
    /// command not allowed, a reserved tag, an unknown template variable); the
    /// detail says which.
    RequestRefused,
    /// Terminated before its launch reached the provisioner (a tombstone): a
    /// later `provision` naming the node does not start it.
    Cancelled,
}

/// A node as the provisioner records and reports it (`instance_info` body).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub launch_id: String,
    pub domain: String,
    pub run: String,
    pub driver: String,
    /// The IaaS's id: the EC2 instance id, the local worker's PID, the sim's id.
    #[serde(default)]
    pub iaas_id: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub state: NodeState,
    #[serde(default)]
    pub reason: Option<FailReason>,
    /// Free-text detail of the failure (an IaaS message), never a secret.
    #[serde(default)]
    pub reason_detail: Option<String>,
    /// When the node entered each state it went through.
    #[serde(default)]
    pub state_times: BTreeMap<NodeState, DateTime<Utc>>,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// The provisioner store's revision of this record's last change (0: not from
    /// the provisioner, such as the controller's placeholder of a launch it has
    /// not acknowledged). A report with a lower revision than one already applied
    /// is older news.
    #[serde(default)]
    pub revision: u64,
}

impl NodeRecord {
    /// When the node entered its current state.
    pub fn since(&self) -> Option<DateTime<Utc>> {
        self.state_times.get(&self.state).copied()
    }

    /// When the node was first recorded (its launch time).
    pub fn launched_at(&self) -> Option<DateTime<Utc>> {
        self.state_times.values().min().copied()
    }
}

// ---------------------------------------------------------------- sensors

/// What a worker's agent reports (`heartbeat`, transient).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    Ok,
    ProcessError,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub node_id: String,
    pub domain: String,
    pub state: WorkerState,
    /// Jobs the worker holds right now; 0 = idle.
    #[serde(default)]
    pub jobs: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stderr_tail: Option<String>,
    pub at: DateTime<Utc>,
}

/// The depth of a domain's work queue. `total = ready + busy`: a passive declare
/// counts ready messages only, so jobs workers hold (unacked) come from heartbeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueBacklog {
    pub queue: String,
    pub ready: u64,
    pub busy: u64,
    pub total: u64,
    pub at: DateTime<Utc>,
}

/// One node's health as the aggregator judges it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub node_id: String,
    pub health: Health,
    #[serde(default)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub last_heard: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stderr_tail: Option<String>,
}

/// `sensor_info`: the aggregator's readings for one domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensorInfo {
    pub domain: String,
    #[serde(default)]
    pub backlog: Option<QueueBacklog>,
    #[serde(default)]
    pub nodes: Vec<NodeHealth>,
    pub at: DateTime<Utc>,
}

// ---------------------------------------------------------------- controller

/// `reconfigure` (signed): keys merged over the domain's engine config, or the
/// domain switches `dry_run` / `paused`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconfigureRequest {
    pub domain: String,
    #[serde(default)]
    pub engine_conf: Map<String, Value>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub paused: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployables_parse_by_driver_and_refuse_what_is_wrong() {
        let ok: Deployable =
            serde_json::from_value(json!({"driver": "local", "command": "sleep", "args": ["9"]}))
                .expect("local");
        assert_eq!(ok.driver(), "local");
        let e = serde_json::from_value::<Deployable>(json!({"driver": "openstack"}))
            .expect_err("unknown driver");
        assert!(e.to_string().contains("openstack"), "{e}");
        let e =
            serde_json::from_value::<Deployable>(json!({"driver": "ec2"})).expect_err("no image");
        assert!(e.to_string().contains("image"), "{e}");
        let e = serde_json::from_value::<Deployable>(
            json!({"driver": "sim", "boot_secs": 1, "colour": "red"}),
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn node_records_round_trip() {
        let mut times = BTreeMap::new();
        times.insert(NodeState::Requesting, Utc::now());
        let rec = NodeRecord {
            node_id: "n1".into(),
            launch_id: "l1".into(),
            domain: "d".into(),
            run: "r".into(),
            driver: "sim".into(),
            iaas_id: None,
            addresses: vec![],
            state: NodeState::Requesting,
            reason: Some(FailReason::IaasFull),
            reason_detail: None,
            state_times: times,
            vars: BTreeMap::new(),
            revision: 0,
        };
        let v = serde_json::to_value(&rec).expect("enc");
        assert_eq!(v["state"], "REQUESTING");
        assert_eq!(v["reason"], "IAAS_FULL");
        assert!(v["state_times"].get("REQUESTING").is_some());
        let back: NodeRecord = serde_json::from_value(v).expect("dec");
        assert_eq!(back, rec);
    }
}
