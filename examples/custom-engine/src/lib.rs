//! A custom decision engine: `backlog_ratio` keeps one worker per
//! `jobs_per_worker` queued jobs, between `min_instances` and `max_instances`,
//! with no cooldowns. Small on purpose: it shows the whole contract.
//!
//! ```toml
//! # policy file
//! name = "batch"
//! engine = "backlog_ratio"
//! [engine_conf]
//! jobs_per_worker = 10
//! min_instances = 1
//! max_instances = 20
//! [deployable]
//! driver = "local"
//! command = "epu-agent"
//! args = ["--", "./worker.sh"]
//! ```
#![forbid(unsafe_code)]

use decision_engines::{
    victim_order, ConfigError, Control, DecisionEngine, EngineConfig, EngineError, EngineReport,
    EngineState, LaunchSpec, Registry, RegistryError, State,
};
use serde_json::json;

/// The engine's name in policy files.
pub const NAME: &str = "backlog_ratio";

const KEYS: &[&str] = &["jobs_per_worker", "min_instances", "max_instances"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    jobs_per_worker: u64,
    min: u64,
    max: u64,
}

impl Settings {
    fn parse(conf: &EngineConfig) -> Result<Self, ConfigError> {
        conf.ensure_known_keys(KEYS)?;
        let jobs_per_worker = conf.require_u64("jobs_per_worker")?;
        if jobs_per_worker == 0 {
            return Err(ConfigError::invalid(
                "jobs_per_worker",
                "must be at least 1",
            ));
        }
        let min = conf.get_u64("min_instances")?.unwrap_or(0);
        let max = conf.require_u64("max_instances")?;
        if max < min.max(1) {
            return Err(ConfigError::invalid(
                "max_instances",
                format!("must be at least 1 and at least min_instances ({min})"),
            ));
        }
        Ok(Settings {
            jobs_per_worker,
            min,
            max,
        })
    }
}

/// The engine. It keeps its config and the target of its last decision.
#[derive(Debug, Default)]
pub struct BacklogRatio {
    conf: EngineConfig,
    settings: Option<Settings>,
    last_target: Option<u64>,
}

impl DecisionEngine for BacklogRatio {
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        self.settings = Some(Settings::parse(conf)?);
        self.conf = conf.clone();
        Ok(())
    }

    fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError> {
        let s = self.settings.ok_or(EngineError::NotInitialized)?;
        // Unhealthy instances go first, whatever the backlog.
        let sick: Vec<String> = state
            .instances
            .iter()
            .filter(|i| i.needs_termination())
            .map(|i| i.id.clone())
            .collect();
        let mut capacity: Vec<_> = state.capacity().collect();
        let backlog = state
            .sensors
            .backlog
            .map(|r| r.value.max(0.0))
            .unwrap_or(0.0);
        let target = ((backlog / s.jobs_per_worker as f64).ceil() as u64).clamp(s.min, s.max);
        let have = capacity.len() as u64;
        if !sick.is_empty() {
            control.reason(format!("{} unhealthy", sick.len()));
            control.destroy(sick);
        }
        if have < target {
            control.launch((target - have) as u32, LaunchSpec::default());
            control.reason(format!("backlog {backlog} wants {target}, have {have}"));
        } else if have > target {
            capacity.sort_by(|a, b| victim_order(a, b));
            let victims = capacity
                .iter()
                .take((have - target) as usize)
                .map(|i| i.id.clone())
                .collect();
            control.destroy(victims);
            control.reason(format!("backlog {backlog} wants {target}, have {have}"));
        }
        self.last_target = Some(target);
        Ok(())
    }

    fn reconfigure(&mut self, partial: &EngineConfig) -> Result<(), ConfigError> {
        let merged = self.conf.merged(partial);
        let settings = Settings::parse(&merged)?;
        self.settings = Some(settings);
        self.conf = merged;
        Ok(())
    }

    fn report(&self) -> EngineReport {
        match self.settings {
            None => EngineReport::pending(),
            Some(_) => EngineReport::new(
                EngineState::Stable,
                json!({ "target": self.last_target, "config": self.conf }),
            ),
        }
    }
}

/// The built-in engines plus this one.
pub fn registry() -> Result<Registry, RegistryError> {
    let mut r = Registry::with_builtins();
    r.register(NAME, || Box::new(BacklogRatio::default()))?;
    Ok(r)
}
