//! Telemetry: structured logs, lifecycle events, Prometheus metrics, and the
//! `/metrics` `/healthz` `/readyz` HTTP endpoint.
//!
//! # Logs
//!
//! [`init_tracing`] installs the process-wide `tracing` subscriber from a
//! [`TelemetryConfig`]: human-readable or JSON lines, to stderr or appended to a file,
//! filtered by `log_level` unless `RUST_LOG` is set (then `RUST_LOG` wins). The format is
//! whatever the config says: this module reads no other environment variable, so a binary
//! that wants `--json` or `EPU_TELEMETRY__LOG_FORMAT=json` gets it through the config.
//!
//! # Lifecycle events
//!
//! Things an operator wants on a timeline (a node changed state, an engine decided, a
//! domain was reconfigured) are logged as ordinary `tracing` events with an `event` field
//! naming them, from [`events`], and the standard field names of [`fields`]:
//!
//! ```
//! use epu_core::telemetry::events;
//! let node_id = "n-1";
//! tracing::info!(
//!     event = events::NODE_STATE,
//!     node_id = %node_id,
//!     state = "RUNNING",
//!     "node is running"
//! );
//! ```
//!
//! In JSON format each such event is one line with `timestamp` (RFC 3339, UTC), `level`,
//! `target`, `event`, the fields, and `message`. [`parse_event_line`] reads one back;
//! `epumgmt events` builds its timelines with it. Lines without an `event` field are
//! ordinary logs and are skipped.
//!
//! # Metrics and health
//!
//! [`Metrics`] wraps a private Prometheus registry (not the global default one, so
//! several services in one process — the standalone mode — and parallel tests do not
//! collide). [`Health`] is the readiness flag a service raises once it is serving.
//! [`serve_http`] serves both; [`spawn_http`] binds and spawns it.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Errors of telemetry setup and serving.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `log_level` or `RUST_LOG` is not a valid filter.
    #[error("invalid log filter {directive:?} (from {from}): {message}; use a level such as \"info\" or directives such as \"epu_core=debug,info\"")]
    Filter {
        /// The directive as given.
        directive: String,
        /// "telemetry.log_level" or "RUST_LOG".
        from: &'static str,
        /// What the parser said.
        message: String,
    },
    /// The log file cannot be opened.
    #[error("cannot open log file {} for appending: {source}; check that its directory exists and is writable", path.display())]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP address cannot be bound.
    #[error("cannot bind the telemetry http server to {addr}: {source}; is another service on that port? choose another telemetry.http_addr, or port 0")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed while serving.
    #[error("telemetry http server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// A metric could not be registered or encoded.
    #[error("metrics error: {0}; is a metric of that name registered twice?")]
    Metrics(#[from] prometheus::Error),
}

// ---------------------------------------------------------------------------------------
// logs

/// Builds the filter: `RUST_LOG` when set and non-empty, else `log_level`.
fn build_filter(log_level: &str, rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    let (directive, from) = match rust_log {
        Some(value) if !value.trim().is_empty() => (value, "RUST_LOG"),
        _ => (log_level, "telemetry.log_level"),
    };
    EnvFilter::try_new(directive).map_err(|e| TelemetryError::Filter {
        directive: directive.to_owned(),
        from,
        message: e.to_string(),
    })
}

/// The JSON subscriber that [`init_tracing`] installs for `log_format = "json"`: one
/// flattened JSON object per line with an RFC 3339 `timestamp`, `level` and `target`.
/// Public so tests can capture exactly that format into a buffer.
pub fn json_subscriber<W>(
    log_level: &str,
    writer: W,
) -> Result<impl tracing::Subscriber + Send + Sync + 'static, TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = build_filter(log_level, None)?;
    Ok(json_with_filter(filter, writer))
}

