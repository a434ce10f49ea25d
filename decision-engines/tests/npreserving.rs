//! The npreserving engine, driven by explicit timestamps.

mod common;

use common::*;
use decision_engines::{
    DecisionEngine, EngineError, EngineState, Health, LaunchFailures, NPreservingEngine, NodeState,
    State,
};
use serde_json::{json, Value};

fn engine(c: Value) -> NPreservingEngine {
    let mut e = NPreservingEngine::new();
    e.initialize(&conf(c)).expect("valid config");
    e
}

#[test]
fn reaches_n_and_stays_there() {
    let mut e = engine(json!({"preserve_n": 3}));
    assert_eq!(e.report().state, EngineState::Pending);
    let mut seq = 0;
    let s0 = state_at(0, vec![]);
    let c = decide(&mut e, &s0);
    assert_eq!(c.launch_count(), 3);
    assert!(c.destroys().is_empty());
    assert_eq!(c.launches()[0].spec.unique_key, None);
    assert!(!c.reasons().is_empty());
    assert_eq!(e.report().state, EngineState::Growing);

    // Booting instances count: no second launch while they boot.
    let mut s1 = apply(&s0, &c, &mut seq);
    s1.now = t(5);
    let c = decide(&mut e, &s1);
    assert!(c.is_empty(), "{c:?}");
    assert_eq!(e.report().state, EngineState::Growing, "still booting");

    boot_all(&mut s1);
    s1.now = t(60);
    let c = decide(&mut e, &s1);
    assert!(c.is_empty());
    let r = e.report();
    assert_eq!(r.state, EngineState::Stable);
    assert_eq!(r.detail["healthy"], 3);
    assert_eq!(r.detail["preserve_n"], 3);
}

#[test]
fn preserve_zero_destroys_everything_healthy() {
    let mut e = engine(json!({"preserve_n": 0}));
    let s = state_at(10, vec![running("a", 0, Some(0)), running("b", 1, Some(2))]);
    let c = decide(&mut e, &s);
    assert_eq!(sorted(c.destroys().to_vec()), strs(&["a", "b"]));
    assert_eq!(c.launch_count(), 0);
    assert_eq!(e.report().state, EngineState::Shrinking);
}

#[test]
fn replaces_each_unhealthy_kind_in_the_same_decision() {
    // (what goes wrong with instance "sick")
    let table: Vec<(&str, NodeState, Health)> = vec![
        ("missing", NodeState::Running, Health::Missing),
        ("zombie", NodeState::Running, Health::Zombie),
        ("process error", NodeState::Running, Health::ProcessError),
        ("running failed", NodeState::RunningFailed, Health::Ok),
        (
            "running failed, unknown health",
            NodeState::RunningFailed,
            Health::Unknown,
        ),
        ("missing while booting", NodeState::Started, Health::Missing),
    ];
    for (name, st, health) in table {
        let mut e = engine(json!({"preserve_n": 3}));
        let s = state_at(
            100,
            vec![
                running("ok1", 0, Some(0)),
                running("ok2", 0, Some(1)),
                inst("sick", st, health, 0),
            ],
        );
        let c = decide(&mut e, &s);
        assert_eq!(c.destroys(), strs(&["sick"]).as_slice(), "{name}");
        assert_eq!(c.launch_count(), 1, "{name}: replaced in the same decision");
        assert_eq!(capacity_after(&s, &c), 3, "{name}");
        assert!(
            c.reasons().iter().any(|r| r.contains("unhealthy")),
            "{name}"
        );
    }
}

#[test]
fn terminated_zombie_is_destroyed_again_but_not_replaced() {
    let mut e = engine(json!({"preserve_n": 2}));
    let s = state_at(
        100,
        vec![
            running("a", 0, Some(0)),
            running("b", 0, Some(0)),
            inst("z", NodeState::Terminated, Health::Zombie, 0),
            inst("zt", NodeState::Terminating, Health::Zombie, 0),
            inst("gone", NodeState::Failed, Health::Missing, 0),
        ],
    );
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["z"]).as_slice());
    assert_eq!(c.launch_count(), 0);
}

#[test]
fn ignores_terminating_and_terminal_instances_for_capacity() {
    let mut e = engine(json!({"preserve_n": 2}));
    let s = state_at(
        100,
        vec![
            running("a", 0, Some(0)),
            inst("t", NodeState::Terminating, Health::Ok, 0),
            inst("f", NodeState::Failed, Health::Unknown, 0),
            inst("r", NodeState::Rejected, Health::Unknown, 0),
        ],
    );
    let c = decide(&mut e, &s);
    assert!(c.destroys().is_empty());
    assert_eq!(c.launch_count(), 1);
}

