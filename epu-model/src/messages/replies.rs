//! What the services answer: every reply body, and the request bodies that
//! carry nothing but their operation. The CLI and the services read and write
//! these types only; JSON exists at the bus boundary alone.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{DescribeNodesRequest, FailReason, NodeHealth, NodeRecord, QueueBacklog};
use crate::health::{HealthPolicy, SensorPolicy};
use crate::lifecycle::{Health, NodeState};

/// Nodes by state; states with none are left out.
pub type StateCounts = BTreeMap<NodeState, i64>;

/// The reply of operations that answer nothing but "done" (`heartbeat`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// `status`: asks one service how it is. `S` is that service's answer
/// ([`ProvisionerStatus`], [`ControllerStatus`], [`AggregatorStatus`]); on the
/// wire the body is `{}` whichever it is.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest<S> {
    #[serde(skip)]
    of: PhantomData<S>,
}

impl<S> StatusRequest<S> {
    pub fn new() -> Self {
        StatusRequest { of: PhantomData }
    }
}

impl<S> Default for StatusRequest<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> fmt::Debug for StatusRequest<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatusRequest")
    }
}

// ---------------------------------------------------------------- provisioner

/// `enable`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnableReply {
    pub enabled: bool,
}

/// `dump_state` body: `describe_nodes`' filters (`domain`, `node_ids`,
/// `live_only`, `since`), applied to its node records and to its launches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DumpStateRequest(pub DescribeNodesRequest);

/// `describe_iaas` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeIaasRequest {}

/// One launch the provisioner holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchSummary {
    pub launch_id: String,
    pub domain: String,
    pub driver: String,
    pub node_ids: Vec<String>,
    pub requested_at: DateTime<Utc>,
    /// Being carried out right now (not merely recorded).
    pub in_flight: bool,
}

/// `dump_state`'s answer: launches and every node record, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DumpStateReply {
    pub run: String,
    pub enabled: bool,
    pub drivers: Vec<String>,
    pub counts: StateCounts,
    pub launches: Vec<LaunchSummary>,
    pub nodes: Vec<NodeRecord>,
    /// The provisioner's revision when it answered (the change feed's start).
    #[serde(default)]
    pub revision: u64,
}

/// The provisioner's `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProvisionerStatus {
    pub service: String,
    pub run: String,
    pub ready: bool,
    pub enabled: bool,
    pub drivers: Vec<String>,
    pub nodes: StateCounts,
}

// ---------------------------------------------------------------- controller

/// Where an engine is, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EngineState {
    /// Configured, no decision made yet.
    Pending,
    /// The domain is at its target and every counted instance is running.
    Stable,
    /// Instances are being launched or are still booting toward the target.
    Growing,
    /// Surplus healthy instances are being destroyed.
    Shrinking,
    /// Launches are needed but held back after launch failures.
    BackingOff,
    /// The last decision failed (see the report's detail).
    Error,
}

impl EngineState {
    /// The wire name, e.g. `"BACKING_OFF"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EngineState::Pending => "PENDING",
            EngineState::Stable => "STABLE",
            EngineState::Growing => "GROWING",
            EngineState::Shrinking => "SHRINKING",
            EngineState::BackingOff => "BACKING_OFF",
            EngineState::Error => "ERROR",
        }
    }
}

impl fmt::Display for EngineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine's report: a state and engine-specific details (a JSON object, the
/// one place a reply carries free-form JSON: each engine has its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReport {
    /// In one word.
    pub state: EngineState,
    /// Engine-specific details (targets, counts, cooldowns, backoff, config).
    pub detail: Value,
}

impl EngineReport {
    /// A report.
    pub fn new(state: EngineState, detail: Value) -> Self {
        EngineReport { state, detail }
    }

    /// PENDING with no detail.
    pub fn pending() -> Self {
        EngineReport::new(EngineState::Pending, Value::Object(Default::default()))
    }
}

/// `list_domains` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDomainsRequest {}

