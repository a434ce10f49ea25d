//! Loading service configuration: a TOML or YAML file, then environment overrides.
//!
//! [`load`] is the one way every service reads its config. It is a pure function of the
//! file and an environment *map*: the binary passes `std::env::vars().collect()`, tests
//! pass a `HashMap`.
//!
//! # Environment overrides
//!
//! Every variable named `EPU_*` is an override of a config key: strip `EPU_`, lowercase,
//! and read `__` (two underscores) as the nesting dot. `EPU_BUS__AMQP_URL` sets
//! `bus.amqp_url`; `EPU_RUN` sets `run`. An override of a key inside a section that the
//! config does not have (`EPU_BUS__AMQP_ULR`) is an error naming the variable. A
//! variable with no section (`EPU_AMQP_URL`, `EPU_SECRET`, `EPU_NODE_ID`) that is not a
//! top-level key of this config is not an override: those names are used by launch
//! plans and workers, and are ignored here. [`env_var_for`] gives the variable for a key.
//!
//! Values are kept as strings and converted by the target type, as the `config` crate
//! does for file values (`"64"` becomes a `u16` where one is asked for). They are not
//! guessed into numbers first, so a password such as `007` or `1e3` reaches a string
//! field unchanged.
//!
//! # Errors
//!
//! Errors say where the bad value came from (the file path, or the environment variable
//! and the file it overrode), the dotted key path, and what was expected:
//! `config file /etc/epu/prov.toml: key "bus.prefetch": invalid type: string "abc", expected an integer`.
//!
//! # Common sections
//!
//! [`BusConfig`], [`TelemetryConfig`] and [`StoreConfig`] are the sections every service
//! embeds in its own config struct (with `#[serde(default)]` on the field if the section
//! may be left out).

mod convert;
mod error;
mod loader;
mod secret;
mod sections;
mod urls;

pub use self::error::{ConfigError, Origin};
pub use self::loader::{env_var_for, load, ENV_PREFIX, ENV_SEPARATOR};
pub use self::secret::{redact_url, Secret};
pub use self::sections::{
    BusConfig, LogFormat, QueueType, StoreConfig, TelemetryConfig, Transport,
};
pub use self::urls::split_amqp_urls;
