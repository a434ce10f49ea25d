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

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "EPU_";
/// The nesting separator in environment override names.
pub const ENV_SEPARATOR: &str = "__";

/// The environment variable that overrides dotted config key `key`
/// (`"bus.amqp_url"` → `"EPU_BUS__AMQP_URL"`).
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

/// Where a bad config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file.
    File(PathBuf),
    /// An environment override, and the file it overrode if there was one.
    Env {
        /// The variable's name.
        var: String,
        /// The config file, if one was given.
        file: Option<PathBuf>,
    },
    /// Neither: the built-in defaults (no file given, no override).
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env {
                var,
                file: Some(path),
            } => {
                write!(
                    f,
                    "environment variable {var} (over config file {})",
                    path.display()
                )
            }
            Origin::Env { var, file: None } => write!(f, "environment variable {var}"),
            Origin::Defaults => write!(f, "config (no file given)"),
        }
    }
}

/// Errors of [`load`]. Each names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not exist.
    #[error("config file {}: not found; check the path (relative paths start at the working directory)", path.display())]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The config file exists but cannot be read.
    #[error("config file {}: cannot read it: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file's extension is not one we parse.
    #[error("config file {}: unknown format; name it *.toml, *.yaml or *.yml", path.display())]
    UnsupportedFormat {
        /// The path as given.
        path: PathBuf,
    },
    /// The file is not valid TOML/YAML.
    #[error("config file {}: syntax error: {message}", path.display())]
    Syntax {
        /// The path as given.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A key that the config struct does not have.
    #[error("{origin}: unknown key \"{key}\"{}; remove it or fix its spelling", expected_suffix(.expected))]
    UnknownKey {
        /// Where it came from.
        origin: Origin,
        /// The dotted key path.
        key: String,
        /// The keys allowed there, as serde lists them (may be empty).
        expected: String,
    },
    /// A required key that is absent.
    #[error("{origin}: missing key \"{key}\"; set it in the config file or as {}", env_var_for(.key))]
    MissingKey {
        /// Where the config came from.
        origin: Origin,
        /// The dotted key path.
        key: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: {}{message}", key_prefix(.key))]
    InvalidValue {
        /// Where it came from.
        origin: Origin,
        /// The dotted key path, when known.
        key: Option<String>,
        /// What was wrong and what was expected.
        message: String,
    },
}

fn expected_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" ({expected})")
    }
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) => format!("key \"{key}\": "),
        None => String::new(),
    }
}

impl ConfigError {
    /// The dotted key path the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::MissingKey { key, .. } => Some(key),
            ConfigError::InvalidValue { key, .. } => key.as_deref(),
            _ => None,
        }
    }
}

/// What `load` needs to turn the `config` crate's errors into ours.
struct Context<'a> {
    file: Option<&'a Path>,
    /// Dotted key → variable name, for every override given.
    env_keys: HashMap<String, String>,
}

impl Context<'_> {
    /// The origin of a problem at `key`: the environment if an override set that key (or
    /// a value says it came from there), else the file, else the defaults.
    fn origin(&self, key: Option<&str>, from_env: bool) -> Origin {
        let file = self.file.map(Path::to_path_buf);
        if let Some(key) = key {
            if let Some(var) = self.env_keys.get(key) {
                return Origin::Env {
                    var: var.clone(),
                    file,
                };
            }
            if from_env {
                return Origin::Env {
                    var: env_var_for(key),
                    file,
                };
            }
        }
        match file {
            Some(path) => Origin::File(path),
            None => Origin::Defaults,
        }
    }
}

/// The origin string the `config` crate gives values from the environment.
const CONFIG_ENV_ORIGIN: &str = "the environment";

/// Loads a `T` from an optional TOML/YAML file (by extension: `.toml`, `.yaml`, `.yml`)
/// and the `EPU_*` overrides in `env` (see the module docs).
///
/// With no file and no overrides, `T` comes from its serde defaults.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    let mut env = env.clone();
    loop {
        match load_once(file, &env) {
            // A top-level `EPU_*` variable this config has no key for belongs to
            // someone else (a plan, a worker): drop it and load again.
            Err(ConfigError::UnknownKey {
                origin: Origin::Env { var, .. },
                ..
            }) if is_top_level(&var) && env.remove(&var).is_some() => continue,
            other => return other,
        }
    }
}

fn is_top_level(var: &str) -> bool {
    var.strip_prefix(ENV_PREFIX)
        .is_some_and(|rest| !rest.contains(ENV_SEPARATOR))
}

