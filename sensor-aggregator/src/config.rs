//! The aggregator's config file (`sensor-aggregator --config FILE`), loaded with
//! `epu_core::config::load` (TOML or YAML, then `EPU_*` overrides).
//!
//! ```toml
//! run = "demo"
//! nodes_poll_secs = 2            # how often to ask the provisioner for node records
//! sensor_info_interval_secs = 3  # resend every domain's readings at least this often
//! persist_interval_ms = 1000     # how often last-heard times are written to the store
//!
//! [bus]
//! amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//! [store]
//! path = "/var/lib/epu/sensor-aggregator"
//!
//! [[domains]]
//! name = "workers"
//! queue = "jobs.demo"            # the domain's work queue, if it has one
//! broker_url = "amqp://user:pw@other-broker:5672/%2f"   # default: bus.amqp_url
//! poll_secs = 1                  # queue depth period
//! boot_timeout_secs = 60
//! missing_timeout_secs = 15
//! zombie_secs = 10
//! ```
//!
//! The three health keys are the domain policy's `[health]` ([`HealthPolicy`]),
//! each a number of seconds above 0.
//!
//! A domain not listed here is still judged once the provisioner reports nodes of it
//! (or its workers heartbeat): with the settings of its policy, which the aggregator
//! asks the controller for (`describe_domain`; see [`crate::learn`]), and with the
//! defaults above until the controller has answered. [`crate::Aggregator::set_domain`]
//! adds or changes a domain at runtime; listed and set domains are never asked about.

use std::time::Duration;

use epu_core::config::{redact_url, BusConfig, Secret, StoreConfig, TelemetryConfig};
use epu_core::wire::RunName;
use epu_model::health::{HealthPolicy, SensorPolicy};
use serde::{Deserialize, Serialize};

use crate::health::Thresholds;

/// The whole config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    pub run: RunName,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// How often to poll the provisioner's `describe_nodes` (default 2 s).
    #[serde(default = "default_nodes_poll_secs")]
    pub nodes_poll_secs: f64,
    /// Every domain's readings go to the controller at least this often (default 3 s);
    /// a change goes at once.
    #[serde(default = "default_sensor_info_interval_secs")]
    pub sensor_info_interval_secs: f64,
    /// How often changed last-heard times are written to the store (default 1000 ms).
    /// After a crash, last-heard times can be up to this much older than they were,
    /// so a silent node is declared MISSING up to this much sooner — never later.
    #[serde(default = "default_persist_interval_ms")]
    pub persist_interval_ms: u64,
    #[serde(default)]
    pub domains: Vec<DomainSensors>,
}

fn default_nodes_poll_secs() -> f64 {
    2.0
}
fn default_sensor_info_interval_secs() -> f64 {
    3.0
}
fn default_persist_interval_ms() -> u64 {
    1000
}

/// One domain's sensor settings. The health keys (`boot_timeout_secs`,
/// `missing_timeout_secs`, `zombie_secs`) are the domain policy's own
/// [`HealthPolicy`] (`epu_model::health`), flattened into the entry: one type, one
/// set of defaults, one check (each a [`Secs`](epu_model::health::Secs): finite and
/// above 0), whichever file they come from.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSensors {
    pub name: String,
    /// The domain's work queue, measured by a passive declare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The broker holding `queue`; default the bus's `amqp_url`. Never logged with
    /// its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_url: Option<Secret>,
    /// How often the queue is measured (default 1 s).
    #[serde(default = "default_poll_secs")]
    pub poll_secs: f64,
    /// How the domain's workers are judged (defaults: boot 60 s, missing 15 s,
    /// zombie 10 s).
    #[serde(flatten)]
    pub health: HealthPolicy,
}

fn default_poll_secs() -> f64 {
    1.0
}

impl std::fmt::Debug for DomainSensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainSensors")
            .field("name", &self.name)
            .field("queue", &self.queue)
            .field(
                "broker_url",
                &self.broker_url.as_ref().map(|u| redact_url(u.expose())),
            )
            .field("poll_secs", &self.poll_secs)
            .field("boot_timeout_secs", &self.health.boot_timeout_secs.get())
            .field(
                "missing_timeout_secs",
                &self.health.missing_timeout_secs.get(),
            )
            .field("zombie_secs", &self.health.zombie_secs.get())
            .finish()
    }
}

impl DomainSensors {
    /// A domain with every setting at its default.
    pub fn new(name: impl Into<String>) -> Self {
        DomainSensors {
            name: name.into(),
            queue: None,
            broker_url: None,
            poll_secs: default_poll_secs(),
            health: HealthPolicy::DEFAULT,
        }
    }

    /// A domain's settings from its policy's `health` and `sensors` (what `epumgmt`
    /// writes into the aggregator's config at launch, and what the aggregator takes
    /// from the controller's `describe_domain` for a domain it was not configured
    /// with). The queue is measured at the default period.
    pub fn from_policy(
        name: impl Into<String>,
        health: HealthPolicy,
        sensors: &SensorPolicy,
    ) -> Self {
        DomainSensors {
            queue: sensors.queue.clone(),
            broker_url: sensors.broker_url.clone().map(Secret::new),
            health,
            ..DomainSensors::new(name)
        }
    }

    /// The health judge's thresholds for this domain.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds::from(&self.health)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_secs.clamp(0.01, 86_400.0))
    }

    /// Checks the values; the message names the key (`domains[NAME].poll_secs`).
    /// (The health settings are checked as they are read.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::new("domains[].name", "must not be empty"));
        }
        let key = |k: &str| format!("domains[{}].{k}", self.name);
        positive(&key("poll_secs"), self.poll_secs)?;
        if self.queue.as_deref().is_some_and(|q| q.trim().is_empty()) {
            return Err(ConfigError::new(
                &key("queue"),
                "must not be empty when set",
            ));
        }
        Ok(())
    }
}

