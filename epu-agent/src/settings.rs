//! Where the agent's settings come from: the environment the provisioner gives a
//! local worker, or a `KEY=VALUE` settings file (EC2 user data), both read by one
//! pure function of a map so tests pass a `HashMap`.
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `EPU_NODE_ID` | this worker's node id | required |
//! | `EPU_RUN` | the run name | required |
//! | `EPU_DOMAIN` | the domain | required |
//! | `EPU_AMQP_URL` (or `EPU_BUS__AMQP_URL`) | heartbeat over RabbitMQ to this broker | — |
//! | `EPU_RUN_DIR` | without a broker URL: the standalone host's socket `<run_dir>/epu.sock` | — |
//! | `EPU_BUS__TRANSPORT` | `amqp` or `local`; forces the choice above | by the keys present |
//! | `EPU_HEARTBEAT_INTERVAL` (or `EPU_HEARTBEAT__INTERVAL_SECS`) | seconds between heartbeats (fractions allowed) | 1 |
//! | `EPU_JOBS_FILE` | the jobs file to hand the worker | a fresh temporary file |
//! | `EPU_TELEMETRY__LOG_FORMAT` | the agent's own log lines: `human` or `json` | `human` |
//!
//! The doubled-underscore names are the ones the provisioner's local driver sets
//! (they follow `epu_core::config`'s override scheme); the short names are for
//! people and user data. When both spellings are present the short one wins.
//!
//! A settings file (`--settings FILE`) holds `KEY=VALUE` lines with the same keys.
//! Blank lines, `#` comments, a leading `export ` and quotes around the value
//! (`KEY="v"`, `KEY='v'`) are accepted; any other line (a `#!/bin/sh`, a command) is
//! skipped, so the file may be a whole user-data script with the settings lines in
//! it. Only `EPU_*` keys are read. **The environment wins** over the file for a key
//! set in both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use epu_core::config::{redact_url, LogFormat, Secret};
use epu_core::wire::RunName;

/// The default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How much of the worker's stderr a PROCESS_ERROR heartbeat carries.
pub const DEFAULT_STDERR_TAIL_BYTES: usize = 2048;

/// How the agent reaches the sensor aggregator.
#[derive(Clone, PartialEq, Eq)]
pub enum Transport {
    /// RabbitMQ at this URL (its password is never printed).
    Amqp { url: Secret },
    /// The standalone host's Unix socket.
    Socket { path: PathBuf },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Amqp { url } => write!(f, "Amqp({})", redact_url(url.expose())),
            Transport::Socket { path } => write!(f, "Socket({})", path.display()),
        }
    }
}

/// Everything the agent needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub node_id: String,
    pub run: RunName,
    pub domain: String,
    pub transport: Transport,
    pub heartbeat_interval: Duration,
    /// The jobs file to hand the worker; `None`: a fresh temporary file.
    pub jobs_file: Option<PathBuf>,
    pub stderr_tail_bytes: usize,
    pub log_format: LogFormat,
}

/// A setting that is missing or wrong. Messages name the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("missing setting {key}: set it in the environment or in the --settings file")]
    Missing { key: &'static str },
    #[error("setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("no way to reach the sensor aggregator: set EPU_AMQP_URL (RabbitMQ) or EPU_RUN_DIR (standalone host)")]
    NoTransport,
    #[error("cannot read the settings file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The `EPU_*` keys of a settings file (see the module docs). Never fails: lines
/// that are not `KEY=VALUE` are skipped.
pub fn parse_settings_file(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let valid_key = key.starts_with("EPU_")
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid_key {
            continue;
        }
        out.insert(key.to_string(), unquote(value.trim()).to_string());
    }
    out
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// Reads a settings file from disk.
pub fn read_settings_file(path: &Path) -> Result<HashMap<String, String>, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::File {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_settings_file(&text))
}