fn json_with_filter<W>(
    filter: EnvFilter,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_target(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_ansi(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .finish()
}

/// Installs the process-wide subscriber described by `cfg` (see the module docs).
///
/// Safe to call more than once: if a subscriber is already installed (by an earlier
/// call, or by a test harness), this returns `Ok` and changes nothing. A bad filter or an
/// unopenable log file is still reported.
pub fn init_tracing(cfg: &TelemetryConfig) -> Result<(), TelemetryError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = build_filter(&cfg.log_level, rust_log.as_deref())?;

    let (writer, to_terminal) = match &cfg.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| TelemetryError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            (BoxMakeWriter::new(file), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };

    // An Err from try_init means a global subscriber is already set: keep it.
    let _already_set = match cfg.log_format {
        LogFormat::Json => json_with_filter(filter, writer).try_init().is_err(),
        LogFormat::Human => tracing_subscriber::fmt()
            .with_ansi(to_terminal)
            .with_target(true)
            .with_env_filter(filter)
            .with_writer(writer)
            .finish()
            .try_init()
            .is_err(),
    };
    Ok(())
}

/// Names of lifecycle events, the values of the `event` field.
pub mod events {
    /// A service finished starting and is serving.
    pub const SERVICE_STARTED: &str = "service_started";
    /// A service answers on its queue and raised its readiness.
    pub const SERVICE_READY: &str = "service_ready";
    /// The telemetry HTTP server is bound (`addr`); `epumgmt` finds services by it.
    pub const HTTP_LISTENING: &str = "http_listening";
    /// A service is shutting down.
    pub const SERVICE_STOPPING: &str = "service_stopping";
    /// A node record moved to a new state (`node_id`, `state`, `reason`).
    pub const NODE_STATE: &str = "node_state";
    /// A launch was asked of the IaaS (`node_id`, `launch_id`, `site`).
    pub const NODE_LAUNCH_REQUESTED: &str = "node_launch_requested";
    /// A termination was asked of the IaaS (`node_id`, `iaas_id`).
    pub const NODE_TERMINATE_REQUESTED: &str = "node_terminate_requested";
    /// The aggregator's health judgement of a node changed (`node_id`, `health`).
    pub const NODE_HEALTH: &str = "node_health";
    /// An instance the IaaS lists but the store does not know was terminated.
    pub const ZOMBIE_TERMINATED: &str = "zombie_terminated";
    /// An engine decided to launch or destroy (`domain`, `engine`, `launch`, `destroy`).
    pub const DECISION: &str = "decision";
    /// A domain was added to a controller.
    pub const DOMAIN_ADDED: &str = "domain_added";
    /// A domain was removed from a controller.
    pub const DOMAIN_REMOVED: &str = "domain_removed";
    /// A domain's config was changed (or a change refused: `accepted = false`).
    pub const DOMAIN_RECONFIGURED: &str = "domain_reconfigured";
    /// `terminate_all` started; the provisioner is disabled.
    pub const TERMINATE_ALL_STARTED: &str = "terminate_all_started";
    /// `terminate_all` finished: nothing of the run is left.
    pub const TERMINATE_ALL_DONE: &str = "terminate_all_done";
    /// The provisioner was enabled again.
    pub const PROVISIONER_ENABLED: &str = "provisioner_enabled";
    /// A message was dead-lettered (`op`, `reason`).
    pub const MESSAGE_REJECTED: &str = "message_rejected";
    /// The bus connection came up.
    pub const BUS_CONNECTED: &str = "bus_connected";
    /// The bus connection was lost; the service is reconnecting.
    pub const BUS_DISCONNECTED: &str = "bus_disconnected";
}

/// Standard field names of lifecycle events, so every service spells them alike.
pub mod fields {
    /// The `event` field itself.
    pub const EVENT: &str = "event";
    /// The run name.
    pub const RUN: &str = "run";
    /// The service ("provisioner", "controller", …).
    pub const SERVICE: &str = "service";
    /// The domain id.
    pub const DOMAIN: &str = "domain";
    /// The node id (ours, not the IaaS's).
    pub const NODE_ID: &str = "node_id";
    /// The IaaS's instance id.
    pub const IAAS_ID: &str = "iaas_id";
    /// The launch id.
    pub const LAUNCH_ID: &str = "launch_id";
    /// A node state name.
    pub const STATE: &str = "state";
    /// A failure reason (`IAAS_FULL`, `NODE_DISAPPEARED`, …).
    pub const REASON: &str = "reason";
}

/// One lifecycle event read back from a JSON log line.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// When it was logged.
    pub timestamp: DateTime<Utc>,
    /// `TRACE` … `ERROR`.
    pub level: String,
    /// The module that logged it, when the line says.
    pub target: Option<String>,
    /// The event name (`node_state`, …).
    pub event: String,
    /// Every other field of the line, `message` included.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Reads one JSON log line; `Some` only for a lifecycle event, that is a JSON object with
/// a string `event`, a string `level` and an RFC 3339 `timestamp`. Anything else (an
/// ordinary log line, a human-format line, a torn last line) is `None`.
pub fn parse_event_line(line: &str) -> Option<EventRecord> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let serde_json::Value::Object(mut map) = value else {
        return None;
    };
    let event = match map.remove("event") {
        Some(serde_json::Value::String(s)) => s,
        _ => return None,
    };
    let level = match map.remove("level") {
        Some(serde_json::Value::String(s)) => s,
        _ => return None,
    };
    let timestamp = match map.remove("timestamp") {
        Some(serde_json::Value::String(s)) => {
            DateTime::parse_from_rfc3339(&s).ok()?.with_timezone(&Utc)
        }
        _ => return None,
    };
    let target = match map.remove("target") {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    Some(EventRecord {
        timestamp,
        level,
        target,
        event,
        fields: map,
    })
}

// ---------------------------------------------------------------------------------------
// metrics and health

/// A service's Prometheus registry. Clones share the registry.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: prometheus::Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Metrics::default()
    }

    /// The registry, to register collectors with.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Registers a collector (a counter, a gauge, …; clone it first to keep a handle).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), TelemetryError> {
        self.registry.register(collector)?;
        Ok(())
    }

    /// Everything registered, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> Result<String, TelemetryError> {
        let families = self.registry.gather();
        Ok(prometheus::TextEncoder::new().encode_to_string(&families)?)
    }
}

