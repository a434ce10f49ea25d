//! Launch plans: what a run is made of.
//!
//! ```toml
//! run = "sleeper"                 # `epumgmt launch --run NAME` overrides it
//! transport = "standalone"        # or "amqp"
//! amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"   # EPU_AMQP_URL wins when set;
//!                                 # several (one cluster's nodes) separated by commas
//! queue_type = "quorum"           # the run's durable queues: "classic" (default) or
//!                                 # "quorum" (on a RabbitMQ cluster)
//! domains = ["domain.toml"]       # policy files, relative to the plan
//! levels = [["provisioner"], ["sensor-aggregator"], ["controller"]]
//!
//! [provisioner]                   # extra keys for the provisioner's config
//! poll_interval_secs = 2
//! [sensor_aggregator]             # ... for the aggregator's
//! [controller]                    # ... for the controller's (e.g. [controller.timing])
//! ```
//!
//! The shared secret that signs control operations comes from `EPU_SECRET` when set,
//! else `secret` in the plan, else a random one made at launch; it is kept in the
//! run directory (mode 0600) for `epumgmt` to use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use decision_engines::Registry;
use epu_controller::load_policy;
use epu_core::wire::RunName;
use provisioner::config::DriversConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The services a run is made of, by their names in `levels`.
pub const SERVICES: [&str; 3] = ["provisioner", "sensor-aggregator", "controller"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanTransport {
    /// Every service in one background process, no broker.
    Standalone,
    /// The three service binaries as processes, over RabbitMQ.
    Amqp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchPlan {
    pub run: Option<String>,
    pub transport: PlanTransport,
    #[serde(default)]
    pub amqp_url: Option<String>,
    /// `bus.queue_type` of every service of the run; unset, the services' default
    /// (classic).
    #[serde(default)]
    pub queue_type: Option<epu_core::config::QueueType>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub domains: Vec<PathBuf>,
    #[serde(default = "default_levels")]
    pub levels: Vec<Vec<String>>,
    #[serde(default)]
    pub provisioner: Map<String, Value>,
    #[serde(default)]
    pub sensor_aggregator: Map<String, Value>,
    #[serde(default)]
    pub controller: Map<String, Value>,
}

fn default_levels() -> Vec<Vec<String>> {
    SERVICES.iter().map(|s| vec![s.to_string()]).collect()
}

impl LaunchPlan {
    /// Reads a plan, resolving its domain files against the plan's directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read launch plan {}", path.display()))?;
        let mut plan: LaunchPlan = toml::from_str(&text)
            .with_context(|| format!("launch plan {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for d in &mut plan.domains {
            if d.is_relative() {
                *d = base.join(&*d);
            }
        }
        let mut seen = Vec::new();
        for level in &plan.levels {
            for s in level {
                if !SERVICES.contains(&s.as_str()) {
                    bail!(
                        "launch plan {}: levels: unknown service {s:?}; the services are {}",
                        path.display(),
                        SERVICES.join(", ")
                    );
                }
                seen.push(s.clone());
            }
        }
        for s in SERVICES {
            if !seen.iter().any(|x| x == s) {
                bail!(
                    "launch plan {}: levels: service {s:?} is missing",
                    path.display()
                );
            }
        }
        Ok(plan)
    }

    /// Refuses, before anything runs, a domain the plan's own provisioner would
    /// refuse to launch (a driver it does not turn on, a command not allowed),
    /// naming the policy file and the key; and any policy that does not load.
    pub fn check_domains(&self, run: &str) -> anyhow::Result<()> {
        let drivers: DriversConfig = match self.provisioner.get("drivers") {
            Some(d) => serde_json::from_value(d.clone())
                .context("the plan's [provisioner.drivers] section is not valid")?,
            None => DriversConfig::default(),
        };
        let registry = Registry::with_builtins();
        for path in &self.domains {
            let policy = load_policy(path, &registry, run)?;
            if let Some((key, why)) = drivers.refusal(&policy.deployable) {
                bail!(
                    "policy file {}: key \"{key}\": {why}; nothing was launched",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// The run name: `--run`, else the plan's, else the plan file's stem.
    pub fn run_name(&self, cli: Option<&str>, path: &Path) -> anyhow::Result<RunName> {
        let name = cli
            .map(str::to_string)
            .or_else(|| self.run.clone())
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().to_lowercase()))
            .unwrap_or_else(|| "run".to_string());
        RunName::new(&name).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The broker URL: EPU_AMQP_URL, else the plan's, else localhost.
    pub fn amqp_url(&self) -> String {
        std::env::var("EPU_AMQP_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.amqp_url.clone())
            .unwrap_or_else(|| DEFAULT_AMQP_URL.to_string())
    }

    /// The shared secret: EPU_SECRET, else the plan's, else a fresh random one.
    pub fn secret(&self) -> String {
        std::env::var("EPU_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.secret.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                )
            })
    }
}
