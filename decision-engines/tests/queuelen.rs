//! The queuelen engine, driven by explicit timestamps and backlog readings.

mod common;

use common::*;
use decision_engines::{
    Control, DecisionEngine, EngineState, Health, Instance, NodeState, QueueLenEngine, State,
};
use serde_json::{json, Value};

fn base() -> Value {
    json!({
        "queuelen_high_water": 10,
        "queuelen_low_water": 1,
        "min_instances": 0,
        "max_instances": 10,
        "cooldown_up": 10,
        "cooldown_down": 60,
    })
}

fn engine_with(overrides: Value) -> QueueLenEngine {
    let mut c = conf(base());
    for (k, v) in overrides.as_object().expect("object") {
        c.set(k.clone(), v.clone());
    }
    let mut e = QueueLenEngine::new();
    e.initialize(&c).expect("valid config");
    e
}

/// `n` running idle workers launched at t(0).
fn idle(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| running(&format!("w{i}"), 0, Some(0)))
        .collect()
}

fn with_backlog(now: i64, instances: Vec<Instance>, backlog: f64) -> State {
    state_at(now, instances).with_backlog(backlog, t(now))
}

/// A little shell: decide, apply intents, boot everything that was launched.
struct Sim {
    engine: QueueLenEngine,
    state: State,
    seq: u32,
}

impl Sim {
    fn new(engine: QueueLenEngine, instances: Vec<Instance>) -> Self {
        Sim {
            engine,
            state: state_at(0, instances),
            seq: 0,
        }
    }

    /// Decide at `now` with `backlog` (fresh), apply, and (optionally) boot. Returns the
    /// control.
    fn step(&mut self, now: i64, backlog: Option<f64>, boot: bool) -> Control {
        self.state.now = t(now);
        self.state.sensors.backlog = backlog.map(|b| decision_engines::Reading::new(b, t(now)));
        let c = decide(&mut self.engine, &self.state);
        self.state = apply(&self.state, &c, &mut self.seq);
        // Terminations complete at once in this shell.
        self.state
            .instances
            .retain(|i| i.state != NodeState::Terminating);
        if boot {
            boot_all(&mut self.state);
        }
        c
    }

    fn size(&self) -> usize {
        self.state.capacity().count()
    }
}

#[test]
fn grows_by_step_above_high_water() {
    let mut e = engine_with(json!({"scale_up_step": 2}));
    let c = decide(&mut e, &with_backlog(100, idle(2), 11.0));
    assert_eq!(c.launch_count(), 2);
    assert_eq!(e.target(), Some(4));
    assert_eq!(e.report().state, EngineState::Growing);
    // At exactly the high water mark: no growth.
    let mut e = engine_with(json!({}));
    assert!(decide(&mut e, &with_backlog(100, idle(2), 10.0)).is_empty());
}

#[test]
fn backlog_per_worker_grows_by_many_in_one_decision() {
    // (instances, backlog, max, expected launches)
    let table = [
        (1, 95.0, 20, 9),  // ceil(95/10) = 10
        (1, 95.0, 8, 7),   // capped at max 8
        (0, 11.0, 20, 2),  // ceil(11/10) = 2
        (6, 30.0, 20, 1),  // 3 workers "enough", but above high water: one step anyway
        (9, 500.0, 10, 1), // only one slot left
        (10, 500.0, 10, 0),
    ];
    for (n, backlog, max, launches) in table {
        let mut e = engine_with(json!({"backlog_per_worker": 10, "max_instances": max}));
        let s = with_backlog(100, idle(n), backlog);
        let c = decide(&mut e, &s);
        assert_eq!(
            c.launch_count(),
            launches,
            "n={n} backlog={backlog} max={max}"
        );
        assert!(capacity_after(&s, &c) <= max as usize);
    }
}

#[test]
fn never_above_max() {
    let mut sim = Sim::new(
        engine_with(json!({"max_instances": 3, "cooldown_up": 0, "scale_up_step": 5})),
        vec![],
    );
    for now in 0..20 {
        sim.step(now * 100, Some(1000.0), true);
        assert!(sim.size() <= 3, "at step {now}: {}", sim.size());
    }
    assert_eq!(sim.size(), 3);
    let c = sim.step(5000, Some(1000.0), true);
    assert!(c.is_empty());
    assert!(
        c.reasons().iter().any(|r| r.contains("max_instances")),
        "{:?}",
        c.reasons()
    );
}

