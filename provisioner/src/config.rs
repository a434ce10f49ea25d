//! The provisioner's configuration: `provisioner --config FILE` plus `EPU_*` overrides,
//! loaded with `epu_core::config::load`.
//!
//! ```toml
//! run = "demo"
//! run_dir = "/var/lib/epu/demo"
//! poll_interval_secs = 5
//! disappear_grace_secs = 30
//! terminate_grace_secs = 5
//! record_retention_secs = 7200
//!
//! [bus]
//! amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//! secret = "shared-hmac-secret"
//!
//! [store]
//! path = "/var/lib/epu/demo/provisioner-store"
//!
//! [telemetry]
//! http_addr = "127.0.0.1:9101"
//!
//! [iaas_retry]
//! initial_ms = 500
//! max_ms = 20000
//! max_attempts = 6
//!
//! [drivers.local]
//! heartbeat_interval_secs = 5
//! allowed_commands = ["/opt/worker/bin/worker"]   # default: any command
//!
//! [drivers.sim]
//! boot_secs = 10
//! failure_rate = 0.0
//! seed = 1
//!
//! # present = the ec2 driver is on (builds with the `ec2` feature)
//! [drivers.ec2]
//! region = "us-east-1"
//! endpoint_url = "http://127.0.0.1:5000"   # moto, or any EC2-compatible API
//! access_key_id = "..."                     # else the standard AWS chain
//! secret_access_key = "..."
//! ```
//!
//! `EPU_FAILPOINT` (key `failpoint`) is a test hook; see [`Failpoint`].

use std::path::PathBuf;
use std::time::Duration;

use epu_core::config::{BusConfig, Secret, StoreConfig, TelemetryConfig};
use epu_core::wire::RunName;
use epu_model::messages::Deployable;
use serde::{Deserialize, Serialize};

use crate::error::ProvisionerError;

/// The whole config. Unknown keys are refused.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerConfig {
    /// The run every instance is tagged with (required).
    pub run: RunName,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default = "default_store")]
    pub store: StoreConfig,
    /// Workers' logs and working directories (`<run_dir>/workers/`).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// How often the IaaS is listed and compared with the records.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: f64,
    /// How long a node may be missing from the IaaS's list before it is FAILED with
    /// NODE_DISAPPEARED.
    #[serde(default = "default_grace")]
    pub disappear_grace_secs: f64,
    /// Local workers: SIGTERM → SIGKILL.
    #[serde(default = "default_terminate_grace")]
    pub terminate_grace_secs: f64,
    /// How long a terminal (TERMINATED, FAILED, REJECTED) record is kept before it
    /// is pruned from the store, `describe_nodes` and `dump_state`. The original
    /// EPU kept them 2 h: long enough for any subscriber's resync to see how a node
    /// ended, short enough that a long run's history does not grow without bound.
    #[serde(default = "default_retention")]
    pub record_retention_secs: f64,
    #[serde(default)]
    pub iaas_retry: RetrySettings,
    #[serde(default)]
    pub drivers: DriversConfig,
    /// Test hook: exit abruptly at this point (see [`Failpoint`]).
    #[serde(default)]
    pub failpoint: Option<Failpoint>,
}

fn default_store() -> StoreConfig {
    StoreConfig {
        path: PathBuf::from("provisioner-store"),
    }
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("epu-run")
}

fn default_poll() -> f64 {
    5.0
}

fn default_grace() -> f64 {
    30.0
}

fn default_terminate_grace() -> f64 {
    5.0
}

fn default_retention() -> f64 {
    7200.0
}

/// The retry schedule of retryable IaaS errors (throttling, timeouts, 5xx):
/// `epu_core::backoff` with these bounds, ±20 % jitter.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Tries in all, the first included.
    pub max_attempts: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_ms: 500,
            max_ms: 20_000,
            max_attempts: 6,
        }
    }
}

/// `[drivers]`: which drivers are on and their settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriversConfig {
    pub local: LocalDriverConfig,
    pub sim: SimDriverConfig,
    /// The EC2 driver is on when this section is present.
    pub ec2: Option<Ec2DriverConfig>,
}

