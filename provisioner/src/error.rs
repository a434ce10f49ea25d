//! The provisioner's errors.

use epu_core::bus::BusError;
use epu_core::store::StoreError;
use epu_core::telemetry::TelemetryError;

use crate::driver::IaasError;

/// Errors of building, starting and running a provisioner.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionerError {
    /// A config value out of range.
    #[error("config key \"{key}\": {message}")]
    Config { key: &'static str, message: String },
    /// A configured driver cannot be set up.
    #[error("driver {driver}: {message}")]
    Driver {
        driver: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Iaas(#[from] IaasError),
    #[error("the provisioner is already running")]
    AlreadyStarted,
    #[error("a background task failed: {0}")]
    Task(String),
}