#[test]
fn counts_booting_instances() {
    let mut e = engine_with(json!({"cooldown_up": 30}));
    let booting: Vec<Instance> = (0..3)
        .map(|i| inst(&format!("b{i}"), NodeState::Pending, Health::Unknown, 95))
        .collect();
    // First decision adopts the 3 booting as the target; it grows by one step only.
    let c = decide(&mut e, &with_backlog(100, booting.clone(), 50.0));
    assert_eq!(c.launch_count(), 1);
    // Same booting set plus the one just requested: within cooldown, no more launches.
    let mut more = booting;
    more.push(inst("b3", NodeState::Requesting, Health::Unknown, 100));
    let c = decide(&mut e, &with_backlog(110, more.clone(), 50.0));
    assert_eq!(c.launch_count(), 0, "{c:?}");
    assert_eq!(e.report().state, EngineState::Growing, "instances booting");
    // Nothing is re-launched for booting workers after the cooldown either beyond one step.
    let c = decide(&mut e, &with_backlog(130, more, 50.0));
    assert_eq!(c.launch_count(), 1);
}

#[test]
fn cooldown_up_respected() {
    let mut sim = Sim::new(engine_with(json!({"cooldown_up": 10})), idle(1));
    // (now, launches expected)
    let table = [
        (100, 1),
        (105, 0),
        (109, 0),
        (110, 1),
        (111, 0),
        (119, 0),
        (120, 1),
    ];
    for (now, launches) in table {
        let c = sim.step(now, Some(50.0), true);
        assert_eq!(c.launch_count(), launches, "at {now}");
    }
    assert_eq!(sim.size(), 4);
}

#[test]
fn cooldown_down_needs_low_for_a_while_and_since_last_change() {
    let mut sim = Sim::new(
        engine_with(json!({"cooldown_down": 60, "cooldown_up": 0})),
        idle(1),
    );
    // Grow to 3 at t=100 and t=101.
    sim.step(100, Some(50.0), true);
    sim.step(101, Some(50.0), true);
    assert_eq!(sim.size(), 3);
    // Backlog drops to 0 at t=120 (low since 120). Last change at 101.
    // (now, backlog, destroys expected)
    let table: Vec<(i64, f64, usize)> = vec![
        (120, 0.0, 0),
        (161, 0.0, 0), // 60 since the last change, but low only for 41
        (179, 0.0, 0),
        (180, 0.0, 1), // low for 60: shrink to 2
        (200, 0.0, 0), // 20 since the last change
        (239, 0.0, 0),
        (240, 0.0, 1), // shrink to 1
        (250, 5.0, 0), // between the marks: low streak broken
        (260, 0.0, 0), // low again since 260
        (319, 0.0, 0),
        (320, 0.0, 1), // shrink to 0 (min 0, backlog 0)
        (400, 0.0, 0),
    ];
    for (now, backlog, destroys) in table {
        let c = sim.step(now, Some(backlog), true);
        assert_eq!(c.destroys().len(), destroys, "at {now}: {:?}", c.reasons());
        assert_eq!(c.launch_count(), 0, "at {now}");
    }
    assert_eq!(sim.size(), 0);
}

#[test]
fn scale_up_resets_the_scale_down_clock() {
    let mut sim = Sim::new(
        engine_with(json!({"cooldown_down": 60, "cooldown_up": 0})),
        idle(3),
    );
    sim.step(0, Some(0.0), true); // low since 0, adopts 3
    sim.step(50, Some(20.0), true); // grows to 4 at 50
    sim.step(55, Some(0.0), true); // low since 55
    let c = sim.step(110, Some(0.0), true);
    assert!(c.destroys().is_empty(), "only 55s of low backlog");
    let c = sim.step(115, Some(0.0), true);
    assert_eq!(c.destroys().len(), 1);
}

#[test]
fn shrinks_to_min_idle_victims_first_then_newest() {
    let workers = vec![
        running("busy-a", 0, Some(2)),
        running("idle-old", 0, Some(0)),
        running("idle-new", 50, Some(0)),
        running("silent", 60, None),
        running("busy-b", 70, Some(1)),
    ];
    let mut e = engine_with(json!({"min_instances": 2, "cooldown_down": 60, "scale_down_step": 1}));
    let mut s = with_backlog(100, workers, 0.0);
    let mut victims = Vec::new();
    for now in [100, 160, 220, 280, 340, 400] {
        s.now = t(now);
        s.sensors.backlog = Some(decision_engines::Reading::new(0.0, t(now)));
        let c = decide(&mut e, &s);
        victims.extend(c.destroys().iter().cloned());
        s.instances.retain(|i| !c.destroys().contains(&i.id));
    }
    assert_eq!(victims, strs(&["idle-new", "idle-old", "silent"]));
    assert_eq!(s.instances.len(), 2, "stops at min_instances");
    assert_eq!(e.target(), Some(2));
}

