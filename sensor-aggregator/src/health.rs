//! The health judge: one pure function of (what the provisioner says about a node,
//! its latest heartbeat, the domain's thresholds, now) → [`Health`]. No IO, no clock
//! of its own: the caller passes `now`, so tests are tables of timestamps.
//!
//! The rules, first match wins:
//!
//! 1. The node is **terminated** (TERMINATED, FAILED, REJECTED): `ZOMBIE` if it was
//!    heard more than `zombie` after it entered that state, else `UNKNOWN` (it is gone;
//!    nothing to report).
//! 2. Its latest heartbeat says **PROCESS_ERROR**: `PROCESS_ERROR` (silence after it
//!    does not turn it into MISSING: both are unhealthy, and this one says why).
//! 3. It was **heard**: `MISSING` if silent for more than `missing_timeout`, else `OK`
//!    (so an OK heartbeat clears MISSING).
//! 4. **Never heard**: `MISSING` if it has been RUNNING (or later) for more than
//!    `boot_timeout`, else `UNKNOWN` (booting).
//!
//! A node the provisioner does not know is judged on its heartbeats alone (rules 2–3).

use chrono::{DateTime, TimeDelta, Utc};
use epu_model::health::HealthPolicy;
use epu_model::messages::WorkerState;
use epu_model::{Health, NodeState};

/// A domain's thresholds as the judge uses them. Built from the domain's
/// [`HealthPolicy`] (its policy's `[health]`, or the aggregator config's entry) by
/// `From`, the one place the seconds become spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub boot_timeout: TimeDelta,
    pub missing_timeout: TimeDelta,
    pub zombie: TimeDelta,
}

impl From<&HealthPolicy> for Thresholds {
    fn from(p: &HealthPolicy) -> Self {
        Thresholds {
            boot_timeout: p.boot_timeout_secs.as_time_delta(),
            missing_timeout: p.missing_timeout_secs.as_time_delta(),
            zombie: p.zombie_secs.as_time_delta(),
        }
    }
}

impl Default for Thresholds {
    /// [`HealthPolicy::DEFAULT`]'s: boot 60 s, missing 15 s, zombie 10 s.
    fn default() -> Self {
        Thresholds::from(&HealthPolicy::DEFAULT)
    }
}

/// What the provisioner's record says about a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub state: NodeState,
    /// When it entered RUNNING, if it did.
    pub running_since: Option<DateTime<Utc>>,
    /// When it entered its terminal state, if it is in one.
    pub terminal_since: Option<DateTime<Utc>>,
}

/// The latest heartbeat: when it was heard (on the aggregator's clock) and what it said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastHeard {
    pub at: DateTime<Utc>,
    pub state: WorkerState,
}

