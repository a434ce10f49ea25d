//! The provisioner: the only part of epu that touches the IaaS.
//!
//! It launches and terminates worker instances on request, owns their node records,
//! reports every state change to the subscribing controller as `instance_info`, and
//! after any crash puts the world and its records back in agreement without launching
//! anything twice.
//!
//! **Architecture invariant**: only [`driver`] modules talk to an IaaS, and only
//! `driver::ec2` knows the AWS SDK. The service ([`Provisioner`]) knows drivers only
//! through the [`driver::IaasDriver`] trait, the store only through
//! `epu_core::store::Store`, and the other services only through the bus.
//!
//! # Running it
//!
//! As a separate process: the `provisioner --config FILE` binary (AMQP). In-process, on
//! the standalone host's [`LocalBus`](epu_core::bus::local::LocalBus):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use epu_core::bus::local::LocalBus;
//! use epu_core::bus::BusOptions;
//! use epu_core::clock::SystemClock;
//! use epu_core::store::SledStore;
//! use epu_core::wire::RunName;
//! use provisioner::{drivers_from_config, Provisioner, ProvisionerConfig};
//!
//! let run = RunName::new("demo")?;
//! let bus = LocalBus::new(run.clone(), BusOptions::new("host"));
//! let mut cfg = ProvisionerConfig::new(run);
//! cfg.run_dir = "/tmp/epu-demo".into();
//! let clock = SystemClock::shared();
//! let drivers = drivers_from_config(&cfg, clock.clone()).await?;
//! let store = Arc::new(SledStore::open("/tmp/epu-demo/provisioner-store")?);
//! let prov = Provisioner::new(cfg, Arc::new(bus.view(BusOptions::new("provisioner"))), store, clock, drivers)?;
//! let running = prov.start().await?;
//! // … serve until shutdown …
//! running.stop().await;
//! # Ok(()) }
//! ```
//!
//! See [`service`] for the launch path and the reconciliation rules, [`record`] for
//! what is stored, [`driver`] for the drivers (built from a config by
//! [`drivers_from_config`]), [`metrics`] for the Prometheus metrics and [`config`] for
//! the configuration.
#![forbid(unsafe_code)]

pub mod config;
pub mod driver;
pub mod error;
pub mod metrics;
pub mod record;
pub mod service;

pub use config::{Failpoint, ProvisionerConfig};
pub use driver::{drivers_from_config, Drivers, IaasDriver, IaasError, IaasErrorKind};
pub use error::ProvisionerError;
pub use service::{FailpointAction, Provisioner, ProvisionerDeps, RunningProvisioner};
