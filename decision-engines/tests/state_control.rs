//! Shared types: node lifecycle, health, instances, launch failures, Control.

mod common;

use common::*;
use decision_engines::{
    victim_order, Control, Health, Instance, LaunchFailures, LaunchSpec, NodeState, State,
};
use std::collections::BTreeMap;
use std::str::FromStr;

#[test]
fn node_state_order_and_predicates() {
    use NodeState::*;
    // (state, booting, live, terminable, terminal)
    let table = [
        (Requesting, true, true, true, false),
        (Requested, true, true, true, false),
        (ErrorRetrying, true, true, true, false),
        (Pending, true, true, true, false),
        (Started, true, true, true, false),
        (Running, false, true, true, false),
        (RunningFailed, false, false, true, false),
        (Terminating, false, false, false, false),
        (Terminated, false, false, false, true),
        (Failed, false, false, false, true),
        (Rejected, false, false, false, true),
    ];
    for (st, booting, live, terminable, terminal) in table {
        assert_eq!(st.is_booting(), booting, "{st} booting");
        assert_eq!(st.is_live(), live, "{st} live");
        assert_eq!(st.is_terminable(), terminable, "{st} terminable");
        assert_eq!(st.is_terminal(), terminal, "{st} terminal");
    }
    let mut all = NodeState::ALL.to_vec();
    all.reverse();
    all.sort();
    assert_eq!(all, NodeState::ALL.to_vec());
    assert!(NodeState::ALL
        .windows(2)
        .all(|w| w[0] < w[1] && w[0].code() < w[1].code()));
}

#[test]
fn node_state_names_serde_and_parse() {
    for st in NodeState::ALL {
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(json, format!("\"{}\"", st.as_str()));
        assert_eq!(serde_json::from_str::<NodeState>(&json).unwrap(), st);
        assert_eq!(NodeState::from_str(st.as_str()).unwrap(), st);
        assert_eq!(st.to_string(), st.as_str());
        let coded = format!("{}-{}", st.code(), st.as_str());
        assert_eq!(NodeState::from_str(&coded).unwrap(), st, "{coded}");
        assert_eq!(NodeState::from_str(&st.code().to_string()).unwrap(), st);
    }
    assert_eq!(NodeState::RunningFailed.as_str(), "RUNNING_FAILED");
    assert_eq!(NodeState::ErrorRetrying.as_str(), "ERROR_RETRYING");
    assert_eq!(
        NodeState::from_str("running_failed").unwrap(),
        NodeState::RunningFailed
    );
    assert!(NodeState::from_str("BOOTING").is_err());
    assert!(NodeState::from_str("600-PENDING").is_err());
    assert!(NodeState::from_str("").is_err());
    let err = NodeState::from_str("nope").unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("REQUESTING"), "{err}");
}

#[test]
fn health_names_and_unhealthy() {
    let table = [
        (Health::Unknown, "UNKNOWN", false),
        (Health::Ok, "OK", false),
        (Health::Missing, "MISSING", true),
        (Health::Zombie, "ZOMBIE", true),
        (Health::ProcessError, "PROCESS_ERROR", true),
    ];
    for (h, name, bad) in table {
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{name}\""));
        assert_eq!(Health::from_str(name).unwrap(), h);
        assert_eq!(Health::from_str(&name.to_lowercase()).unwrap(), h);
        assert_eq!(h.is_unhealthy(), bad, "{name}");
    }
    assert_eq!(Health::default(), Health::Unknown);
    assert!(Health::from_str("SICK").is_err());
}