/// `[drivers.local]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalDriverConfig {
    pub enabled: bool,
    /// The broker URL workers heartbeat to; default `bus.amqp_url` when the bus is AMQP.
    pub worker_amqp_url: Option<Secret>,
    /// Passed to workers as `EPU_HEARTBEAT__INTERVAL_SECS`.
    pub heartbeat_interval_secs: Option<f64>,
    /// When set, the only `command`s a local deployable may run (as written in the
    /// request): a second line of defence behind the signed `provision`.
    pub allowed_commands: Option<Vec<String>>,
}

impl Default for LocalDriverConfig {
    fn default() -> Self {
        LocalDriverConfig {
            enabled: true,
            worker_amqp_url: None,
            heartbeat_interval_secs: None,
            allowed_commands: None,
        }
    }
}

/// `[drivers.sim]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimDriverConfig {
    pub enabled: bool,
    /// Seconds of clock time from launch to RUNNING (a deployable may override).
    pub boot_secs: f64,
    /// Probability in 0..=1 that an instance fails while booting.
    pub failure_rate: f64,
    /// Seed of the failure draws.
    pub seed: u64,
}

impl Default for SimDriverConfig {
    fn default() -> Self {
        SimDriverConfig {
            enabled: true,
            boot_secs: 5.0,
            failure_rate: 0.0,
            seed: 1,
        }
    }
}

/// `[drivers.ec2]`. Region, endpoint and credentials fall back to the standard AWS chain
/// (`AWS_REGION`, `AWS_ENDPOINT_URL_EC2`, `AWS_ACCESS_KEY_ID`, profiles, IMDS, …).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2DriverConfig {
    pub region: Option<String>,
    /// An EC2-compatible endpoint (moto's server in tests).
    pub endpoint_url: Option<String>,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Timeout of one API call (the SDK's operation timeout); 0 = the SDK default.
    pub call_timeout_secs: f64,
    /// The broker URL written into user data's `{{heartbeat}}`, as seen from instances.
    pub worker_amqp_url: Option<Secret>,
}

/// Test hooks: the process exits abruptly (`exit(137)`) at this point of a launch. Set by
/// `EPU_FAILPOINT=after_store_before_iaas` (or `failpoint = "…"` in the file); never set
/// it in production.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failpoint {
    /// The launch and its nodes are stored; the IaaS has not been called.
    AfterStoreBeforeIaas,
    /// The IaaS launched the instances; their ids are not stored yet.
    AfterIaasBeforeStore,
}

impl Failpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Failpoint::AfterStoreBeforeIaas => "after_store_before_iaas",
            Failpoint::AfterIaasBeforeStore => "after_iaas_before_store",
        }
    }

    /// Its name in `EPU_FAILPOINTS_DIR` (`epu_core::failpoint`): the one-shot
    /// form the chaos suite arms in a running provisioner.
    pub fn one_shot_name(self) -> &'static str {
        match self {
            Failpoint::AfterStoreBeforeIaas => "provisioner_after_store_before_iaas",
            Failpoint::AfterIaasBeforeStore => "provisioner_after_iaas_before_store",
        }
    }
}

fn secs(key: &'static str, value: f64, min: f64) -> Result<Duration, ProvisionerError> {
    if !value.is_finite() || value < min || value > 1.0e7 {
        return Err(ProvisionerError::Config {
            key,
            message: format!("must be a number of seconds ≥ {min}, got {value}"),
        });
    }
    Ok(Duration::from_secs_f64(value))
}

impl ProvisionerConfig {
    /// A config with every default, for `run` (tests, the standalone host).
    pub fn new(run: RunName) -> Self {
        ProvisionerConfig {
            run,
            bus: BusConfig::default(),
            telemetry: TelemetryConfig::default(),
            store: default_store(),
            run_dir: default_run_dir(),
            poll_interval_secs: default_poll(),
            disappear_grace_secs: default_grace(),
            terminate_grace_secs: default_terminate_grace(),
            record_retention_secs: default_retention(),
            iaas_retry: RetrySettings::default(),
            drivers: DriversConfig::default(),
            failpoint: None,
        }
    }