#[test]
fn surplus_destroyed_idle_first_then_newest() {
    // n = 2 of 6 healthy: victims are the 4 best by victim order.
    let mut e = engine(json!({"preserve_n": 2}));
    let s = state_at(
        1000,
        vec![
            running("busy-old", 0, Some(4)),
            running("busy-new", 500, Some(1)),
            running("idle-old", 10, Some(0)),
            running("idle-new", 400, Some(0)),
            running("silent", 300, None),
            inst("booting", NodeState::Pending, Health::Unknown, 900),
        ],
    );
    let c = decide(&mut e, &s);
    assert_eq!(
        c.destroys(),
        strs(&["idle-new", "idle-old", "booting", "silent"]).as_slice()
    );
    assert_eq!(c.launch_count(), 0);
    assert_eq!(capacity_after(&s, &c), 2);
    assert_eq!(e.report().state, EngineState::Shrinking);
}

#[test]
fn unhealthy_and_surplus_in_one_decision() {
    let mut e = engine(json!({"preserve_n": 1}));
    let s = state_at(
        100,
        vec![
            running("a", 0, Some(1)),
            running("b", 50, Some(0)),
            inst("sick", NodeState::Running, Health::Missing, 0),
        ],
    );
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["sick", "b"]).as_slice());
    assert_eq!(c.launch_count(), 0);
    assert_eq!(capacity_after(&s, &c), 1);
}

#[test]
fn unique_instances_each_key_exactly_once_with_its_vars() {
    let mut e = engine(json!({
        "unique_instances": {"db": {"role": "primary"}, "cache": {"size": 2}, "web": null}
    }));
    // Empty domain: one launch per key with its vars.
    let s = state_at(0, vec![]);
    let c = decide(&mut e, &s);
    let mut launched: Vec<(String, Vec<(String, String)>)> = c
        .launches()
        .iter()
        .map(|l| {
            assert_eq!(l.count, 1);
            (
                l.spec.unique_key.clone().unwrap(),
                l.spec.vars.clone().into_iter().collect(),
            )
        })
        .collect();
    launched.sort();
    assert_eq!(
        launched,
        vec![
            ("cache".into(), vec![("size".into(), "2".into())]),
            ("db".into(), vec![("role".into(), "primary".into())]),
            ("web".into(), vec![]),
        ]
    );

    // Converged after applying: nothing to do.
    let mut seq = 0;
    let mut s1 = apply(&s, &c, &mut seq);
    boot_all(&mut s1);
    s1.now = t(60);
    assert!(decide(&mut e, &s1).is_empty());
    assert_eq!(e.report().state, EngineState::Stable);

    // A duplicate db, an unkeyed instance, an unknown key, and a missing cache.
    let s2 = state_at(
        100,
        vec![
            running("db-old", 0, Some(2)).with_unique_key("db"),
            running("db-new", 90, Some(0)).with_unique_key("db"),
            running("web-1", 0, Some(0)).with_unique_key("web"),
            running("plain", 0, Some(0)),
            running("stray", 0, Some(0)).with_unique_key("nope"),
            inst("cache-sick", NodeState::Running, Health::ProcessError, 0)
                .with_unique_key("cache"),
        ],
    );
    let c = decide(&mut e, &s2);
    assert_eq!(c.destroys()[0], "cache-sick", "unhealthy first");
    assert_eq!(
        sorted(c.destroys().to_vec()),
        strs(&["cache-sick", "db-new", "plain", "stray"])
    );
    assert_eq!(c.launches().len(), 1);
    assert_eq!(c.launches()[0].spec.unique_key.as_deref(), Some("cache"));
    assert_eq!(
        c.launches()[0].spec.vars.get("size").map(String::as_str),
        Some("2")
    );
    assert_eq!(e.report().detail["missing_unique_keys"], json!(["cache"]));
}

#[test]
fn unique_key_ignored_without_unique_instances() {
    let mut e = engine(json!({"preserve_n": 2}));
    let s = state_at(
        0,
        vec![
            running("a", 0, Some(0)).with_unique_key("x"),
            running("b", 0, Some(0)).with_unique_key("x"),
        ],
    );
    assert!(decide(&mut e, &s).is_empty());
}

fn failing(now: i64, k: u32, last: i64, instances: Vec<decision_engines::Instance>) -> State {
    state_at(now, instances).with_launch_failures(k, t(last))
}

