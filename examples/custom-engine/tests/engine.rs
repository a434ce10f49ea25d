use chrono::{TimeZone, Utc};
use custom_engine::{registry, NAME};
use decision_engines::{Control, EngineConfig, Instance, NodeState, State};
use serde_json::json;

fn conf(v: serde_json::Value) -> EngineConfig {
    EngineConfig::from_json(v).expect("object")
}

#[test]
fn registers_and_decides_through_the_registry() {
    let reg = registry().expect("registers");
    assert!(reg.names().contains(&NAME));
    let mut engine = reg
        .create(
            NAME,
            &conf(json!({"jobs_per_worker": 10, "min_instances": 1, "max_instances": 5})),
        )
        .expect("valid config");
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("time");
    let state = State::new("batch", t0)
        .with_instance(Instance::new("a", NodeState::Running, t0))
        .with_backlog(35.0, t0);
    let mut c = Control::new();
    engine.decide(&state, &mut c).expect("decides");
    assert_eq!(
        c.launch_count(),
        3,
        "35 jobs / 10 per worker = 4 workers; 1 running"
    );
    // Over max: capped.
    let state = State::new("batch", t0).with_backlog(1000.0, t0);
    let mut c = Control::new();
    engine.decide(&state, &mut c).expect("decides");
    assert_eq!(c.launch_count(), 5);
    // Drained: back to min, newest first.
    let t1 = t0 + chrono::TimeDelta::seconds(10);
    let state = State::new("batch", t1)
        .with_instance(Instance::new("old", NodeState::Running, t0))
        .with_instance(Instance::new("new", NodeState::Running, t1))
        .with_backlog(0.0, t1);
    let mut c = Control::new();
    engine.decide(&state, &mut c).expect("decides");
    assert_eq!(c.destroys(), ["new".to_string()]);
}

#[test]
fn bad_config_is_refused_naming_the_key_and_reconfigure_keeps_the_old_one() {
    let reg = registry().expect("registers");
    let Err(err) = reg.create(
        NAME,
        &conf(json!({"jobs_per_worker": 0, "max_instances": 5})),
    ) else {
        panic!("jobs_per_worker = 0 was accepted");
    };
    assert!(err.to_string().contains("jobs_per_worker"), "{err}");
    let mut engine = reg
        .create(
            NAME,
            &conf(json!({"jobs_per_worker": 10, "max_instances": 5})),
        )
        .expect("valid");
    let err = engine
        .reconfigure(&conf(json!({"max_instances": 0})))
        .expect_err("refused");
    assert!(err.to_string().contains("max_instances"), "{err}");
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("time");
    let mut c = Control::new();
    engine
        .decide(&State::new("b", t0).with_backlog(100.0, t0), &mut c)
        .expect("decides");
    assert_eq!(c.launch_count(), 5, "old max_instances still in force");
}