    /// Checks the values serde cannot (ranges); the error names the key.
    pub fn validate(&self) -> Result<(), ProvisionerError> {
        self.poll_interval()?;
        self.disappear_grace()?;
        self.terminate_grace()?;
        self.record_retention()?;
        if self.iaas_retry.max_attempts == 0 {
            return Err(ProvisionerError::Config {
                key: "iaas_retry.max_attempts",
                message: "must be at least 1".into(),
            });
        }
        if self.iaas_retry.initial_ms > self.iaas_retry.max_ms {
            return Err(ProvisionerError::Config {
                key: "iaas_retry.initial_ms",
                message: "must not exceed iaas_retry.max_ms".into(),
            });
        }
        let sim = &self.drivers.sim;
        secs("drivers.sim.boot_secs", sim.boot_secs, 0.0)?;
        if !(0.0..=1.0).contains(&sim.failure_rate) {
            return Err(ProvisionerError::Config {
                key: "drivers.sim.failure_rate",
                message: format!("must be in 0..=1, got {}", sim.failure_rate),
            });
        }
        if let Some(hb) = self.drivers.local.heartbeat_interval_secs {
            secs("drivers.local.heartbeat_interval_secs", hb, 0.001)?;
        }
        if let Some(ec2) = &self.drivers.ec2 {
            secs("drivers.ec2.call_timeout_secs", ec2.call_timeout_secs, 0.0)?;
            if ec2.access_key_id.is_some() != ec2.secret_access_key.is_some() {
                return Err(ProvisionerError::Config {
                    key: "drivers.ec2.access_key_id",
                    message: "set both access_key_id and secret_access_key, or neither (then the standard AWS chain is used)".into(),
                });
            }
        }
        Ok(())
    }

    pub fn poll_interval(&self) -> Result<Duration, ProvisionerError> {
        secs("poll_interval_secs", self.poll_interval_secs, 0.01)
    }

    pub fn disappear_grace(&self) -> Result<Duration, ProvisionerError> {
        secs("disappear_grace_secs", self.disappear_grace_secs, 0.0)
    }

    pub fn terminate_grace(&self) -> Result<Duration, ProvisionerError> {
        secs("terminate_grace_secs", self.terminate_grace_secs, 0.0)
    }

    pub fn record_retention(&self) -> Result<Duration, ProvisionerError> {
        secs("record_retention_secs", self.record_retention_secs, 1.0)
    }
}

impl DriversConfig {
    /// The drivers this config turns on (what `drivers_from_config` builds).
    pub fn enabled(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if self.local.enabled {
            on.push("local");
        }
        if self.sim.enabled {
            on.push("sim");
        }
        if self.ec2.is_some() {
            on.push("ec2");
        }
        on
    }

    /// Why a provisioner with these drivers would refuse to launch `deployable`,
    /// if it would, as (the deployable's key, the reason): a driver it does not
    /// turn on, a local command not in `allowed_commands`. What a policy can be
    /// checked against before anything runs (`epumgmt launch`).
    pub fn refusal(&self, deployable: &Deployable) -> Option<(&'static str, String)> {
        let driver = deployable.driver();
        let on = self.enabled();
        if !on.contains(&driver) {
            return Some((
                "deployable.driver",
                format!(
                    "driver {driver:?} is not enabled in the provisioner (enabled: {}); turn it on in the provisioner's [drivers.{driver}]",
                    on.join(", ")
                ),
            ));
        }
        command_refusal(self.local.allowed_commands.as_deref(), deployable)
            .map(|why| ("deployable.command", why))
    }
}