#[test]
fn scale_down_step_removes_several_victims_in_order() {
    let mut e = engine_with(json!({"scale_down_step": 3, "cooldown_down": 0}));
    let s = with_backlog(
        100,
        vec![
            running("a", 10, Some(1)),
            running("b", 20, Some(0)),
            running("c", 30, Some(0)),
            running("d", 40, None),
            running("e", 50, Some(5)),
        ],
        0.0,
    );
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["c", "b", "d"]).as_slice());
    assert_eq!(e.report().state, EngineState::Shrinking);
}

#[test]
fn never_to_zero_while_work_is_queued() {
    // low water 5: backlog 3 is "low", but there is work, so one worker stays.
    let mut sim = Sim::new(
        engine_with(json!({"queuelen_low_water": 5, "cooldown_down": 0, "cooldown_up": 0})),
        idle(3),
    );
    for now in 0..10 {
        sim.step(now * 100, Some(3.0), true);
    }
    assert_eq!(sim.size(), 1);
    // Work gone: now it may go to zero.
    sim.step(2000, Some(0.0), true);
    assert_eq!(sim.size(), 0);
    // Work appears below the high water mark: one worker starts at once.
    let c = sim.step(2001, Some(2.0), true);
    assert_eq!(c.launch_count(), 1);
    assert!(
        c.reasons().iter().any(|r| r.contains("work is queued")),
        "{:?}",
        c.reasons()
    );
}

#[test]
fn stale_reading_does_not_shrink_or_grow() {
    let mut e = engine_with(json!({"cooldown_down": 0, "sensor_stale_secs": 60}));
    // Reading at t=0, decisions at t=61+: stale.
    let s = state_at(100, idle(4)).with_backlog(0.0, t(0));
    let c = decide(&mut e, &s);
    assert!(c.is_empty(), "{c:?}");
    assert!(c.reasons().iter().any(|r| r.contains("stale")));
    let s = state_at(200, idle(4)).with_backlog(1000.0, t(0));
    assert!(decide(&mut e, &s).is_empty());
    // Exactly sensor_stale_secs old is still fresh.
    let s = state_at(260, idle(4)).with_backlog(0.0, t(200));
    assert_eq!(decide(&mut e, &s).destroys().len(), 1);
    assert_eq!(e.report().detail["backlog"]["status"], "fresh");
}

#[test]
fn stale_reading_with_work_keeps_one() {
    let mut e = engine_with(json!({}));
    let s = state_at(1000, vec![]).with_backlog(4.0, t(0));
    assert_eq!(decide(&mut e, &s).launch_count(), 1);
}

#[test]
fn no_reading_only_enforces_min_and_max() {
    // (instances, min, max, launches, destroys)
    let table = [
        (0, 2, 5, 2, 0),
        (3, 2, 5, 0, 0),
        (7, 2, 5, 0, 2),
        (0, 0, 5, 0, 0),
    ];
    for (n, min, max, launches, destroys) in table {
        let mut e = engine_with(json!({"min_instances": min, "max_instances": max}));
        let c = decide(&mut e, &state_at(100, idle(n)));
        assert_eq!(c.launch_count(), launches, "n={n} min={min} max={max}");
        assert_eq!(c.destroys().len(), destroys, "n={n} min={min} max={max}");
    }
}

#[test]
fn does_not_add_busy_jobs_to_the_backlog() {
    // The backlog already counts held jobs: 10 is not above high water 10 even though
    // every worker reports being busy.
    let mut e = engine_with(json!({}));
    let busy: Vec<Instance> = (0..3)
        .map(|i| running(&format!("b{i}"), 0, Some(5)))
        .collect();
    assert!(decide(&mut e, &with_backlog(100, busy, 10.0)).is_empty());
}

#[test]
fn unhealthy_replaced_within_max() {
    let kinds = [
        (NodeState::Running, Health::Missing),
        (NodeState::Running, Health::Zombie),
        (NodeState::Running, Health::ProcessError),
        (NodeState::RunningFailed, Health::Ok),
    ];
    for (st, h) in kinds {
        let mut e = engine_with(json!({"max_instances": 3}));
        let mut v = idle(2);
        v.push(inst("sick", st, h, 0));
        let s = with_backlog(100, v, 5.0);
        let c = decide(&mut e, &s);
        assert_eq!(c.destroys(), strs(&["sick"]).as_slice(), "{st} {h}");
        assert_eq!(
            c.launch_count(),
            1,
            "{st} {h}: replaced in the same decision"
        );
        assert_eq!(capacity_after(&s, &c), 3);
    }
    // Over max with an unhealthy one: destroyed, not replaced.
    let mut e = engine_with(json!({"max_instances": 2}));
    let mut v = idle(2);
    v.push(inst("sick", NodeState::Running, Health::Missing, 0));
    let s = with_backlog(100, v, 5.0);
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["sick"]).as_slice());
    assert_eq!(c.launch_count(), 0);
}

