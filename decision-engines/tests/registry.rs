//! The engine registry.

mod common;

use common::*;
use decision_engines::{
    ConfigError, Control, DecisionEngine, EngineConfig, EngineError, EngineReport, EngineState,
    LaunchSpec, Registry, RegistryError, State,
};
use serde_json::json;

#[test]
fn builtins_are_registered() {
    let r = Registry::with_builtins();
    assert_eq!(r.names(), ["npreserving", "queuelen"]);
    assert!(r.contains("npreserving") && r.contains("queuelen"));
    let mut e = r
        .create("npreserving", &conf(json!({"preserve_n": 2})))
        .unwrap();
    assert_eq!(decide(e.as_mut(), &state_at(0, vec![])).launch_count(), 2);
    let mut e = r
        .create(
            "queuelen",
            &conf(json!({"queuelen_high_water": 5, "queuelen_low_water": 0, "max_instances": 3, "min_instances": 1})),
        )
        .unwrap();
    assert_eq!(decide(e.as_mut(), &state_at(0, vec![])).launch_count(), 1);
    assert!(Registry::new().names().is_empty());
}

#[test]
fn unknown_engine_lists_known_names() {
    let r = Registry::with_builtins();
    let err = r
        .create("nprserving", &EngineConfig::new())
        .err()
        .expect("refused");
    assert_eq!(
        err,
        RegistryError::UnknownEngine {
            name: "nprserving".into(),
            known: vec!["npreserving".into(), "queuelen".into()],
        }
    );
    assert_eq!(
        err.to_string(),
        r#"unknown decision engine "nprserving"; known engines: npreserving, queuelen"#
    );
}

#[test]
fn create_with_bad_config_names_engine_and_key() {
    let r = Registry::with_builtins();
    let err = r
        .create(
            "queuelen",
            &conf(json!({"queuelen_high_water": 1, "queuelen_low_water": 2, "max_instances": 1})),
        )
        .err()
        .expect("refused");
    match &err {
        RegistryError::Config { engine, source } => {
            assert_eq!(engine, "queuelen");
            assert_eq!(source.key, "queuelen_low_water");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string()
            .contains(r#"decision engine "queuelen": invalid value for "queuelen_low_water""#),
        "{err}"
    );
}

/// A user engine: destroys everything, for the test.
#[derive(Default)]
struct Reaper {
    runs: u32,
}

impl DecisionEngine for Reaper {
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        conf.ensure_known_keys(&[])
    }
    fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError> {
        self.runs += 1;
        control.destroy(state.instances.iter().map(|i| i.id.clone()).collect());
        control.launch(0, LaunchSpec::default());
        Ok(())
    }
    fn reconfigure(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        conf.ensure_known_keys(&[])
    }
    fn report(&self) -> EngineReport {
        EngineReport::new(EngineState::Stable, json!({"runs": self.runs}))
    }
}

#[test]
fn custom_registration() {
    let mut r = Registry::with_builtins();
    r.register("reaper", || Box::new(Reaper::default()))
        .unwrap();
    assert_eq!(r.names(), ["npreserving", "queuelen", "reaper"]);
    let mut e = r.create("reaper", &EngineConfig::new()).unwrap();
    let c = decide(e.as_mut(), &state_at(0, vec![running("a", 0, None)]));
    assert_eq!(c.destroys(), strs(&["a"]).as_slice());
    assert_eq!(e.report().detail["runs"], 1);
    // Each create is a fresh engine.
    let e2 = r.create("reaper", &EngineConfig::new()).unwrap();
    assert_eq!(e2.report().detail["runs"], 0);
    // Its config errors surface too.
    let err = r.create("reaper", &conf(json!({"x": 1}))).err().unwrap();
    assert!(matches!(err, RegistryError::Config { ref source, .. } if source.key == "x"));
}

#[test]
fn duplicate_and_empty_names_refused() {
    let mut r = Registry::with_builtins();
    assert_eq!(
        r.register("queuelen", || Box::new(Reaper::default())),
        Err(RegistryError::DuplicateName("queuelen".into()))
    );
    r.register("mine", || Box::new(Reaper::default())).unwrap();
    assert!(matches!(
        r.register("mine", || Box::new(Reaper::default())),
        Err(RegistryError::DuplicateName(_))
    ));
    assert!(matches!(
        r.register(" ", || Box::new(Reaper::default())),
        Err(RegistryError::InvalidName(_))
    ));
    // The builtin is untouched.
    let e = r.create(
        "queuelen",
        &conf(json!({"queuelen_high_water": 1, "queuelen_low_water": 0, "max_instances": 1})),
    );
    assert!(e.is_ok());
}

#[test]
fn registry_is_shareable() {
    let r = std::sync::Arc::new(Registry::with_builtins());
    let r2 = r.clone();
    let h = std::thread::spawn(move || {
        r2.create("npreserving", &conf(json!({"preserve_n": 1})))
            .is_ok()
    });
    assert!(h.join().unwrap());
    assert!(format!("{r:?}").contains("npreserving"));
}