#[test]
fn backoff_grows_and_caps() {
    // initial 10, max 60: delay after k failures = 10, 20, 40, 60, 60 ...
    let mut e =
        engine(json!({"preserve_n": 1, "backoff_initial_secs": 10, "backoff_max_secs": 60}));
    // (k, seconds since the last failure, launches?)
    let table = [
        (0, 0, true),
        (1, 0, false),
        (1, 9, false),
        (1, 10, true),
        (2, 19, false),
        (2, 20, true),
        (3, 39, false),
        (3, 40, true),
        (4, 59, false),
        (4, 60, true),
        (10, 59, false),
        (10, 60, true),
        (40, 59, false),
        (u32::MAX, 59, false),
        (u32::MAX, 60, true),
    ];
    for (k, since, launches) in table {
        let mut s = failing(1000 + since, k, 1000, vec![]);
        if k == 0 {
            s.launch_failures = LaunchFailures::default();
        }
        let c = decide(&mut e, &s);
        assert_eq!(
            c.launch_count() == 1,
            launches,
            "k={k} since={since}: {c:?}"
        );
        let r = e.report();
        if launches {
            assert_eq!(r.state, EngineState::Growing, "k={k} since={since}");
        } else {
            assert_eq!(r.state, EngineState::BackingOff, "k={k} since={since}");
            assert!(c.reasons().iter().any(|r| r.contains("backing off")));
            assert_eq!(r.detail["backoff"]["consecutive_failures"], k);
        }
    }
}

#[test]
fn backoff_still_destroys_unhealthy_and_surplus() {
    let mut e = engine(json!({"preserve_n": 1}));
    let s = failing(
        1005,
        1,
        1000,
        vec![inst("sick", NodeState::Running, Health::Missing, 0)],
    );
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["sick"]).as_slice());
    assert_eq!(c.launch_count(), 0);
    assert_eq!(e.report().state, EngineState::BackingOff);

    let s = failing(
        1005,
        3,
        1000,
        vec![running("a", 0, Some(0)), running("b", 1, Some(0))],
    );
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["b"]).as_slice());
    assert_eq!(
        e.report().state,
        EngineState::Shrinking,
        "no launch needed, so not backing off"
    );
}

#[test]
fn backoff_resets_after_a_success() {
    let mut e = engine(json!({"preserve_n": 2}));
    let mut failures = LaunchFailures::default();
    for at in [100, 110, 130] {
        failures.observe(Some(NodeState::Pending), NodeState::Failed, t(at));
    }
    // 3 failures, last at 130: blocked until 130 + 40.
    let mut s = state_at(140, vec![running("a", 0, Some(0))]);
    s.launch_failures = failures;
    assert_eq!(decide(&mut e, &s).launch_count(), 0);
    // One launch reaches RUNNING: the record resets and launches resume at once.
    failures.observe(Some(NodeState::Started), NodeState::Running, t(141));
    s.launch_failures = failures;
    s.now = t(141);
    assert_eq!(decide(&mut e, &s).launch_count(), 1);
    // A single new failure waits only the initial delay.
    failures.observe(Some(NodeState::Requested), NodeState::Failed, t(150));
    s.launch_failures = failures;
    s.now = t(159);
    assert_eq!(decide(&mut e, &s).launch_count(), 0);
    s.now = t(160);
    assert_eq!(decide(&mut e, &s).launch_count(), 1);
}

#[test]
fn backoff_zero_disables() {
    let mut e = engine(json!({"preserve_n": 1, "backoff_initial_secs": 0}));
    let s = failing(1000, 50, 1000, vec![]);
    assert_eq!(decide(&mut e, &s).launch_count(), 1);
}

#[test]
fn deterministic_for_the_same_state() {
    let s = state_at(
        500,
        vec![
            running("c", 5, Some(0)),
            running("a", 5, Some(0)),
            running("b", 5, Some(0)),
            inst("x", NodeState::Running, Health::Zombie, 1),
        ],
    );
    let mut e1 = engine(json!({"preserve_n": 1}));
    let mut e2 = engine(json!({"preserve_n": 1}));
    let c1 = decide(&mut e1, &s);
    let c2 = decide(&mut e2, &s);
    assert_eq!(c1, c2);
    assert_eq!(c1, decide(&mut e1, &s));
    assert_eq!(
        c1.destroys(),
        strs(&["x", "a", "b"]).as_slice(),
        "ties broken by id"
    );
}

#[test]
fn errors_not_initialized_and_duplicate_ids() {
    let mut e = NPreservingEngine::new();
    let mut c = decision_engines::Control::new();
    assert_eq!(
        e.decide(&state_at(0, vec![]), &mut c),
        Err(EngineError::NotInitialized)
    );
    let mut e = engine(json!({"preserve_n": 1}));
    let s = state_at(0, vec![running("a", 0, None), running("a", 1, None)]);
    let err = e.decide(&s, &mut c).unwrap_err();
    assert!(matches!(err, EngineError::InvalidState(_)), "{err}");
    assert!(c.is_empty());
    assert_eq!(e.report().state, EngineState::Error);
}