#[test]
fn failed_launches_are_relaunched_after_backoff() {
    // Target 2; one launch fails (disappears as FAILED): the engine remembers the target
    // and relaunches once the backoff has passed.
    let mut e = engine_with(json!({"min_instances": 2, "backoff_initial_secs": 10}));
    let c = decide(&mut e, &state_at(0, vec![]));
    assert_eq!(c.launch_count(), 2);
    let mut s = state_at(
        30,
        vec![
            running("ok", 0, Some(0)),
            inst("bad", NodeState::Failed, Health::Unknown, 0),
        ],
    )
    .with_launch_failures(1, t(25));
    assert_eq!(decide(&mut e, &s).launch_count(), 0);
    assert_eq!(e.report().state, EngineState::BackingOff);
    s.now = t(35);
    assert_eq!(decide(&mut e, &s).launch_count(), 1);
}

#[test]
fn backoff_holds_launches_and_growth_but_not_destroys() {
    let mut e = engine_with(json!({"cooldown_up": 0}));
    let mut v = idle(2);
    v.push(inst("sick", NodeState::Running, Health::Missing, 0));
    let s = with_backlog(100, v, 50.0).with_launch_failures(2, t(95));
    let c = decide(&mut e, &s);
    assert_eq!(c.destroys(), strs(&["sick"]).as_slice());
    assert_eq!(c.launch_count(), 0);
    assert_eq!(e.report().state, EngineState::BackingOff);
    assert_eq!(e.target(), Some(3), "no growth while backing off");
    // Backoff over (2 failures: 20s after t=95).
    let s = with_backlog(115, idle(2), 50.0).with_launch_failures(2, t(95));
    let c = decide(&mut e, &s);
    assert_eq!(c.launch_count(), 2, "replacement plus one step");
    assert_eq!(e.target(), Some(4));
}

#[test]
fn reconfigure_bounds_apply_at_once() {
    let mut e = engine_with(json!({"max_instances": 10}));
    let s = with_backlog(100, idle(6), 5.0);
    assert!(decide(&mut e, &s).is_empty());
    e.reconfigure(&conf(json!({"max_instances": 4}))).unwrap();
    let c = decide(&mut e, &with_backlog(101, idle(6), 5.0));
    assert_eq!(c.destroys().len(), 2);
    e.reconfigure(&conf(json!({"min_instances": 8, "max_instances": 9})))
        .unwrap();
    let c = decide(&mut e, &with_backlog(102, idle(4), 5.0));
    assert_eq!(c.launch_count(), 4);
}

#[test]
fn adopts_existing_pool_including_unhealthy() {
    // A restart: 3 healthy + 1 missing. The target is 4; the missing one is replaced.
    let mut e = engine_with(json!({}));
    let mut v = idle(3);
    v.push(inst("m", NodeState::Running, Health::Missing, 0));
    let c = decide(&mut e, &state_at(100, v));
    assert_eq!(c.destroys(), strs(&["m"]).as_slice());
    assert_eq!(c.launch_count(), 1);
    assert_eq!(e.target(), Some(4));
}

#[test]
fn odd_readings() {
    let mut e = engine_with(json!({"min_instances": 1}));
    for v in [f64::NAN, f64::INFINITY, -5.0] {
        let c = decide(&mut e, &with_backlog(100, idle(1), v));
        assert!(c.is_empty(), "{v}: {c:?}");
    }
}

#[test]
fn report_detail() {
    let mut e = engine_with(json!({}));
    decide(&mut e, &with_backlog(100, idle(2), 50.0));
    let r = e.report();
    assert_eq!(r.detail["target"], 3);
    assert_eq!(r.detail["healthy"], 2);
    assert_eq!(r.detail["launched"], 1);
    assert_eq!(r.detail["backlog"]["value"], 50.0);
    assert_eq!(r.detail["config"]["max_instances"], 10);
    assert_eq!(serde_json::to_value(r.state).unwrap(), "GROWING");
}

#[test]
fn same_history_same_decisions() {
    let run = || {
        let mut sim = Sim::new(
            engine_with(json!({"cooldown_up": 5, "backlog_per_worker": 4})),
            idle(1),
        );
        let mut out = Vec::new();
        for (i, b) in [0.0, 40.0, 40.0, 12.0, 0.0, 0.0, 0.0, 3.0, 100.0]
            .iter()
            .enumerate()
        {
            out.push(sim.step(i as i64 * 30, Some(*b), i % 2 == 0));
        }
        out
    };
    assert_eq!(run(), run());
}
