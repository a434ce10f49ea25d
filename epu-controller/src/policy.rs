//! Domain policies: what a domain is (engine, its config, what to launch, how to
//! judge health, where its work queue is), loaded from TOML/YAML policy files or
//! sent with `add_domain`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use decision_engines::{EngineConfig, Registry};
use epu_model::messages::Deployable;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One domain's definition. In a policy file the engine's settings sit under
/// `[engine_conf]` (TOML) / `engine_conf:` (YAML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// `[a-z0-9_-]{1,64}`.
    pub name: String,
    /// A registered engine: `npreserving`, `queuelen`, or your own.
    pub engine: String,
    #[serde(default)]
    pub engine_conf: Map<String, Value>,
    /// What each worker is.
    pub deployable: Deployable,
    #[serde(default)]
    pub health: HealthPolicy,
    #[serde(default)]
    pub sensors: SensorPolicy,
    /// Decide and log, but do not launch or destroy.
    #[serde(default)]
    pub dry_run: bool,
    /// Do not decide at all.
    #[serde(default)]
    pub paused: bool,
}

/// How the sensor aggregator judges this domain's workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthPolicy {
    pub boot_timeout_secs: f64,
    pub missing_timeout_secs: f64,
    pub zombie_secs: f64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            boot_timeout_secs: 60.0,
            missing_timeout_secs: 15.0,
            zombie_secs: 10.0,
        }
    }
}

/// Where the domain's work queue is (for queue-length engines).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SensorPolicy {
    pub queue: Option<String>,
    /// The broker holding `queue`; default the run's broker.
    pub broker_url: Option<String>,
}

/// A policy that failed to load or validate. The message names the file (when
/// there is one) and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct PolicyError {
    pub origin: String,
    pub key: Option<String>,
    pub message: String,
}

impl PolicyError {
    fn new(origin: &str, key: Option<&str>, message: impl Into<String>) -> Self {
        let message = message.into();
        PolicyError {
            origin: origin.to_string(),
            key: key.map(str::to_string),
            message: match key {
                Some(k) if !k.is_empty() && !message.contains(k) => {
                    format!("key \"{k}\": {message}")
                }
                _ => message,
            },
        }
    }
}

impl DomainPolicy {
    /// Checks everything that can be checked without running: the name, the
    /// engine exists and accepts its config, the health settings are sane.
    /// `origin` names the file (or `add_domain`) in errors.
    pub fn validate(&self, registry: &Registry, origin: &str) -> Result<(), PolicyError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(PolicyError::new(
                origin,
                Some("name"),
                format!(
                    "invalid domain name {:?}: use 1 to 64 characters of a-z, 0-9, '-' and '_'",
                    self.name
                ),
            ));
        }
        for (key, v) in [
            ("health.boot_timeout_secs", self.health.boot_timeout_secs),
            (
                "health.missing_timeout_secs",
                self.health.missing_timeout_secs,
            ),
            ("health.zombie_secs", self.health.zombie_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PolicyError::new(
                    origin,
                    Some(key),
                    format!("expected a positive number of seconds, got {v}"),
                ));
            }
        }
        if let Deployable::Local(l) = &self.deployable {
            if l.command.trim().is_empty() {
                return Err(PolicyError::new(
                    origin,
                    Some("deployable.command"),
                    "the local driver needs a command to run",
                ));
            }
        }
        self.create_engine(registry, origin).map(|_| ())
    }

    /// The domain's engine, initialized with its config.
    pub fn create_engine(
        &self,
        registry: &Registry,
        origin: &str,
    ) -> Result<Box<dyn decision_engines::DecisionEngine>, PolicyError> {
        let conf = EngineConfig::from_json(Value::Object(self.engine_conf.clone()))
            .map_err(|e| PolicyError::new(origin, Some("engine_conf"), e.to_string()))?;
        registry.create(&self.engine, &conf).map_err(|e| match e {
            decision_engines::RegistryError::Config { source, .. } => PolicyError::new(
                origin,
                Some(&format!("engine_conf.{}", source.key)),
                source.to_string(),
            ),
            other => PolicyError::new(origin, Some("engine"), other.to_string()),
        })
    }
}

/// Loads one policy file (TOML or YAML by extension) and validates it.
pub fn load_policy(path: &Path, registry: &Registry) -> Result<DomainPolicy, PolicyError> {
    let origin = format!("policy file {}", path.display());
    let policy: DomainPolicy = epu_core::config::load(Some(path), &HashMap::new())
        .map_err(|e| PolicyError::new(&origin, e.key(), strip_origin(&e.to_string(), path)))?;
    policy.validate(registry, &origin)?;
    Ok(policy)
}

/// Loads several policy files; domain names must be unique.
pub fn load_policies(
    paths: &[PathBuf],
    registry: &Registry,
) -> Result<BTreeMap<String, DomainPolicy>, PolicyError> {
    let mut out = BTreeMap::new();
    for p in paths {
        let policy = load_policy(p, registry)?;
        if out.contains_key(&policy.name) {
            return Err(PolicyError::new(
                &format!("policy file {}", p.display()),
                Some("name"),
                format!("domain {:?} is defined twice", policy.name),
            ));
        }
        out.insert(policy.name.clone(), policy);
    }
    Ok(out)
}

fn strip_origin(message: &str, path: &Path) -> String {
    // The config loader already names the file; avoid saying it twice.
    let prefix = format!("config file {}: ", path.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}