/// Judges one node (see the module docs).
pub fn judge(
    facts: Option<&NodeFacts>,
    heard: Option<LastHeard>,
    policy: &Thresholds,
    now: DateTime<Utc>,
) -> Health {
    if let Some(f) = facts {
        if f.state.is_terminal() {
            return match (heard, f.terminal_since) {
                (Some(h), Some(t)) if h.at > t + policy.zombie => Health::Zombie,
                _ => Health::Unknown,
            };
        }
    }
    match heard {
        Some(h) if h.state == WorkerState::ProcessError => Health::ProcessError,
        Some(h) if now - h.at > policy.missing_timeout => Health::Missing,
        Some(_) => Health::Ok,
        None => match facts {
            Some(NodeFacts {
                state,
                running_since: Some(since),
                ..
            }) if *state >= NodeState::Running && now - *since > policy.boot_timeout => {
                Health::Missing
            }
            _ => Health::Unknown,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn running(since: i64) -> NodeFacts {
        NodeFacts {
            state: NodeState::Running,
            running_since: Some(t(since)),
            terminal_since: None,
        }
    }

    fn state(s: NodeState, running_since: Option<i64>, terminal_since: Option<i64>) -> NodeFacts {
        NodeFacts {
            state: s,
            running_since: running_since.map(t),
            terminal_since: terminal_since.map(t),
        }
    }

    fn ok(at: i64) -> Option<LastHeard> {
        Some(LastHeard {
            at: t(at),
            state: WorkerState::Ok,
        })
    }

    fn err(at: i64) -> Option<LastHeard> {
        Some(LastHeard {
            at: t(at),
            state: WorkerState::ProcessError,
        })
    }

    /// (name, provisioner facts, latest heartbeat, now, expected).
    type Case = (
        &'static str,
        Option<NodeFacts>,
        Option<LastHeard>,
        i64,
        Health,
    );

    /// boot 60 s, missing 15 s, zombie 10 s.
    #[test]
    fn table() {
        let p = Thresholds::default();
        use Health::*;
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // never heard
            ("booting, not running yet",           Some(state(NodeState::Pending, None, None)), None, 500, Unknown),
            ("running, within boot timeout",       Some(running(0)), None, 60, Unknown),
            ("running, past boot timeout",         Some(running(0)), None, 61, Missing),
            ("running_failed, past boot timeout",  Some(state(NodeState::RunningFailed, Some(0), None)), None, 61, Missing),
            ("terminating, never ran",             Some(state(NodeState::Terminating, None, None)), None, 500, Unknown),
            // heard
            ("heard recently",                     Some(running(0)), ok(100), 110, Ok),
            ("silent exactly missing_timeout",     Some(running(0)), ok(100), 115, Ok),
            ("silent past missing_timeout",        Some(running(0)), ok(100), 116, Missing),
            ("heard before RUNNING, then quiet",   Some(state(NodeState::Started, None, None)), ok(0), 16, Missing),
            ("an OK heartbeat clears MISSING",     Some(running(0)), ok(200), 201, Ok),
            ("heard, boot long past: still OK",    Some(running(0)), ok(999), 1000, Ok),
            ("process error",                      Some(running(0)), err(100), 101, ProcessError),
            ("process error, then silent",         Some(running(0)), err(100), 500, ProcessError),
            // terminated
            ("terminated, heard before",           Some(state(NodeState::Terminated, Some(0), Some(100))), ok(99), 200, Unknown),
            ("terminated, heard within grace",     Some(state(NodeState::Terminated, Some(0), Some(100))), ok(110), 200, Unknown),
            ("terminated, heard after grace",      Some(state(NodeState::Terminated, Some(0), Some(100))), ok(111), 200, Zombie),
            ("failed, heard after grace (error)",  Some(state(NodeState::Failed, None, Some(100))), err(150), 151, Zombie),
            ("terminated, never heard",            Some(state(NodeState::Terminated, Some(0), Some(100))), None, 9999, Unknown),
            ("terminated, no time: no verdict",    Some(state(NodeState::Rejected, None, None)), ok(500), 501, Unknown),
            // unknown to the provisioner: heartbeats alone
            ("stranger, heard",                    None, ok(100), 101, Ok),
            ("stranger, silent",                   None, ok(100), 200, Missing),
            ("stranger, process error",            None, err(100), 101, ProcessError),
        ];
        for (name, facts, heard, now, want) in cases {
            assert_eq!(judge(facts.as_ref(), heard, &p, t(now)), want, "{name}");
        }
    }

    #[test]
    fn zero_thresholds_are_strict() {
        let p = Thresholds {
            boot_timeout: TimeDelta::zero(),
            missing_timeout: TimeDelta::zero(),
            zombie: TimeDelta::zero(),
        };
        assert_eq!(judge(Some(&running(0)), ok(5), &p, t(5)), Health::Ok);
        assert_eq!(judge(Some(&running(0)), ok(5), &p, t(6)), Health::Missing);
        assert_eq!(judge(Some(&running(0)), None, &p, t(1)), Health::Missing);
    }
}