impl AgentSettings {
    /// Resolves the settings from the environment `env` over the settings file's
    /// keys `file` (the environment wins). Pure: no IO.
    pub fn resolve(
        env: &HashMap<String, String>,
        file: &HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let get = |keys: &[&str]| -> Option<String> {
            for source in [env, file] {
                for k in keys {
                    if let Some(v) = source.get(*k) {
                        let v = v.trim();
                        if !v.is_empty() {
                            return Some(v.to_string());
                        }
                    }
                }
            }
            None
        };
        let node_id = get(&["EPU_NODE_ID"]).ok_or(SettingsError::Missing { key: "EPU_NODE_ID" })?;
        let run_name = get(&["EPU_RUN"]).ok_or(SettingsError::Missing { key: "EPU_RUN" })?;
        let run = RunName::new(&run_name).map_err(|e| SettingsError::Invalid {
            key: "EPU_RUN",
            message: e.to_string(),
        })?;
        let domain = get(&["EPU_DOMAIN"]).ok_or(SettingsError::Missing { key: "EPU_DOMAIN" })?;

        let url = get(&["EPU_AMQP_URL", "EPU_BUS__AMQP_URL"]);
        let run_dir = get(&["EPU_RUN_DIR"]).map(PathBuf::from);
        let socket = |dir: PathBuf| Transport::Socket {
            path: dir.join(epu_core::bus::socket::SOCKET_FILE),
        };
        let transport = match get(&["EPU_BUS__TRANSPORT"]).as_deref() {
            Some("local") => socket(run_dir.ok_or(SettingsError::Missing { key: "EPU_RUN_DIR" })?),
            Some("amqp") => Transport::Amqp {
                url: Secret::new(url.ok_or(SettingsError::Missing {
                    key: "EPU_AMQP_URL",
                })?),
            },
            Some(other) => {
                return Err(SettingsError::Invalid {
                    key: "EPU_BUS__TRANSPORT",
                    message: format!("{other:?}: expected \"amqp\" or \"local\""),
                })
            }
            None => match (url, run_dir) {
                (Some(url), _) => Transport::Amqp {
                    url: Secret::new(url),
                },
                (None, Some(dir)) => socket(dir),
                (None, None) => return Err(SettingsError::NoTransport),
            },
        };

        let heartbeat_interval =
            match get(&["EPU_HEARTBEAT_INTERVAL", "EPU_HEARTBEAT__INTERVAL_SECS"]) {
                None => DEFAULT_HEARTBEAT_INTERVAL,
                Some(s) => parse_interval(&s).map_err(|message| SettingsError::Invalid {
                    key: "EPU_HEARTBEAT_INTERVAL",
                    message,
                })?,
            };
        let log_format = match get(&["EPU_TELEMETRY__LOG_FORMAT"]) {
            None => LogFormat::Human,
            Some(s) => LogFormat::try_from(s).map_err(|message| SettingsError::Invalid {
                key: "EPU_TELEMETRY__LOG_FORMAT",
                message,
            })?,
        };
        Ok(AgentSettings {
            node_id,
            run,
            domain,
            transport,
            heartbeat_interval,
            jobs_file: get(&["EPU_JOBS_FILE"]).map(PathBuf::from),
            stderr_tail_bytes: DEFAULT_STDERR_TAIL_BYTES,
            log_format,
        })
    }
}