/// A service's readiness flag, shared between the service and the HTTP endpoint. Starts
/// not ready. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// A flag that says "not ready".
    pub fn new() -> Self {
        Health::default()
    }

    /// Raises or lowers readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the service says it is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// http

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    health: Health,
}

async fn metrics_handler(State(state): State<HttpState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
        }
    }
}

async fn healthz_handler() -> &'static str {
    "ok"
}

async fn readyz_handler(State(state): State<HttpState>) -> Response {
    if state.health.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The telemetry routes: `GET /metrics`, `GET /healthz` (always 200 "ok" while serving),
/// `GET /readyz` (200 "ready" or 503 "not ready"). Public so a service with its own HTTP
/// server can merge them.
pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(HttpState { metrics, health })
}

/// Serves [`router`] on an already-bound `listener` until `shutdown` completes, then
/// finishes the requests in flight and returns.
pub async fn serve_http<S>(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: S,
) -> Result<(), TelemetryError>
where
    S: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(TelemetryError::Serve)
}

/// Binds `addr` (port 0 picks a free port) and spawns [`serve_http`] on it. Returns the
/// address actually bound and the server task.
pub async fn spawn_http<S>(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    shutdown: S,
) -> Result<(SocketAddr, JoinHandle<Result<(), TelemetryError>>), TelemetryError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    tracing::info!(event = events::HTTP_LISTENING, addr = %bound, "serving /metrics /healthz /readyz");
    let task = tokio::spawn(serve_http(listener, metrics, health, shutdown));
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    /// A `MakeWriter` that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    struct BufferWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for BufferWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = BufferWriter;
        fn make_writer(&'a self) -> Self::Writer {
            BufferWriter(self.0.clone())
        }
    }

    #[test]
    fn events_logged_in_json_parse_back() {
        let buffer = Buffer::default();
        let subscriber = json_subscriber("debug", buffer.clone()).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                event = events::NODE_STATE,
                node_id = %"n-42",
                state = "RUNNING",
                attempt = 3u64,
                "node is running"
            );
            tracing::info!(answer = 42, "an ordinary log line");
            tracing::warn!(event = events::DECISION, domain = "d1", launch = 2u64);
            tracing::trace!(event = events::NODE_STATE, "filtered out");
        });
        let lines = buffer.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");

        let records: Vec<EventRecord> = lines.iter().filter_map(|l| parse_event_line(l)).collect();
        assert_eq!(records.len(), 2, "{lines:#?}");

        let first = &records[0];
        assert_eq!(first.event, "node_state");
        assert_eq!(first.level, "INFO");
        assert_eq!(first.target.as_deref(), Some(module_path!()));
        assert_eq!(first.fields["node_id"], "n-42");
        assert_eq!(first.fields["state"], "RUNNING");
        assert_eq!(first.fields["attempt"], 3);
        assert_eq!(first.fields["message"], "node is running");
        let age = Utc::now() - first.timestamp;
        assert!(
            age.num_seconds().abs() < 60,
            "timestamp {}",
            first.timestamp
        );

        assert_eq!(records[1].event, "decision");
        assert_eq!(records[1].level, "WARN");
        assert_eq!(records[1].fields["launch"], 2);
    }

    #[test]
    fn parse_event_line_rejects_non_events() {
        assert_eq!(parse_event_line(""), None);
        assert_eq!(parse_event_line("2024-01-01T00:00:00Z  INFO hello"), None);
        assert_eq!(parse_event_line("[1,2]"), None);
        assert_eq!(
            parse_event_line(
                r#"{"timestamp":"2024-01-01T00:00:00Z","level":"INFO","message":"x"}"#
            ),
            None
        );
        assert_eq!(
            parse_event_line(r#"{"timestamp":"yesterday","level":"INFO","event":"x"}"#),
            None
        );
        assert_eq!(
            parse_event_line(r#"{"timestamp":"2024-01-01T00:00:00Z","level":"INFO","event":"x""#),
            None
        );
        let ok = parse_event_line(
            r#"{"timestamp":"2024-01-01T00:00:00.5+01:00","level":"INFO","event":"x","k":1}"#,
        )
        .unwrap();
        assert_eq!(ok.timestamp.to_rfc3339(), "2023-12-31T23:00:00.500+00:00");
        assert_eq!(ok.target, None);
        assert_eq!(ok.fields.len(), 1);
    }

    #[test]
    fn rust_log_overrides_level_and_bad_filters_are_named() {
        assert!(build_filter("info", None).is_ok());
        assert!(build_filter("info", Some("")).is_ok());
        let err = build_filter("info", Some("epu_core=loud")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("RUST_LOG") && msg.contains("epu_core=loud"),
            "{msg}"
        );
        let err = build_filter("=[", None).unwrap_err();
        assert!(err.to_string().contains("telemetry.log_level"), "{err}");
    }

    #[test]
    fn init_tracing_twice_is_ok_and_writes_to_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let cfg = TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            http_addr: None,
            log_file: Some(path.clone()),
        };
        init_tracing(&cfg).unwrap();
        init_tracing(&cfg).unwrap();
        init_tracing(&TelemetryConfig::default()).unwrap();
        assert!(path.exists());
        let bad = TelemetryConfig {
            log_file: Some(dir.path().join("no/such/dir/svc.log")),
            ..cfg
        };
        let err = init_tracing(&bad).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }

    #[test]
    fn metrics_encode_registered_collectors() {
        let metrics = Metrics::new();
        let counter = prometheus::IntCounter::new("epu_test_total", "a test counter").unwrap();
        metrics.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);
        let text = metrics.encode().unwrap();
        assert!(text.contains("epu_test_total 3"), "{text}");
        let again = prometheus::IntCounter::new("epu_test_total", "a test counter").unwrap();
        assert!(metrics.register(Box::new(again)).is_err());
        // A second registry is independent.
        assert!(!Metrics::new().encode().unwrap().contains("epu_test_total"));
    }

    #[test]
    fn health_starts_not_ready_and_clones_share() {
        let health = Health::new();
        assert!(!health.is_ready());
        let other = health.clone();
        other.set_ready(true);
        assert!(health.is_ready());
    }
}