fn positive(key: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{v} must be a number above 0"),
        ))
    }
}

/// A config value that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key \"{key}\": {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl AggregatorConfig {
    /// A config with every default, for `run`.
    pub fn new(run: RunName) -> Self {
        AggregatorConfig {
            run,
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            store: StoreConfig::default(),
            nodes_poll_secs: default_nodes_poll_secs(),
            sensor_info_interval_secs: default_sensor_info_interval_secs(),
            persist_interval_ms: default_persist_interval_ms(),
            domains: Vec::new(),
        }
    }

    /// Checks every value; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("nodes_poll_secs", self.nodes_poll_secs)?;
        positive("sensor_info_interval_secs", self.sensor_info_interval_secs)?;
        if self.persist_interval_ms == 0 {
            return Err(ConfigError::new("persist_interval_ms", "must be above 0"));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.domains {
            d.validate()?;
            if !names.insert(d.name.as_str()) {
                return Err(ConfigError::new(
                    &format!("domains[{}]", d.name),
                    "the domain is listed twice",
                ));
            }
        }
        Ok(())
    }

    pub fn nodes_poll(&self) -> Duration {
        Duration::from_secs_f64(self.nodes_poll_secs.clamp(0.01, 86_400.0))
    }

    pub fn sensor_info_interval(&self) -> Duration {
        Duration::from_secs_f64(self.sensor_info_interval_secs.clamp(0.01, 86_400.0))
    }

    pub fn persist_interval(&self) -> Duration {
        Duration::from_millis(self.persist_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn load(text: &str) -> Result<AggregatorConfig, epu_core::config::ConfigError> {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp");
        f.write_all(text.as_bytes()).expect("write");
        epu_core::config::load(Some(f.path()), &HashMap::new())
    }

    #[test]
    fn defaults_and_domains() {
        let c = load(
            "run = \"demo\"\n[[domains]]\nname = \"w\"\nqueue = \"jobs.demo\"\nbroker_url = \"amqp://u:hunter2@b/\"\n",
        )
        .expect("load");
        assert_eq!(c.nodes_poll_secs, 2.0);
        assert_eq!(c.sensor_info_interval_secs, 3.0);
        assert_eq!(c.persist_interval_ms, 1000);
        let d = &c.domains[0];
        assert_eq!(d.poll_secs, 1.0);
        assert_eq!(
            d.thresholds().missing_timeout,
            chrono::TimeDelta::seconds(15)
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        c.validate().expect("valid");
    }

    /// The health keys of a `[[domains]]` entry: (the entry's extra lines, the
    /// missing timeout it gets, or a fragment of the error).
    #[test]
    fn health_keys_are_the_policy_type_flattened() {
        #[rustfmt::skip]
        let cases: &[(&str, Result<f64, &str>)] = &[
            ("",                               Ok(15.0)),
            ("missing_timeout_secs = 1\n",     Ok(1.0)),
            ("missing_timeout_secs = 0.5\nboot_timeout_secs = 3\nzombie_secs = 2\n", Ok(0.5)),
            ("missing_timeout_secs = 0\n",     Err("0 is not a valid number of seconds")),
            ("zombie_secs = -1\n",             Err("-1 is not a valid number of seconds")),
            ("missing_timout_secs = 1\n",      Err("missing_timout_secs")),
        ];
        for (extra, want) in cases {
            let text = format!("run = \"demo\"\n[[domains]]\nname = \"w\"\n{extra}");
            match (want, load(&text)) {
                (Ok(m), Ok(c)) => {
                    c.validate().expect("valid");
                    let d = &c.domains[0];
                    assert_eq!(d.health.missing_timeout_secs.get(), *m, "{extra}");
                    assert_eq!(
                        d.thresholds().missing_timeout,
                        chrono::TimeDelta::milliseconds((m * 1000.0) as i64)
                    );
                }
                (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{extra}: {e}"),
                (w, g) => panic!("{extra:?}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn written_from_a_policy_it_reads_back_the_same() {
        let health: HealthPolicy = serde_json::from_value(
            serde_json::json!({"missing_timeout_secs": 4, "boot_timeout_secs": 20}),
        )
        .expect("health");
        let sensors = SensorPolicy {
            queue: Some("jobs.r1".into()),
            broker_url: Some("amqp://u:pw@b/".into()),
        };
        let d = DomainSensors::from_policy("w", health, &sensors);
        let v = serde_json::to_value(&d).expect("enc");
        assert_eq!(v["missing_timeout_secs"], 4.0, "flat keys: {v}");
        assert_eq!(v["zombie_secs"], 10.0, "{v}");
        let back: DomainSensors = serde_json::from_value(v).expect("dec");
        assert_eq!(back, d);
        let no_queue = serde_json::to_value(DomainSensors::new("x")).expect("enc");
        assert!(
            no_queue.get("queue").is_none(),
            "unset options are left out: {no_queue}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e =
            load("run = \"demo\"\n[[domains]]\nname = \"w\"\nqueu = \"x\"\n").expect_err("typo");
        assert!(e.to_string().contains("queu"), "{e}");
        let e = load("run = \"demo\"\nnode_poll_secs = 1\n").expect_err("typo");
        assert!(e.to_string().contains("node_poll_secs"), "{e}");
        let c = load("run = \"demo\"\n[[domains]]\nname = \"w\"\npoll_secs = 0\n").expect("load");
        let e = c.validate().expect_err("zero poll");
        assert_eq!(e.key, "domains[w].poll_secs");
        let c = load("run = \"demo\"\n[[domains]]\nname = \"w\"\n[[domains]]\nname = \"w\"\n")
            .expect("load");
        assert!(c.validate().is_err());
    }
}