/// Seconds (fractions allowed) between 0.01 and 3600.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.01..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: use between 0.01 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: [(&str, &str); 3] = [
        ("EPU_NODE_ID", "n-1"),
        ("EPU_RUN", "demo"),
        ("EPU_DOMAIN", "web"),
    ];

    fn with(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m = map(&BASE);
        m.extend(map(extra));
        m
    }

    #[test]
    fn amqp_from_either_spelling_and_socket_from_run_dir() {
        let none = HashMap::new();
        let s = AgentSettings::resolve(&with(&[("EPU_AMQP_URL", "amqp://u:pw@h/")]), &none)
            .expect("ok");
        assert_eq!(
            s.transport,
            Transport::Amqp {
                url: Secret::new("amqp://u:pw@h/")
            }
        );
        assert_eq!(s.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert!(!format!("{s:?}").contains("pw"), "{s:?}");

        let s = AgentSettings::resolve(&with(&[("EPU_BUS__AMQP_URL", "amqp://h/")]), &none)
            .expect("ok");
        assert!(matches!(s.transport, Transport::Amqp { .. }));

        let s = AgentSettings::resolve(&with(&[("EPU_RUN_DIR", "/r")]), &none).expect("ok");
        assert_eq!(
            s.transport,
            Transport::Socket {
                path: PathBuf::from("/r/epu.sock")
            }
        );
        // The provisioner says "local" explicitly even when a URL leaks in.
        let s = AgentSettings::resolve(
            &with(&[
                ("EPU_RUN_DIR", "/r"),
                ("EPU_BUS__TRANSPORT", "local"),
                ("EPU_AMQP_URL", "amqp://h/"),
            ]),
            &none,
        )
        .expect("ok");
        assert!(matches!(s.transport, Transport::Socket { .. }));
    }

    #[test]
    fn missing_and_bad_settings_name_the_key() {
        let none = HashMap::new();
        let e = AgentSettings::resolve(&map(&[("EPU_RUN", "r")]), &none).expect_err("no node");
        assert!(e.to_string().contains("EPU_NODE_ID"), "{e}");
        let e = AgentSettings::resolve(&with(&[]), &none).expect_err("no transport");
        assert!(matches!(e, SettingsError::NoTransport), "{e}");
        let e = AgentSettings::resolve(
            &with(&[("EPU_RUN_DIR", "/r"), ("EPU_HEARTBEAT_INTERVAL", "0")]),
            &none,
        )
        .expect_err("zero");
        assert!(e.to_string().contains("EPU_HEARTBEAT_INTERVAL"), "{e}");
        let e = AgentSettings::resolve(
            &with(&[("EPU_RUN_DIR", "/r"), ("EPU_RUN", "Bad Run")]),
            &none,
        )
        .expect_err("run");
        assert!(e.to_string().contains("EPU_RUN"), "{e}");
        let e = AgentSettings::resolve(&with(&[("EPU_BUS__TRANSPORT", "amqp")]), &none)
            .expect_err("amqp without url");
        assert!(e.to_string().contains("EPU_AMQP_URL"), "{e}");
    }

    #[test]
    fn intervals_in_either_spelling() {
        let none = HashMap::new();
        let s = AgentSettings::resolve(
            &with(&[
                ("EPU_RUN_DIR", "/r"),
                ("EPU_HEARTBEAT__INTERVAL_SECS", "0.25"),
            ]),
            &none,
        )
        .expect("ok");
        assert_eq!(s.heartbeat_interval, Duration::from_millis(250));
        let s = AgentSettings::resolve(
            &with(&[
                ("EPU_RUN_DIR", "/r"),
                ("EPU_HEARTBEAT__INTERVAL_SECS", "0.25"),
                ("EPU_HEARTBEAT_INTERVAL", "2"),
            ]),
            &none,
        )
        .expect("ok");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
    }

    #[test]
    fn settings_file_is_lenient_and_the_environment_wins() {
        let text = "#!/bin/sh\n# user data\nexport EPU_NODE_ID=n-9\nEPU_RUN='demo'\n\
                    EPU_DOMAIN=\"web\"\nEPU_AMQP_URL=amqp://file/\nnot a setting\n\
                    lower_case=x\nEPU_HEARTBEAT_INTERVAL = 3\n/usr/local/bin/epu-agent -- ./w.sh\n";
        let file = parse_settings_file(text);
        assert_eq!(file.get("EPU_NODE_ID").map(String::as_str), Some("n-9"));
        assert_eq!(file.get("EPU_RUN").map(String::as_str), Some("demo"));
        assert_eq!(file.get("EPU_DOMAIN").map(String::as_str), Some("web"));
        assert!(!file.contains_key("lower_case"));
        let s = AgentSettings::resolve(&HashMap::new(), &file).expect("ok");
        assert_eq!(s.node_id, "n-9");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(3));
        let env = map(&[("EPU_NODE_ID", "from-env"), ("PATH", "/bin")]);
        let s = AgentSettings::resolve(&env, &file).expect("ok");
        assert_eq!(s.node_id, "from-env");
        assert_eq!(
            s.transport,
            Transport::Amqp {
                url: Secret::new("amqp://file/")
            }
        );
    }
}