fn load_once<T: DeserializeOwned>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();

    if let Some(path) = file {
        let format = format_of(path)?;
        let contents = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::FileNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        builder = builder.add_source(config::File::from_str(&contents, format));
    }

    let mut overrides: HashMap<String, String> = HashMap::new();
    let mut env_keys = HashMap::new();
    for (var, value) in env {
        if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
            if rest.is_empty() {
                continue;
            }
            env_keys.insert(rest.to_lowercase().replace(ENV_SEPARATOR, "."), var.clone());
            overrides.insert(var.clone(), value.clone());
        }
    }
    builder = builder.add_source(
        config::Environment::default()
            .prefix(ENV_PREFIX.trim_end_matches('_'))
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .try_parsing(false)
            .source(Some(overrides.into_iter().collect())),
    );

    let ctx = Context { file, env_keys };
    let built = builder.build().map_err(|e| convert(e, &ctx))?;
    built.try_deserialize::<T>().map_err(|e| convert(e, &ctx))
}

fn format_of(path: &Path) -> Result<config::FileFormat, ConfigError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("toml") => Ok(config::FileFormat::Toml),
        Some("yaml") | Some("yml") => Ok(config::FileFormat::Yaml),
        _ => Err(ConfigError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

fn join_key(parent: Option<&str>, child: &str) -> String {
    match parent {
        Some(parent) if !parent.is_empty() => format!("{parent}.{child}"),
        _ => child.to_owned(),
    }
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into (`x`, "expected …").
fn parse_unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let field = rest[..end].to_owned();
    let expected = rest[end + 1..].trim_start_matches(',').trim().to_owned();
    Some((field, expected))
}

fn convert(err: config::ConfigError, ctx: &Context<'_>) -> ConfigError {
    convert_at(err, None, false, ctx)
}

/// `parent` is the key path the `config` crate attached around `err`; `from_env` is true
/// when it said the value came from the environment.
fn convert_at(
    err: config::ConfigError,
    parent: Option<String>,
    from_env: bool,
    ctx: &Context<'_>,
) -> ConfigError {
    match err {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.or(parent);
            let from_env = from_env || origin.as_deref() == Some(CONFIG_ENV_ORIGIN);
            ConfigError::InvalidValue {
                origin: ctx.origin(key.as_deref(), from_env),
                key,
                message: format!("invalid type: {unexpected}, expected {expected}"),
            }
        }
        config::ConfigError::At { error, origin, key } => {
            let key = key.or(parent);
            let from_env = from_env || origin.as_deref() == Some(CONFIG_ENV_ORIGIN);
            convert_at(*error, key, from_env, ctx)
        }
        config::ConfigError::NotFound(key) => {
            let key = if key.is_empty() {
                parent.unwrap_or_default()
            } else {
                key
            };
            ConfigError::MissingKey {
                origin: ctx.origin(None, false),
                key,
            }
        }
        config::ConfigError::Message(message) => match parse_unknown_field(&message) {
            Some((field, expected)) => {
                let key = join_key(parent.as_deref(), &field);
                ConfigError::UnknownKey {
                    origin: ctx.origin(Some(&key), false),
                    key,
                    expected,
                }
            }
            None => ConfigError::InvalidValue {
                origin: ctx.origin(parent.as_deref(), from_env),
                key: parent,
                message,
            },
        },
        config::ConfigError::FileParse { cause, .. } => match ctx.file {
            Some(path) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message: cause.to_string(),
            },
            None => ConfigError::InvalidValue {
                origin: Origin::Defaults,
                key: parent,
                message: cause.to_string(),
            },
        },
        other => ConfigError::InvalidValue {
            origin: ctx.origin(parent.as_deref(), from_env),
            key: parent,
            message: other.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------
// secrets

/// A secret string (a password, an HMAC key). `Debug` and `Display` print `***`, so it
/// never reaches a log or an error; [`Secret::expose`] gives the value to the code that
/// needs it.
///
/// It deserializes from a plain string. It *serializes* to the plain string too, so that
/// a config can be written out for a child service; never log a serialized config.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `url` with the password of its userinfo (`scheme://user:PASSWORD@host/…`) replaced by
/// `***`. A URL without a password is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let authority_start = match url.find("://") {
        Some(i) => i + 3,
        None => 0,
    };
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    let password_start = authority_start + colon + 1;
    let password_end = authority_start + at;
    format!("{}***{}", &url[..password_start], &url[password_end..])
}