/// Why a local `deployable`'s command is refused under `allowed` (the
/// `drivers.local.allowed_commands`; `None` allows any), if it is.
pub fn command_refusal(allowed: Option<&[String]>, deployable: &Deployable) -> Option<String> {
    match (deployable, allowed) {
        (Deployable::Local(l), Some(allowed)) if !allowed.contains(&l.command) => Some(format!(
            "command {:?} is not in drivers.local.allowed_commands",
            l.command
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use epu_model::messages::{LocalDeployable, SimDeployable};

    #[test]
    fn deployables_are_checked_against_the_drivers_turned_on() {
        let local = |cmd: &str| {
            Deployable::Local(LocalDeployable {
                command: cmd.into(),
                args: vec![],
                env: Default::default(),
                cwd: None,
            })
        };
        let sim = Deployable::Sim(SimDeployable::default());
        let mut sim_off = DriversConfig::default();
        sim_off.sim.enabled = false;
        let mut allow = DriversConfig::default();
        allow.local.allowed_commands = Some(vec!["sleep".into()]);
        // (case, drivers, deployable, refused at key)
        let table: Vec<(&str, DriversConfig, Deployable, Option<&str>)> = vec![
            (
                "local on by default",
                DriversConfig::default(),
                local("sleep"),
                None,
            ),
            (
                "sim on by default",
                DriversConfig::default(),
                sim.clone(),
                None,
            ),
            ("sim turned off", sim_off, sim, Some("deployable.driver")),
            ("allowed command", allow.clone(), local("sleep"), None),
            (
                "command not allowed",
                allow,
                local("rm"),
                Some("deployable.command"),
            ),
        ];
        for (case, drivers, d, want) in table {
            let got = drivers.refusal(&d);
            assert_eq!(got.as_ref().map(|(k, _)| *k), want, "{case}: {got:?}");
        }
        let ec2_off = DriversConfig::default();
        assert_eq!(ec2_off.enabled(), vec!["local", "sim"]);
    }

    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<ProvisionerConfig, String> {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("tmp");
        f.write_all(toml.as_bytes()).expect("write");
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        epu_core::config::load::<ProvisionerConfig>(Some(f.path()), &env).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let cfg = load_str("run = \"demo\"\n", &[]).expect("loads");
        assert_eq!(cfg.run.as_str(), "demo");
        assert_eq!(cfg.poll_interval_secs, 5.0);
        assert!(cfg.drivers.local.enabled);
        assert!(cfg.drivers.ec2.is_none());
        assert!(cfg.failpoint.is_none());
        cfg.validate().expect("valid");

        let cfg = load_str(
            "run = \"demo\"\n[drivers.ec2]\nregion = \"us-east-1\"\n",
            &[
                ("EPU_FAILPOINT", "after_store_before_iaas"),
                ("EPU_POLL_INTERVAL_SECS", "0.5"),
                ("EPU_DRIVERS__SIM__SEED", "7"),
            ],
        )
        .expect("loads");
        assert_eq!(cfg.failpoint, Some(Failpoint::AfterStoreBeforeIaas));
        assert_eq!(cfg.poll_interval_secs, 0.5);
        assert_eq!(cfg.drivers.sim.seed, 7);
        assert_eq!(
            cfg.drivers.ec2.as_ref().and_then(|e| e.region.as_deref()),
            Some("us-east-1")
        );
    }

    #[test]
    fn mistakes_are_named() {
        let e = load_str("run = \"demo\"\npoll_intervall_secs = 1\n", &[]).expect_err("unknown");
        assert!(e.contains("poll_intervall_secs"), "{e}");
        let e = load_str("poll_interval_secs = 1\n", &[]).expect_err("no run");
        assert!(e.contains("run"), "{e}");
        let e = load_str("run = \"demo\"\n", &[("EPU_FAILPOINT", "sometimes")]).expect_err("bad");
        assert!(e.contains("EPU_FAILPOINT"), "{e}");
        let cfg = load_str("run = \"demo\"\npoll_interval_secs = -1\n", &[]).expect("parses");
        let e = cfg.validate().expect_err("negative").to_string();
        assert!(e.contains("poll_interval_secs"), "{e}");
        let cfg = load_str(
            "run = \"demo\"\n[drivers.ec2]\naccess_key_id = \"AKIASECRET\"\n",
            &[],
        )
        .expect("parses");
        let e = cfg.validate().expect_err("half credentials").to_string();
        assert!(
            e.contains("secret_access_key") && !e.contains("AKIASECRET"),
            "{e}"
        );
        assert!(!format!("{cfg:?}").contains("AKIASECRET"));
    }
}
