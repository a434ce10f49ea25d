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

/// The type of the run's durable queues (its service queues and `epu.<run>.dead`).
///
/// The default is [`QueueType::Classic`]:
/// - a queue keeps the type it was created with, and RabbitMQ refuses to declare it
///   as another (`PRECONDITION_FAILED`, 406). Every run created before this setting
///   existed has classic queues; a quorum default would stop each of them at its
///   services' next start until the run was killed (its queues deleted) or the
///   setting put back. Classic keeps an upgrade a non-event.
/// - on a single broker, which is what `bus.amqp_url` names unless it lists several,
///   a quorum queue buys nothing: durable classic queues with persistent messages and
///   publisher confirms already lose nothing a confirm covered, while a quorum queue
///   costs a Raft log (more fsyncs, memory per queue) on every message.
///
/// Choose [`QueueType::Quorum`] for a run on a RabbitMQ cluster (3.8 or later): its
/// queues are then replicated on the cluster's nodes and survive the loss of a
/// minority of them, where a classic queue is unreachable while its one node is down.
/// Set it for every service of the run, before the run's first start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum QueueType {
    /// One node holds each queue (RabbitMQ's classic queues).
    #[default]
    Classic,
    /// Replicated on the cluster's nodes with Raft (`x-queue-type: quorum`).
    Quorum,
}

impl QueueType {
    /// The name in config and in `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for QueueType {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "unknown queue type {other:?}, expected \"classic\" or \"quorum\""
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
    /// The broker URL, or several (the nodes of one cluster) separated by commas:
    /// `amqp://u:p@rabbit1:5672/%2f,amqp://u:p@rabbit2:5672/%2f`. The bus connects to
    /// the first that answers, and after losing a connection tries the others first
    /// (see [`split_amqp_urls`](super::split_amqp_urls)). Passwords are redacted in
    /// `Debug`.
    pub amqp_url: String,
    /// The type of the run's durable queues: `classic` (default) or `quorum`; see
    /// [`QueueType`] for the choice.
    pub queue_type: QueueType,
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
            queue_type: QueueType::Classic,
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

    /// The broker URLs `amqp_url` lists, in order.
    pub fn amqp_urls(&self) -> Vec<String> {
        super::split_amqp_urls(&self.amqp_url)
    }
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("transport", &self.transport)
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("queue_type", &self.queue_type)
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

    #[test]
    fn bus_config_debug_redacts_every_url_of_a_list() {
        let bus = BusConfig {
            amqp_url: "amqp://epu:first-pw@r1:5672/%2f,amqp://epu:second-pw@r2:5672/%2f".to_owned(),
            ..BusConfig::default()
        };
        let shown = format!("{bus:?}");
        assert!(!shown.contains("first-pw"), "{shown}");
        assert!(!shown.contains("second-pw"), "{shown}");
        assert!(
            shown.contains("amqp://epu:***@r1:5672/%2f,amqp://epu:***@r2:5672/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn queue_type_default_is_classic() {
        assert_eq!(BusConfig::default().queue_type, QueueType::Classic);
        assert_eq!(QueueType::default(), QueueType::Classic);
    }

    #[test]
    fn queue_type_values() {
        let cases: &[(&str, Result<QueueType, &str>)] = &[
            ("classic", Ok(QueueType::Classic)),
            ("quorum", Ok(QueueType::Quorum)),
            ("Quorum", Err("unknown queue type \"Quorum\"")),
            ("stream", Err("unknown queue type \"stream\"")),
            ("", Err("unknown queue type \"\"")),
        ];
        for (given, want) in cases {
            let got = QueueType::try_from((*given).to_owned());
            match (want, &got) {
                (Ok(want), Ok(got)) => assert_eq!(got, want, "{given:?}"),
                (Err(want), Err(got)) => {
                    assert!(got.contains(want), "{given:?}: {got}");
                    assert!(got.contains("\"classic\" or \"quorum\""), "{got}");
                }
                _ => panic!("{given:?}: got {got:?}, want {want:?}"),
            }
        }
        for t in [QueueType::Classic, QueueType::Quorum] {
            assert_eq!(QueueType::try_from(t.to_string()), Ok(t));
        }
    }

    #[test]
    fn queue_type_from_file_and_env() {
        use std::collections::HashMap;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("bus.toml");
        std::fs::write(&file, "queue_type = \"quorum\"\n").expect("write");
        let none = HashMap::new();
        let bus: BusConfig = crate::config::load(Some(&file), &none).expect("load");
        assert_eq!(bus.queue_type, QueueType::Quorum);

        let env: HashMap<String, String> =
            [("EPU_QUEUE_TYPE".to_owned(), "classic".to_owned())].into();
        let bus: BusConfig = crate::config::load(Some(&file), &env).expect("load");
        assert_eq!(
            bus.queue_type,
            QueueType::Classic,
            "EPU_QUEUE_TYPE overrides the file"
        );
        assert_eq!(
            crate::config::env_var_for("bus.queue_type"),
            "EPU_BUS__QUEUE_TYPE"
        );
    }

    #[test]
    fn bad_queue_type_names_the_key() {
        use std::collections::HashMap;
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Svc {
            #[serde(default)]
            bus: BusConfig,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("svc.toml");
        std::fs::write(&file, "[bus]\nqueue_type = \"mirrored\"\n").expect("write");
        let err = crate::config::load::<Svc>(Some(&file), &HashMap::new()).unwrap_err();
        let shown = err.to_string();
        assert_eq!(err.key(), Some("bus.queue_type"), "{shown}");
        assert!(shown.contains(&file.display().to_string()), "{shown}");
        assert!(shown.contains("\"mirrored\""), "{shown}");
        assert!(shown.contains("\"classic\" or \"quorum\""), "{shown}");

        let env: HashMap<String, String> =
            [("EPU_BUS__QUEUE_TYPE".to_owned(), "Quorum".to_owned())].into();
        let err = crate::config::load::<Svc>(None, &env).unwrap_err();
        let shown = err.to_string();
        assert_eq!(err.key(), Some("bus.queue_type"), "{shown}");
        assert!(shown.contains("EPU_BUS__QUEUE_TYPE"), "{shown}");
    }

    #[test]
    fn amqp_urls_of_the_section() {
        let one = BusConfig::default();
        assert_eq!(one.amqp_urls(), vec![one.amqp_url.clone()]);
        let two = BusConfig {
            amqp_url: "amqp://a:1@h1/%2f, amqp://a:1@h2/%2f".to_owned(),
            ..BusConfig::default()
        };
        assert_eq!(
            two.amqp_urls(),
            vec!["amqp://a:1@h1/%2f", "amqp://a:1@h2/%2f"]
        );
    }
}
