//! Loading a service config composed of the common sections: files, overrides, errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use epu_core::config::{
    load, BusConfig, ConfigError, LogFormat, Origin, Secret, StoreConfig, TelemetryConfig,
    Transport,
};
use serde::{Deserialize, Serialize};

/// What a service's config looks like: its own keys plus the common sections.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ServiceConfig {
    run: String,
    #[serde(default)]
    bus: BusConfig,
    #[serde(default)]
    telemetry: TelemetryConfig,
    #[serde(default)]
    store: StoreConfig,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const TOML: &str = r#"
run = "r1"

[bus]
transport = "local"
amqp_url = "amqp://epu:s3cret@rabbit:5672/%2f"
prefetch = 16
secret = "hmac-key"

[telemetry]
log_format = "json"
log_level = "debug"
http_addr = "127.0.0.1:0"

[store]
path = "/var/lib/epu/prov"
"#;

const YAML: &str = r#"
run: r1
bus:
  transport: local
  amqp_url: "amqp://epu:s3cret@rabbit:5672/%2f"
  prefetch: 16
  secret: hmac-key
telemetry:
  log_format: json
  log_level: debug
  http_addr: "127.0.0.1:0"
store:
  path: /var/lib/epu/prov
"#;

fn expected() -> ServiceConfig {
    ServiceConfig {
        run: "r1".into(),
        bus: BusConfig {
            transport: Transport::Local,
            amqp_url: "amqp://epu:s3cret@rabbit:5672/%2f".into(),
            prefetch: 16,
            secret: Some(Secret::new("hmac-key")),
            ..BusConfig::default()
        },
        telemetry: TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "debug".into(),
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            log_file: None,
        },
        store: StoreConfig {
            path: PathBuf::from("/var/lib/epu/prov"),
        },
    }
}

#[test]
fn toml_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "svc.toml", TOML);
    let cfg: ServiceConfig = load(Some(&path), &HashMap::new()).unwrap();
    assert_eq!(cfg, expected());
}

#[test]
fn yaml_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["svc.yaml", "svc.yml"] {
        let path = write(dir.path(), name, YAML);
        let cfg: ServiceConfig = load(Some(&path), &HashMap::new()).unwrap();
        assert_eq!(cfg, expected(), "{name}");
    }
}

#[test]
fn sections_left_out_take_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "svc.toml",
        "run = \"r2\"\n[bus]\nprefetch = 8\n",
    );
    let cfg: ServiceConfig = load(Some(&path), &HashMap::new()).unwrap();
    assert_eq!(cfg.run, "r2");
    assert_eq!(cfg.bus.prefetch, 8);
    assert_eq!(cfg.bus.amqp_url, BusConfig::default().amqp_url);
    assert_eq!(cfg.telemetry, TelemetryConfig::default());
    assert_eq!(cfg.store, StoreConfig::default());
}

#[test]
fn env_overrides_nested_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "svc.toml", TOML);
    let vars = env(&[
        ("EPU_BUS__AMQP_URL", "amqp://u:p@other:5672/%2f"),
        ("EPU_BUS__PREFETCH", "128"),
        ("EPU_TELEMETRY__LOG_FORMAT", "human"),
        ("EPU_RUN", "from-env"),
        // Kept a string: not guessed into the number 7.
        ("EPU_BUS__SECRET", "007"),
        ("PATH", "/usr/bin"),
        ("HOME", "/root"),
    ]);
    let cfg: ServiceConfig = load(Some(&path), &vars).unwrap();
    assert_eq!(cfg.bus.amqp_url, "amqp://u:p@other:5672/%2f");
    assert_eq!(cfg.bus.prefetch, 128);
    assert_eq!(cfg.telemetry.log_format, LogFormat::Human);
    assert_eq!(cfg.run, "from-env");
    assert_eq!(cfg.bus.secret.as_ref().map(Secret::expose), Some("007"));
    // Untouched keys keep the file's values.
    assert_eq!(cfg.bus.transport, Transport::Local);
    assert_eq!(cfg.store.path, PathBuf::from("/var/lib/epu/prov"));
}

#[test]
fn env_alone_without_file() {
    let vars = env(&[
        ("EPU_RUN", "r3"),
        ("EPU_TELEMETRY__HTTP_ADDR", "127.0.0.1:9100"),
    ]);
    let cfg: ServiceConfig = load(None, &vars).unwrap();
    assert_eq!(cfg.run, "r3");
    assert_eq!(
        cfg.telemetry.http_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
    );
}

