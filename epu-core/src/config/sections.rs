//! The sections every service embeds: `[bus]`, `[telemetry]`, `[store]`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::{redact_url, Secret};

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
}
