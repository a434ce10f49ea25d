//! Configuration parsing and validation: every refused value names its key; refused
//! reconfigurations leave the engine as it was.

mod common;

use common::*;
use decision_engines::{
    ConfigError, ConfigErrorKind, DecisionEngine, EngineConfig, NPreservingConfig,
    NPreservingEngine, QueueLenConfig, QueueLenEngine,
};
use serde_json::{json, Value};

fn ql_base() -> Value {
    json!({
        "queuelen_high_water": 10,
        "queuelen_low_water": 2,
        "min_instances": 1,
        "max_instances": 5,
    })
}

fn with(base: Value, key: &str, v: Value) -> EngineConfig {
    let mut c = conf(base);
    c.set(key, v);
    c
}

fn ql_err(c: &EngineConfig) -> ConfigError {
    QueueLenConfig::from_config(c).expect_err("refused")
}

fn np_err(c: &EngineConfig) -> ConfigError {
    NPreservingConfig::from_config(c).expect_err("refused")
}

#[test]
fn display_names_the_key() {
    let e = np_err(&conf(json!({"preserve_n": -1})));
    assert_eq!(
        e.to_string(),
        r#"invalid value for "preserve_n": expected a non-negative integer, got -1"#
    );
    assert_eq!(
        (e.key.as_str(), e.kind),
        ("preserve_n", ConfigErrorKind::InvalidValue)
    );

    let e = np_err(&conf(json!({"preserve_n": 1, "preserv_n": 2})));
    assert_eq!(e.kind, ConfigErrorKind::UnknownKey);
    assert_eq!(e.key, "preserv_n");
    assert!(
        e.to_string()
            .starts_with(r#"unknown config key "preserv_n"; known keys: preserve_n,"#),
        "{e}"
    );

    let e = np_err(&conf(json!({})));
    assert_eq!(e.kind, ConfigErrorKind::MissingKey);
    assert_eq!(e.key, "preserve_n");
    assert!(e
        .to_string()
        .starts_with(r#"missing required config key "preserve_n""#));

    let e = EngineConfig::from_json(json!([1, 2])).unwrap_err();
    assert!(e.to_string().contains("expected an object"), "{e}");
}

#[test]
fn queuelen_bad_values_name_the_key() {
    // (key, value, expected message fragment)
    let table: Vec<(&str, Value, &str)> = vec![
        (
            "queuelen_high_water",
            json!(-1),
            "non-negative integer, got -1",
        ),
        ("queuelen_high_water", json!("lots"), r#"got "lots""#),
        ("queuelen_high_water", json!(2.5), "got 2.5"),
        ("queuelen_high_water", json!([10]), "got [10]"),
        ("queuelen_low_water", json!(-3), "got -3"),
        (
            "queuelen_low_water",
            json!(11),
            "must not exceed queuelen_high_water (10), got 11",
        ),
        ("min_instances", json!(-1), "got -1"),
        ("min_instances", json!(6), ""), // reported on max_instances below
        ("max_instances", json!(-5), "got -5"),
        ("max_instances", json!(0), "at least 1, got 0"),
        ("max_instances", json!(1e12), "no greater than 4294967295"),
        ("cooldown_up", json!(-10), "got -10"),
        ("cooldown_down", json!("soon"), r#"got "soon""#),
        ("cooldown_down", json!(u64::MAX), "at most"),
        ("scale_up_step", json!(0), "at least 1, got 0"),
        ("scale_down_step", json!(0), "at least 1, got 0"),
        ("backlog_per_worker", json!(0), "at least 1, got 0"),
        ("backlog_per_worker", json!(-2), "got -2"),
        ("sensor_stale_secs", json!(0), "at least 1, got 0"),
        ("backoff_initial_secs", json!(-1), "got -1"),
        (
            "backoff_max_secs",
            json!(5),
            "at least backoff_initial_secs (10), got 5",
        ),
        ("backoff_max_secs", json!(true), "got true"),
    ];
    for (key, value, fragment) in table {
        let e = ql_err(&with(ql_base(), key, value.clone()));
        let expected_key = if key == "min_instances" && value == json!(6) {
            "max_instances"
        } else {
            key
        };
        assert_eq!(e.key, expected_key, "{key}={value}: {e}");
        assert_eq!(e.kind, ConfigErrorKind::InvalidValue, "{key}={value}: {e}");
        assert!(e.to_string().contains(fragment), "{key}={value}: {e}");
        assert!(
            e.to_string().contains(&format!("\"{expected_key}\"")),
            "{e}"
        );
    }
    // min > max is reported on max with both values.
    let e = ql_err(&with(ql_base(), "min_instances", json!(6)));
    assert!(
        e.to_string().contains("at least min_instances (6), got 5"),
        "{e}"
    );
}

#[test]
fn queuelen_missing_and_unknown_keys() {
    for key in ["queuelen_high_water", "queuelen_low_water", "max_instances"] {
        let mut c = conf(ql_base());
        c.remove(key);
        let e = ql_err(&c);
        assert_eq!(
            (e.key.as_str(), e.kind),
            (key, ConfigErrorKind::MissingKey),
            "{e}"
        );
    }
    let e = ql_err(&with(ql_base(), "cooldown", json!(5)));
    assert_eq!(
        (e.key.as_str(), e.kind),
        ("cooldown", ConfigErrorKind::UnknownKey)
    );
    assert!(
        e.to_string().contains("cooldown_up"),
        "lists the known keys: {e}"
    );
    // null means unset: a default applies, or a required key is missing.
    let c = with(ql_base(), "cooldown_up", Value::Null);
    assert_eq!(
        QueueLenConfig::from_config(&c).unwrap().cooldown_up_secs,
        10
    );
}

#[test]
fn queuelen_defaults_and_lenient_forms() {
    let c = QueueLenConfig::from_config(&conf(json!({
        "queuelen_high_water": "10",
        "queuelen_low_water": " 2 ",
        "max_instances": 5.0,
    })))
    .unwrap();
    assert_eq!((c.high_water, c.low_water, c.max_instances), (10, 2, 5));
    assert_eq!(c.min_instances, 0);
    assert_eq!((c.cooldown_up_secs, c.cooldown_down_secs), (10, 60));
    assert_eq!((c.scale_up_step, c.scale_down_step), (1, 1));
    assert_eq!(c.backlog_per_worker, None);
    assert_eq!(c.sensor_stale_secs, 60);
    assert_eq!((c.backoff.initial_secs, c.backoff.max_secs), (10, 300));

    // low == high is allowed; max == min is allowed.
    let c = QueueLenConfig::from_config(&conf(json!({
        "queuelen_high_water": 4, "queuelen_low_water": 4,
        "min_instances": 3, "max_instances": 3,
    })))
    .unwrap();
    assert_eq!((c.low_water, c.min_instances), (4, 3));

    // From command-line assignments.
    let c = EngineConfig::from_assignments([
        "queuelen_high_water=10",
        "queuelen_low_water=1",
        "max_instances=4",
        "backlog_per_worker=5",
    ])
    .unwrap();
    let q = QueueLenConfig::from_config(&c).unwrap();
    assert_eq!(q.backlog_per_worker, Some(5));
    let e = EngineConfig::from_assignments(["max_instances"]).unwrap_err();
    assert_eq!(e.key, "max_instances");
}

#[test]
fn backoff_initial_above_default_max_raises_the_default_cap() {
    let c = with(ql_base(), "backoff_initial_secs", json!(600));
    let q = QueueLenConfig::from_config(&c).unwrap();
    assert_eq!((q.backoff.initial_secs, q.backoff.max_secs), (600, 600));
}

#[test]
fn npreserving_bad_values_name_the_key() {
    let table: Vec<(Value, &str, &str)> = vec![
        (json!({"preserve_n": -1}), "preserve_n", "got -1"),
        (
            json!({"preserve_n": "three"}),
            "preserve_n",
            r#"got "three""#,
        ),
        (json!({"preserve_n": 1.5}), "preserve_n", "got 1.5"),
        (json!({"preserve_n": null}), "preserve_n", "missing"),
        (
            json!({"preserve_n": 2, "backoff_initial_secs": "x"}),
            "backoff_initial_secs",
            r#"got "x""#,
        ),
        (
            json!({"preserve_n": 2, "backoff_max_secs": 1}),
            "backoff_max_secs",
            "at least",
        ),
        (
            json!({"preserve_n": 2, "max_instances": 1}),
            "max_instances",
            "unknown config key",
        ),
        (json!({"unique_instances": 5}), "unique_instances", "got 5"),
        (
            json!({"unique_instances": ["a", "a"]}),
            "unique_instances",
            "given twice",
        ),
        (
            json!({"unique_instances": ["a", ""]}),
            "unique_instances",
            "must not be empty",
        ),
        (
            json!({"unique_instances": [7]}),
            "unique_instances",
            "got 7",
        ),
        (
            json!({"unique_instances": {"a": {"x": [1]}}}),
            "unique_instances",
            r#"variable "x""#,
        ),
        (
            json!({"unique_instances": {"a": 3}}),
            "unique_instances",
            "must be a map",
        ),
        (
            json!({"unique_instances": "{not json"}),
            "unique_instances",
            "does not parse",
        ),
        (
            json!({"unique_instances": ["a", "b"], "preserve_n": 3}),
            "preserve_n",
            "must equal the number of unique_instances (2) or be omitted, got 3",
        ),
    ];
    for (c, key, fragment) in table {
        let e = np_err(&conf(c.clone()));
        assert_eq!(e.key, key, "{c}: {e}");
        assert!(e.to_string().contains(fragment), "{c}: {e}");
    }
}

#[test]
fn npreserving_unique_instance_forms() {
    let forms = [
        json!({"unique_instances": {"a": {"role": "x", "n": 2, "on": true}, "b": null}}),
        json!({"unique_instances": [{"key": "a", "vars": {"role": "x", "n": 2, "on": true}}, "b"]}),
        json!({"unique_instances": r#"{"a": {"role": "x", "n": 2, "on": true}, "b": {}}"#, "preserve_n": "2"}),
    ];
    for f in forms {
        let c = NPreservingConfig::from_config(&conf(f.clone())).unwrap();
        assert_eq!(c.preserve_n, 2, "{f}");
        let u = c.unique_instances.unwrap();
        assert_eq!(u.keys().collect::<Vec<_>>(), ["a", "b"], "{f}");
        assert_eq!(u["a"]["role"], "x");
        assert_eq!(u["a"]["n"], "2");
        assert_eq!(u["a"]["on"], "true");
        assert!(u["b"].is_empty());
    }
    let c = NPreservingConfig::from_config(&conf(json!({"unique_instances": "x, y,z"}))).unwrap();
    assert_eq!(c.preserve_n, 3);
    assert_eq!(
        c.unique_instances.unwrap().keys().collect::<Vec<_>>(),
        ["x", "y", "z"]
    );
}

#[test]
fn npreserving_refused_reconfigure_keeps_old_config() {
    let mut e = NPreservingEngine::new();
    e.initialize(&conf(json!({"preserve_n": 3}))).unwrap();
    for bad in [
        json!({"preserve_n": -1}),
        json!({"preserve_n": 5, "bogus": 1}),
        json!({"backoff_max_secs": 1}),
        json!({"preserve_n": null}),
    ] {
        let err = e.reconfigure(&conf(bad.clone())).unwrap_err();
        assert!(!err.key.is_empty(), "{bad}");
        assert_eq!(e.config().unwrap().preserve_n, 3, "{bad}");
        assert_eq!(e.raw_config().unwrap(), &conf(json!({"preserve_n": 3})));
        // And it still behaves per the old config.
        let c = decide(&mut e, &state_at(0, vec![]));
        assert_eq!(c.launch_count(), 3, "after refused {bad}");
    }
    // A good partial reconfigure merges.
    e.reconfigure(&conf(json!({"preserve_n": "5"}))).unwrap();
    e.reconfigure(&conf(json!({"backoff_initial_secs": 1})))
        .unwrap();
    assert_eq!(e.config().unwrap().preserve_n, 5);
    assert_eq!(e.config().unwrap().backoff.initial_secs, 1);
    let c = decide(&mut e, &state_at(0, vec![]));
    assert_eq!(c.launch_count(), 5);
    // null resets a key to its default.
    e.reconfigure(&conf(json!({"backoff_initial_secs": null})))
        .unwrap();
    assert_eq!(e.config().unwrap().backoff.initial_secs, 10);
    assert!(!e.raw_config().unwrap().contains_key("backoff_initial_secs"));
}

#[test]
fn queuelen_refused_reconfigure_keeps_old_config() {
    let mut e = QueueLenEngine::new();
    e.initialize(&conf(json!({
        "queuelen_high_water": 10, "queuelen_low_water": 2,
        "min_instances": 0, "max_instances": 3, "cooldown_up": 0,
        "backlog_per_worker": 1,
    })))
    .unwrap();
    let before = e.raw_config().unwrap().clone();
    for bad in [
        json!({"queuelen_low_water": 20}),
        json!({"max_instances": 10, "min_instances": 20}),
        json!({"max_instances": -1}),
        json!({"max_instances": 10, "scale_up_step": 0}),
        json!({"max_instances": 10, "unknown": true}),
    ] {
        let err = e.reconfigure(&conf(bad.clone())).unwrap_err();
        assert!(!err.key.is_empty());
        assert_eq!(e.raw_config().unwrap(), &before, "{bad}");
    }
    // Still capped at the old max of 3 even though some refused configs said 10.
    let s = state_at(0, vec![]).with_backlog(100.0, t(0));
    let c = decide(&mut e, &s);
    assert_eq!(c.launch_count(), 3);
    // A good partial reconfigure raises max and keeps the rest.
    e.reconfigure(&conf(json!({"max_instances": "6"}))).unwrap();
    let q = e.config().unwrap();
    assert_eq!((q.max_instances, q.high_water, q.low_water), (6, 10, 2));
    assert_eq!(
        e.raw_config().unwrap(),
        &before.merged(&conf(json!({"max_instances": "6"})))
    );
}

#[test]
fn reconfigure_before_initialize_is_a_full_config() {
    let mut e = NPreservingEngine::new();
    assert_eq!(
        e.reconfigure(&conf(json!({}))).unwrap_err().key,
        "preserve_n"
    );
    e.reconfigure(&conf(json!({"preserve_n": 1}))).unwrap();
    assert_eq!(decide(&mut e, &state_at(0, vec![])).launch_count(), 1);
}

#[test]
fn merged_semantics() {
    let base = conf(json!({"a": 1, "b": 2}));
    let m = base.merged(&conf(json!({"b": 3, "c": 4, "a": null})));
    assert_eq!(m, conf(json!({"b": 3, "c": 4})));
    assert_eq!(base.merged(&EngineConfig::new()), base);
}