#[test]
fn unknown_key_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "prov.toml",
        "run = \"r1\"\n[bus]\nprefech = 3\n",
    );
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err:?}");
    assert_eq!(err.key(), Some("bus.prefech"));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("\"bus.prefech\""), "{msg}");
    assert!(
        msg.contains("prefetch"),
        "should list the allowed keys: {msg}"
    );

    let top = write(dir.path(), "top.yaml", "run: r1\nrunn: r2\n");
    let err = load::<ServiceConfig>(Some(&top), &HashMap::new()).unwrap_err();
    assert_eq!(err.key(), Some("runn"), "{err}");
    assert!(
        err.to_string().contains(&top.display().to_string()),
        "{err}"
    );
}

#[test]
fn unknown_env_key_names_the_variable_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "prov.toml", "run = \"r1\"\n");
    let vars = env(&[("EPU_BUS__PREFECH", "3")]);
    let err = load::<ServiceConfig>(Some(&path), &vars).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.key(), Some("bus.prefech"), "{msg}");
    assert!(msg.contains("EPU_BUS__PREFECH"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn top_level_epu_variables_of_others_are_not_overrides() {
    // Plans and workers use EPU_AMQP_URL, EPU_SECRET, EPU_NODE_ID: not config keys.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "prov.toml", "run = \"r1\"\n");
    let vars = env(&[
        ("EPU_AMQP_URL", "amqp://x:y@h/%2f"),
        ("EPU_NODE_ID", "n1"),
        ("EPU_BUS__PREFETCH", "9"),
        ("EPU_RUN", "r2"),
    ]);
    let cfg = load::<ServiceConfig>(Some(&path), &vars).unwrap();
    assert_eq!(cfg.bus.prefetch, 9, "a real override still applies");
    assert_eq!(cfg.run, "r2");
}

#[test]
fn bad_type_names_key_file_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "prov.toml",
        "run = \"r1\"\n[bus]\nprefetch = \"abc\"\n",
    );
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.key(), Some("bus.prefetch"), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "config file {}: key \"bus.prefetch\": ",
            path.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("\"abc\""), "{msg}");
    assert!(msg.contains("expected"), "{msg}");

    let path = write(
        dir.path(),
        "tel.yaml",
        "run: r1\ntelemetry:\n  log_format: xml\n",
    );
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.key(), Some("telemetry.log_format"), "{msg}");
    assert!(msg.contains("xml") && msg.contains("json"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    let path = write(
        dir.path(),
        "addr.toml",
        "run = \"r1\"\n[telemetry]\nhttp_addr = \"nowhere\"\n",
    );
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    assert_eq!(err.key(), Some("telemetry.http_addr"), "{err}");
}

#[test]
fn bad_env_value_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "prov.toml", TOML);
    let vars = env(&[("EPU_BUS__PREFETCH", "lots")]);
    let err = load::<ServiceConfig>(Some(&path), &vars).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.key(), Some("bus.prefetch"), "{msg}");
    assert!(
        matches!(&err, ConfigError::InvalidValue { origin: Origin::Env { var, .. }, .. } if var == "EPU_BUS__PREFETCH"),
        "{err:?}"
    );
    assert!(
        msg.contains("EPU_BUS__PREFETCH") && msg.contains("\"lots\""),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    // Out of range for a u16.
    let vars = env(&[("EPU_BUS__PREFETCH", "70000")]);
    let err = load::<ServiceConfig>(Some(&path), &vars).unwrap_err();
    assert_eq!(err.key(), Some("bus.prefetch"), "{err}");
}

#[test]
fn missing_required_key_is_named() {
    let err = load::<ServiceConfig>(None, &HashMap::new()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::MissingKey { .. }), "{err:?}");
    assert!(msg.contains("\"run\"") && msg.contains("EPU_RUN"), "{msg}");
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    assert!(matches!(err, ConfigError::FileNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn syntax_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "broken.toml", "run = \"r1\n[bus\n");
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let path = write(dir.path(), "broken.yaml", "run: [r1\n");
    let err = load::<ServiceConfig>(Some(&path), &HashMap::new()).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn secrets_are_redacted_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "svc.toml", TOML);
    let cfg: ServiceConfig = load(Some(&path), &HashMap::new()).unwrap();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(!shown.contains("hmac-key"), "{shown}");
    assert!(shown.contains("amqp://epu:***@rabbit:5672/%2f"), "{shown}");
    assert_eq!(
        cfg.bus.secret.as_ref().map(Secret::expose),
        Some("hmac-key")
    );
}
