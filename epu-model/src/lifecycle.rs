//! Node lifecycle states and worker health, shared by every part.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The node lifecycle, in its order.
///
/// States only move forward: an update that is not later than the current state is a
/// duplicate or arrives out of order and is dropped (`Ord` follows the declaration order,
/// so `new > old` is the test). The original EPU numbered them `100-REQUESTING` …
/// `950-REJECTED` so that they sort; [`NodeState::code`] gives those numbers and
/// [`FromStr`] accepts both forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    /// The launch is recorded; the IaaS has not been asked yet.
    Requesting,
    /// The IaaS accepted the request.
    Requested,
    /// The IaaS call failed with a retryable error; the provisioner is retrying.
    ErrorRetrying,
    /// The IaaS reports the instance pending.
    Pending,
    /// The instance is up at the IaaS; the worker has not reported yet.
    Started,
    /// The worker is running.
    Running,
    /// The worker was running and has failed (for example its contextualization or
    /// process failed); the instance still exists and must be destroyed.
    RunningFailed,
    /// A termination was requested.
    Terminating,
    /// The instance is gone.
    Terminated,
    /// The launch or the instance failed; the instance is gone.
    Failed,
    /// The provisioner refused the request (for example it is disabled).
    Rejected,
}

impl NodeState {
    /// Every state, in lifecycle order.
    pub const ALL: [NodeState; 11] = [
        NodeState::Requesting,
        NodeState::Requested,
        NodeState::ErrorRetrying,
        NodeState::Pending,
        NodeState::Started,
        NodeState::Running,
        NodeState::RunningFailed,
        NodeState::Terminating,
        NodeState::Terminated,
        NodeState::Failed,
        NodeState::Rejected,
    ];

    /// The wire name, e.g. `"RUNNING_FAILED"` (the same as the serde form).
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeState::Requesting => "REQUESTING",
            NodeState::Requested => "REQUESTED",
            NodeState::ErrorRetrying => "ERROR_RETRYING",
            NodeState::Pending => "PENDING",
            NodeState::Started => "STARTED",
            NodeState::Running => "RUNNING",
            NodeState::RunningFailed => "RUNNING_FAILED",
            NodeState::Terminating => "TERMINATING",
            NodeState::Terminated => "TERMINATED",
            NodeState::Failed => "FAILED",
            NodeState::Rejected => "REJECTED",
        }
    }

    /// The original EPU's sort code: 100 (REQUESTING) … 950 (REJECTED).
    pub const fn code(self) -> u16 {
        match self {
            NodeState::Requesting => 100,
            NodeState::Requested => 200,
            NodeState::ErrorRetrying => 300,
            NodeState::Pending => 400,
            NodeState::Started => 500,
            NodeState::Running => 600,
            NodeState::RunningFailed => 650,
            NodeState::Terminating => 700,
            NodeState::Terminated => 800,
            NodeState::Failed => 900,
            NodeState::Rejected => 950,
        }
    }

    /// REQUESTING ..= STARTED: on its way, not serving yet.
    pub fn is_booting(self) -> bool {
        self <= NodeState::Started
    }

    /// REQUESTING ..= RUNNING: does or will count toward the domain's capacity.
    ///
    /// RUNNING_FAILED is *not* live (it will never serve again) but it is still
    /// [terminable](Self::is_terminable): the engine must destroy it.
    pub fn is_live(self) -> bool {
        self <= NodeState::Running
    }

    /// REQUESTING ..= RUNNING_FAILED: the instance may exist and nobody has asked to
    /// terminate it yet.
    pub fn is_terminable(self) -> bool {
        self <= NodeState::RunningFailed
    }

    /// TERMINATED, FAILED, REJECTED: the node record is final.
    pub fn is_terminal(self) -> bool {
        self >= NodeState::Terminated
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`NodeState`] or a [`Health`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?}; expected one of: {expected}")]
pub struct ParseStateError {
    what: &'static str,
    given: String,
    expected: String,
}

impl FromStr for NodeState {
    type Err = ParseStateError;

    /// Accepts `RUNNING`, `running`, `600-RUNNING` and `600`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (code, name) = match t.split_once('-') {
            Some((c, n)) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) => {
                (Some(c), Some(n))
            }
            _ if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => (Some(t), None),
            _ => (None, Some(t)),
        };
        let found = NodeState::ALL.into_iter().find(|st| {
            let code_ok = code.is_none_or(|c| c.parse::<u16>().ok() == Some(st.code()));
            let name_ok = name.is_none_or(|n| n.eq_ignore_ascii_case(st.as_str()));
            code_ok && name_ok
        });
        found.ok_or_else(|| ParseStateError {
            what: "node state",
            given: s.to_owned(),
            expected: NodeState::ALL.map(NodeState::as_str).join(", "),
        })
    }
}

/// What the sensor aggregator thinks of a worker (see the design's "Health").
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Not heard from yet (normal while booting).
    #[default]
    Unknown,
    /// Heartbeating and reporting OK.
    Ok,
    /// RUNNING but never heard within `boot_timeout`, or silent for `missing_timeout`.
    Missing,
    /// Heartbeats although it was terminated.
    Zombie,
    /// Heartbeats reporting a failed worker process.
    ProcessError,
}

impl Health {
    /// Every health value.
    pub const ALL: [Health; 5] = [
        Health::Unknown,
        Health::Ok,
        Health::Missing,
        Health::Zombie,
        Health::ProcessError,
    ];

    /// The wire name, e.g. `"PROCESS_ERROR"` (the same as the serde form).
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "UNKNOWN",
            Health::Ok => "OK",
            Health::Missing => "MISSING",
            Health::Zombie => "ZOMBIE",
            Health::ProcessError => "PROCESS_ERROR",
        }
    }

    /// MISSING, ZOMBIE or PROCESS_ERROR.
    pub fn is_unhealthy(self) -> bool {
        matches!(
            self,
            Health::Missing | Health::Zombie | Health::ProcessError
        )
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Health {
    type Err = ParseStateError;

    /// Case-insensitive wire name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Health::ALL
            .into_iter()
            .find(|h| h.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| ParseStateError {
                what: "health",
                given: s.to_owned(),
                expected: Health::ALL.map(Health::as_str).join(", "),
            })
    }
}