#[test]
fn instance_helpers() {
    let i = running("a", 10, Some(0));
    assert_eq!(i.age(t(70)).num_seconds(), 60);
    assert_eq!(i.age(t(0)).num_seconds(), 0, "never negative");
    assert!(i.is_idle() && i.counts_as_capacity() && !i.is_unhealthy());

    let rf = inst("b", NodeState::RunningFailed, Health::Ok, 0);
    assert!(rf.is_unhealthy() && rf.needs_termination() && !rf.counts_as_capacity());

    let booting_missing = inst("c", NodeState::Pending, Health::Missing, 0);
    assert!(booting_missing.needs_termination() && !booting_missing.counts_as_capacity());

    let zombie_gone = inst("d", NodeState::Terminated, Health::Zombie, 0);
    assert!(
        zombie_gone.needs_termination(),
        "a terminated zombie is terminated again"
    );
    let zombie_terminating = inst("e", NodeState::Terminating, Health::Zombie, 0);
    assert!(
        !zombie_terminating.needs_termination(),
        "termination under way"
    );
    let dead_missing = inst("f", NodeState::Failed, Health::Missing, 0);
    assert!(!dead_missing.needs_termination());

    let booting = inst("g", NodeState::Requested, Health::Unknown, 0);
    assert!(booting.counts_as_capacity() && !booting.needs_termination());
}

#[test]
fn instance_serde_defaults() {
    let i: Instance = serde_json::from_value(serde_json::json!({
        "id": "n1", "state": "PENDING", "launch_time": "2024-05-01T00:00:00Z"
    }))
    .unwrap();
    assert_eq!(i.health, Health::Unknown);
    assert_eq!(i.busy, None);
    assert_eq!(i.unique_key, None);
    let s = State::new("d", t(0))
        .with_instance(i)
        .with_backlog(3.0, t(0));
    let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn victim_order_idle_unknown_busy_then_newest_then_id() {
    let mut v = [
        running("busy-old", 0, Some(3)),
        running("busy-few", 0, Some(1)),
        running("unknown-old", 0, None),
        running("idle-old", 0, Some(0)),
        running("idle-new-b", 50, Some(0)),
        running("idle-new-a", 50, Some(0)),
        inst("booting-new", NodeState::Pending, Health::Unknown, 90),
    ];
    v.sort_by(victim_order);
    let ids: Vec<&str> = v.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "idle-new-a",
            "idle-new-b",
            "idle-old",
            "booting-new",
            "unknown-old",
            "busy-few",
            "busy-old"
        ]
    );
}

#[test]
fn launch_failures_observe() {
    use NodeState::*;
    let mut f = LaunchFailures::default();
    // (previous, next, counts as failure?, resets?)
    assert!(f.observe(Some(Pending), Failed, t(1)));
    assert!(f.observe(None, Rejected, t(2)));
    assert!(f.observe(Some(Requesting), Failed, t(3)));
    assert_eq!(f.consecutive, 3);
    assert_eq!(f.last_at, Some(t(3)));
    // Failures of nodes that had run, or that we were terminating, are not launch failures.
    assert!(!f.observe(Some(Running), Failed, t(4)));
    assert!(!f.observe(Some(RunningFailed), Failed, t(4)));
    assert!(!f.observe(Some(Terminating), Failed, t(4)));
    assert!(!f.observe(Some(Pending), Started, t(4)));
    assert_eq!(f.consecutive, 3);
    // An out-of-order older failure does not move last_at back.
    f.record_failure(t(0));
    assert_eq!((f.consecutive, f.last_at), (4, Some(t(3))));
    // Reaching RUNNING resets.
    assert!(f.observe(Some(Started), Running, t(5)));
    assert_eq!(f, LaunchFailures::default());
    assert!(!f.observe(Some(Started), Running, t(6)), "nothing to reset");
}

#[test]
fn control_records_intents() {
    let mut c = Control::new();
    assert!(c.is_empty());
    c.reason("just thinking");
    assert!(c.is_empty(), "reasons alone are not intents");
    c.launch(0, LaunchSpec::default());
    assert!(c.is_empty(), "a launch of 0 records nothing");
    c.launch(2, LaunchSpec::default());
    let mut vars = BTreeMap::new();
    vars.insert("role".to_string(), "db".to_string());
    c.launch(1, LaunchSpec::unique("db", vars.clone()));
    c.destroy(strs(&["a", "b"]));
    c.destroy(strs(&["b", "c"]));
    assert!(!c.is_empty());
    assert_eq!(c.launch_count(), 3);
    assert_eq!(c.launches()[1].spec.unique_key.as_deref(), Some("db"));
    assert_eq!(c.launches()[1].spec.vars, vars);
    assert_eq!(c.destroys(), strs(&["a", "b", "c"]).as_slice());
    assert_eq!(c.reasons(), ["just thinking"]);
}
