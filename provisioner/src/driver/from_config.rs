//! Building the drivers a [`ProvisionerConfig`] turns on.
//!
//! Used by the `provisioner` binary, the standalone host and `epumgmt killrun` (which
//! reuses the drivers as a library to find a dead provisioner's instances).

use std::collections::BTreeMap;
use std::sync::Arc;

use epu_core::clock::SharedClock;
use epu_core::config::Transport;

use crate::config::ProvisionerConfig;
use crate::driver::local::{LocalDriver, LocalSettings};
use crate::driver::sim::{SimDriver, SimSettings};
use crate::driver::Drivers;
use crate::error::ProvisionerError;

/// Builds the drivers a config turns on (`local`, `sim`, and `ec2` when its section is
/// present).
pub async fn drivers_from_config(
    cfg: &ProvisionerConfig,
    clock: SharedClock,
) -> Result<Drivers, ProvisionerError> {
    cfg.validate()?;
    let mut drivers = Drivers::new();
    if cfg.drivers.local.enabled {
        drivers.insert(Arc::new(LocalDriver::new(
            cfg.run.clone(),
            LocalSettings {
                run_dir: cfg.run_dir.clone(),
                terminate_grace: cfg.terminate_grace()?,
                poll_interval: cfg.poll_interval()?,
                worker_env: local_worker_env(cfg),
            },
        )));
    }
    if cfg.drivers.sim.enabled {
        drivers.insert(Arc::new(SimDriver::new(
            clock,
            SimSettings {
                boot_secs: cfg.drivers.sim.boot_secs,
                failure_rate: cfg.drivers.sim.failure_rate,
                seed: cfg.drivers.sim.seed,
            },
        )));
    }
    if let Some(ec2) = &cfg.drivers.ec2 {
        #[cfg(feature = "ec2")]
        {
            let driver = crate::driver::ec2::Ec2Driver::from_config(ec2, &cfg.bus).await?;
            drivers.insert(Arc::new(driver));
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = ec2;
            return Err(ProvisionerError::Driver {
                driver: "ec2",
                message: "this build has no ec2 driver; rebuild with `--features ec2` or remove [drivers.ec2]".into(),
            });
        }
    }
    Ok(drivers)
}

/// The environment local workers get: how to reach the bus (the worker AMQP URL when
/// one is configured, else the provisioner's own) and the heartbeat interval.
fn local_worker_env(cfg: &ProvisionerConfig) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match cfg.bus.transport {
        Transport::Amqp => {
            env.insert("EPU_BUS__TRANSPORT".to_string(), "amqp".to_string());
            let url = match &cfg.drivers.local.worker_amqp_url {
                Some(s) => s.expose().to_string(),
                None => cfg.bus.amqp_url.clone(),
            };
            env.insert("EPU_BUS__AMQP_URL".to_string(), url);
        }
        Transport::Local => {
            env.insert("EPU_BUS__TRANSPORT".to_string(), "local".to_string());
        }
    }
    if let Some(hb) = cfg.drivers.local.heartbeat_interval_secs {
        env.insert("EPU_HEARTBEAT__INTERVAL_SECS".to_string(), hb.to_string());
    }
    env
}
