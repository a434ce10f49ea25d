//! Helpers shared by the integration tests: a fixed clock, instance builders, and a tiny
//! "shell" that applies a decision's intents to a state the way the controller does.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, Utc};
use decision_engines::{Control, DecisionEngine, EngineConfig, Health, Instance, NodeState, State};
use serde_json::Value;

/// The test epoch plus `secs` seconds.
pub fn t(secs: i64) -> DateTime<Utc> {
    let base: DateTime<Utc> = "2024-05-01T00:00:00Z".parse().expect("valid timestamp");
    base + TimeDelta::seconds(secs)
}

pub fn conf(v: Value) -> EngineConfig {
    EngineConfig::from_json(v).expect("an object")
}

/// A RUNNING, OK instance launched at `t(launched)` with the given busyness.
pub fn running(id: &str, launched: i64, busy: Option<u32>) -> Instance {
    Instance::new(id, NodeState::Running, t(launched))
        .with_health(Health::Ok)
        .with_busy(busy)
}

/// An instance in `state` with `health`, launched at `t(launched)`.
pub fn inst(id: &str, state: NodeState, health: Health, launched: i64) -> Instance {
    Instance::new(id, state, t(launched)).with_health(health)
}

pub fn state_at(now: i64, instances: Vec<Instance>) -> State {
    let mut s = State::new("test-domain", t(now));
    s.instances = instances;
    s
}

pub fn decide(engine: &mut dyn DecisionEngine, state: &State) -> Control {
    let mut c = Control::new();
    engine.decide(state, &mut c).expect("decide succeeds");
    c
}

/// Apply intents as the controller would: destroyed instances become TERMINATING,
/// launches appear as REQUESTING with fresh ids `l<seq>`, carrying their unique key.
pub fn apply(state: &State, control: &Control, seq: &mut u32) -> State {
    let mut next = state.clone();
    for i in &mut next.instances {
        if control.destroys().contains(&i.id) && i.state < NodeState::Terminating {
            i.state = NodeState::Terminating;
        }
    }
    for l in control.launches() {
        for _ in 0..l.count {
            *seq += 1;
            let mut i = Instance::new(format!("l{seq}"), NodeState::Requesting, state.now);
            i.unique_key = l.spec.unique_key.clone();
            next.instances.push(i);
        }
    }
    next
}

/// Mark every booting instance RUNNING and OK, idle.
pub fn boot_all(state: &mut State) {
    for i in &mut state.instances {
        if i.state.is_booting() {
            i.state = NodeState::Running;
            i.health = Health::Ok;
            i.busy = Some(0);
        }
    }
}

/// Healthy live instances after applying the intents.
pub fn capacity_after(state: &State, control: &Control) -> usize {
    state
        .capacity()
        .filter(|i| !control.destroys().contains(&i.id))
        .count()
        + control.launch_count() as usize
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