// ---------------------------------------------------------------------------------------
// common sections

/// Which bus a service talks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Transport {
    /// RabbitMQ over AMQP: separate processes, several machines.
    #[default]
    Amqp,
    /// In-process routing: every service in one process, no broker.
    Local,
}

impl TryFrom<String> for Transport {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "amqp" => Ok(Transport::Amqp),
            "local" => Ok(Transport::Local),
            other => Err(format!(
                "unknown transport {other:?}, expected \"amqp\" or \"local\""
            )),
        }
    }
}

/// The `[bus]` section.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `amqp` (default) or `local`.
    pub transport: Transport,
    /// The broker URL; its password is redacted in `Debug`.
    pub amqp_url: String,
    /// How many unacknowledged deliveries a consumer may hold.
    pub prefetch: u16,
    /// How long to wait for a publisher confirm.
    pub publish_timeout_secs: u64,
    /// How long to wait for the reply to a request.
    pub request_timeout_secs: u64,
    /// The shared secret that signs control operations.
    pub secret: Option<Secret>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            transport: Transport::Amqp,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            prefetch: 64,
            publish_timeout_secs: 30,
            request_timeout_secs: 10,
            secret: None,
        }
    }
}

impl BusConfig {
    /// `publish_timeout_secs` as a duration.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_secs(self.publish_timeout_secs)
    }

    /// `request_timeout_secs` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("transport", &self.transport)
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("prefetch", &self.prefetch)
            .field("publish_timeout_secs", &self.publish_timeout_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("secret", &self.secret)
            .finish()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for `epumgmt events`.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}, expected \"human\" or \"json\""
            )),
        }
    }
}

/// The `[telemetry]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `human` (default) or `json`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `epu_core=debug,info`; `RUST_LOG`
    /// overrides it.
    pub log_level: String,
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; none for no HTTP server.
    pub http_addr: Option<SocketAddr>,
    /// Append log lines to this file instead of writing them to stderr.
    pub log_file: Option<PathBuf>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            http_addr: None,
            log_file: None,
        }
    }
}

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The store's directory (created if absent).
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("epu-store"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://user:p%40ss:word@broker.example/vhost?heartbeat=10"),
            "amqps://user:***@broker.example/vhost?heartbeat=10"
        );
        assert_eq!(redact_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(redact_url("amqp://host:5672/x@y"), "amqp://host:5672/x@y");
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("user:secret@host"), "user:***@host");
        assert_eq!(redact_url(""), "");
        assert_eq!(redact_url("amqp://:pw@host"), "amqp://:***@host");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn bus_config_debug_redacts() {
        let bus = BusConfig {
            amqp_url: "amqp://epu:topsecret@rabbit:5672/%2f".to_owned(),
            secret: Some(Secret::new("hmac-key-42")),
            ..BusConfig::default()
        };
        let shown = format!("{bus:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("hmac-key-42"), "{shown}");
        assert!(shown.contains("amqp://epu:***@rabbit:5672/%2f"), "{shown}");
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_for("bus.amqp_url"), "EPU_BUS__AMQP_URL");
        assert_eq!(env_var_for("run"), "EPU_RUN");
    }

    #[test]
    fn defaults_without_file_or_env() {
        let bus: BusConfig = load(None, &HashMap::new()).unwrap();
        assert_eq!(bus, BusConfig::default());
        let tel: TelemetryConfig = load(None, &HashMap::new()).unwrap();
        assert_eq!(tel, TelemetryConfig::default());
    }

    #[test]
    fn unknown_extension_is_refused() {
        let err = load::<BusConfig>(Some(Path::new("/x/prov.ini")), &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("/x/prov.ini"), "{err}");
        assert!(err.to_string().contains("*.toml"), "{err}");
    }

    #[test]
    fn unknown_field_parsing() {
        assert_eq!(
            parse_unknown_field("unknown field `prefech`, expected one of `a`, `b`"),
            Some(("prefech".to_owned(), "expected one of `a`, `b`".to_owned()))
        );
        assert_eq!(parse_unknown_field("something else"), None);
    }

    #[test]
    fn non_epu_variables_are_ignored() {
        let env: HashMap<String, String> = [
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("EPUX_PREFETCH".to_owned(), "1".to_owned()),
            ("EPU_".to_owned(), "1".to_owned()),
        ]
        .into_iter()
        .collect();
        let bus: BusConfig = load(None, &env).unwrap();
        assert_eq!(bus, BusConfig::default());
    }
}