/// `describe_domain` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeDomainRequest {
    pub domain: String,
}

/// `remove_domain` body (signed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDomainRequest {
    pub domain: String,
}

/// One domain in a line: `list_domains` (one per domain), `add_domain` and
/// `reconfigure` answer with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub domain: String,
    pub engine: String,
    pub engine_state: EngineState,
    /// What the engine last wanted.
    pub desired: u64,
    pub running: usize,
    pub pending: usize,
    pub unhealthy: usize,
    pub terminating: usize,
    /// The last backlog reading, if the domain has a queue.
    pub backlog: Option<f64>,
    pub dry_run: bool,
    pub paused: bool,
    pub engine_conf: Map<String, Value>,
}

/// One node as its domain sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainNode {
    pub node_id: String,
    pub domain: String,
    pub state: NodeState,
    pub health: Health,
    /// Jobs the worker holds, as last heard.
    pub jobs: Option<u32>,
    pub iaas_id: Option<String>,
    pub launch_id: String,
    pub driver: String,
    pub reason: Option<FailReason>,
    pub since: Option<DateTime<Utc>>,
}

/// One decision of a domain's engine, as carried out (or not, in dry-run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub domain: String,
    pub engine: String,
    pub launched: Vec<String>,
    pub destroyed: Vec<String>,
    pub reasons: Vec<String>,
    pub dry_run: bool,
    pub desired: u64,
}

/// `describe_domain`'s answer: the summary, the engine's report, the policy,
/// the nodes and the last decisions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainDescription {
    #[serde(flatten)]
    pub summary: DomainSummary,
    pub report: EngineReport,
    /// The policy's health settings: how the sensor aggregator judges the
    /// domain's workers (it reads them here for a domain added at runtime).
    pub health: HealthPolicy,
    /// The policy's sensors (its work queue), for the same reader.
    pub sensors: SensorPolicy,
    /// The domain's policy as the controller holds it (`{run}` filled in).
    pub policy: Value,
    pub nodes: Vec<DomainNode>,
    pub decisions: Vec<DecisionRecord>,
}

/// `remove_domain`'s answer: the nodes being terminated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveDomainReply {
    pub domain: String,
    pub terminating: Vec<String>,
}

/// The controller's `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub service: String,
    pub run: String,
    pub ready: bool,
    pub domains: usize,
}

// ---------------------------------------------------------------- sensor aggregator

/// `describe_sensors` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescribeSensorsRequest {
    /// One domain, with its node list.
    #[serde(default)]
    pub domain: Option<String>,
}

/// What the last measurement of a work queue found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum QueueStatus {
    /// Measured: this many ready messages.
    Ok { ready: u64 },
    /// The broker says the queue does not exist.
    Missing,
    /// The broker cannot be reached (or did not answer); the detail never holds a password.
    Unreachable { error: String },
}

/// One domain as the aggregator sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainSensorsView {
    pub name: String,
    /// The aggregator has sensor settings for it (not only node records).
    pub configured: bool,
    pub queue: Option<String>,
    /// The broker holding the queue, password redacted.
    pub broker: Option<String>,
    pub queue_status: Option<QueueStatus>,
    pub backlog: Option<QueueBacklog>,
    /// Nodes by health.
    pub nodes: BTreeMap<Health, u64>,
    pub boot_timeout_secs: f64,
    pub missing_timeout_secs: f64,
    pub zombie_secs: f64,
    /// Every node's health; only when one domain was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_list: Option<Vec<NodeHealth>>,
}

/// `describe_sensors`' answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DescribeSensorsReply {
    pub run: String,
    pub tracked_nodes: usize,
    pub domains: Vec<DomainSensorsView>,
}

/// The aggregator's `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AggregatorStatus {
    pub service: String,
    pub run: String,
    pub tracked_nodes: usize,
    pub domains: Vec<String>,
    pub heartbeats_received: u64,
    pub uptime_secs: Option<f64>,
}
