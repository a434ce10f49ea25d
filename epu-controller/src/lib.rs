//! The EPU controller: the outer shell around decision engines.
//!
//! It hosts domains (one or many per process), keeps each domain's view of its
//! instances (`instance_info` from the provisioner) and sensors (`sensor_info` from
//! the aggregator), asks the domain's engine what to do — promptly after a change
//! (debounced) and on a periodic tick — and carries the intents out through the
//! provisioner: `provision` with launch ids it generated and stored first, and
//! `terminate_nodes`.
//!
//! Build your own controller binary with your own engines: make a
//! [`decision_engines::Registry`], register your engine, and pass it to
//! [`Controller::new`] (see `examples/custom-engine/`, and [`process::main_with`]).
#![forbid(unsafe_code)]

pub mod domain;
mod hosted;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod service;

use std::path::PathBuf;
use std::time::Duration;

use epu_core::config::{BusConfig, StoreConfig, TelemetryConfig};
use epu_core::wire::RunName;
use serde::{Deserialize, Serialize};

pub use crate::domain::{DecisionRecord, UNIQUE_KEY_VAR};
pub use crate::policy::{
    expand_placeholders, load_policies, load_policy, DomainPolicy, PolicyError,
};
pub use crate::service::{Controller, ControllerDeps, ControllerSetup, RunningController};

/// The controller's config file (`epu-controller --config FILE`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub run: RunName,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Policy files of the domains to host (TOML or YAML).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    #[serde(default)]
    pub timing: Timing,
}

/// How often domains decide.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Every domain decides at least this often.
    pub decision_interval_secs: f64,
    /// After a change, wait this long for more changes before deciding.
    pub debounce_ms: u64,
    /// Timeout of requests to the provisioner, and of a request's wait on a
    /// domain's task.
    pub request_timeout_secs: f64,
    /// How often the controller asks the provisioner's change feed for what
    /// changed since the last revision it applied (it also does when it sees a
    /// revision skipped): a lost `instance_info` is repaired within this.
    pub resync_secs: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            decision_interval_secs: 5.0,
            debounce_ms: 50,
            request_timeout_secs: 10.0,
            resync_secs: 10.0,
        }
    }
}

impl Timing {
    pub(crate) fn tick(&self) -> Duration {
        Duration::from_secs_f64(self.decision_interval_secs.max(0.01))
    }
}

/// Errors starting the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("store: {0}")]
    Store(#[from] epu_core::store::StoreError),
    #[error("bus: {0}")]
    Bus(#[from] epu_core::bus::BusError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
}
