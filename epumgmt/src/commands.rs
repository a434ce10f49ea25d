//! The operator's commands that talk to a live run: status, inspect, events,
//! find-workers, reconfigure, list-runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use epu_core::telemetry::{parse_event_line, EventRecord};
use epu_model::lifecycle::{Health, NodeState};
use epu_model::messages::{
    DecisionRecord, DescribeDomainRequest, DescribeNodesRequest, DomainDescription, DomainSummary,
    FailReason, ListDomainsRequest, ReconfigureRequest,
};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::client::Client;
use crate::rundir::{list_runs, pid_alive, user_error, RunRecord};

/// Exit code: the service refused the request (e.g. a bad reconfigure).
pub const EXIT_REFUSED: i32 = 4;

/// Prints rows as an aligned table (see [`render_table`]).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Rows as an aligned table: a header line in capitals, then one line per row,
/// every line (the last too) ending with a newline. A cell's own line breaks and
/// tabs are shown as `\n`, `\r`, `\t` so that a row stays on one line; cells beyond
/// the headers are dropped.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |c: &str| -> String {
        c.replace('\n', "\\n")
            .replace('\r', "\\r")
            .replace('\t', "\\t")
    };
    let head: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().take(headers.len()).map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&head).chain(body.iter()) {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// GET `path` on a service's HTTP address; the status code, if it answered.
pub async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: epu\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

pub async fn service_rows(rec: &RunRecord) -> Vec<Value> {
    let mut out = Vec::new();
    for svc in &rec.services {
        let alive = svc.pid.is_some_and(pid_alive);
        let ready = match (&svc.http_addr, alive) {
            (Some(a), true) => http_status(a, "/readyz").await == Some(200),
            _ => false,
        };
        out.push(json!({
            "service": svc.name,
            "pid": svc.pid,
            "up": alive,
            "ready": ready,
            "http_addr": svc.http_addr,
            "restarts": svc.restarts,
            "log_file": svc.log_file,
        }));
    }
    out
}

pub async fn status(rec: &RunRecord, as_json: bool) -> anyhow::Result<()> {
    let services = service_rows(rec).await;
    let domains: Option<Vec<DomainSummary>> = if rec.supervisor_alive() {
        match Client::connect(rec).await {
            Ok(c) => {
                let d = c.ask(&ListDomainsRequest {}).await.ok();
                c.close().await;
                d
            }
            Err(_) => None,
        }
    } else {
        None
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "run": rec.run,
                "transport": rec.transport,
                "state": rec.state,
                "up": rec.supervisor_alive(),
                "supervisor_pid": rec.supervisor_pid,
                "run_dir": rec.run_dir,
                "services": services,
                "domains": domains,
            }))?
        );
        return Ok(());
    }
    println!(
        "run {} ({:?}, {}) in {}",
        rec.run,
        rec.transport,
        if rec.supervisor_alive() { "up" } else { "down" },
        rec.run_dir.display()
    );
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|v| {
            vec![
                s(&v["service"]),
                if v["up"] == json!(true) {
                    "up".into()
                } else {
                    "down".into()
                },
                if v["ready"] == json!(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(&v["pid"]),
                s(&v["http_addr"]),
                s(&v["restarts"]),
            ]
        })
        .collect();
    table(
        &["service", "state", "ready", "pid", "http", "restarts"],
        &rows,
    );
    println!();
    match domains {
        Some(ds) => {
            let rows: Vec<Vec<String>> = ds
                .iter()
                .map(|d| {
                    vec![
                        d.domain.clone(),
                        d.engine.clone(),
                        d.engine_state.to_string(),
                        d.desired.to_string(),
                        d.running.to_string(),
                        d.pending.to_string(),
                        d.unhealthy.to_string(),
                        cell(&d.backlog),
                    ]
                })
                .collect();
            table(
                &[
                    "domain",
                    "engine",
                    "state",
                    "desired",
                    "running",
                    "pending",
                    "unhealthy",
                    "backlog",
                ],
                &rows,
            );
        }
        None => println!("domains: the controller did not answer"),
    }
    Ok(())
}

/// One row of `inspect nodes` and `find-workers`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    pub node_id: String,
    pub domain: String,
    pub state: NodeState,
    /// As the controller last heard it; UNKNOWN if its domain did not answer.
    pub health: Health,
    pub iaas_id: Option<String>,
    pub launch_id: String,
    pub driver: String,
    pub reason: Option<FailReason>,
    pub reason_detail: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Local workers (`find-workers`): the worker's log file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// Local workers (`find-workers`): whether its process lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_alive: Option<bool>,
}

/// Node rows: the provisioner's records, with health from the controller.
pub async fn node_rows(c: &Client, domain: Option<&str>) -> anyhow::Result<Vec<NodeRow>> {
    let req = DescribeNodesRequest {
        domain: domain.map(str::to_string),
        node_ids: vec![],
        live_only: false,
    };
    let reply = c.must(&req).await?;
    let mut health: BTreeMap<String, Health> = BTreeMap::new();
    let domains: BTreeSet<String> = reply.nodes.iter().map(|n| n.domain.clone()).collect();
    for d in domains {
        if let Ok(desc) = c.ask(&DescribeDomainRequest { domain: d }).await {
            health.extend(desc.nodes.into_iter().map(|n| (n.node_id, n.health)));
        }
    }
    Ok(reply
        .nodes
        .into_iter()
        .map(|n| NodeRow {
            health: health.get(&n.node_id).copied().unwrap_or_default(),
            since: n.since(),
            node_id: n.node_id,
            domain: n.domain,
            state: n.state,
            iaas_id: n.iaas_id,
            launch_id: n.launch_id,
            driver: n.driver,
            reason: n.reason,
            reason_detail: n.reason_detail,
            log_file: None,
            process_alive: None,
        })
        .collect())
}

/// A value as a table cell: `-` for none, strings bare, the rest as JSON writes it.
fn cell<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).map_or_else(|_| "-".into(), |v| s(&v))
}

pub async fn inspect(
    rec: &RunRecord,
    what: &str,
    domain: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let c = Client::connect(rec).await?;
    let result = inspect_with(&c, what, domain, as_json).await;
    c.close().await;
    result
}

async fn inspect_with(
    c: &Client,
    what: &str,
    domain: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    match what {
        "nodes" => {
            let rows = node_rows(c, domain).await?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let t: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.node_id.clone(),
                            r.domain.clone(),
                            r.state.to_string(),
                            r.health.to_string(),
                            cell(&r.iaas_id),
                            r.launch_id.clone(),
                            cell(&r.reason),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "node_id",
                        "domain",
                        "state",
                        "health",
                        "iaas_id",
                        "launch_id",
                        "reason",
                    ],
                    &t,
                );
            }
        }
        "domains" => {
            let out = describe_domains(c, domain).await?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for d in out {
                    let m = &d.summary;
                    println!(
                        "domain {}: engine {} ({}), desired {}, running {}, pending {}, unhealthy {}, backlog {}, dry_run {}, paused {}",
                        m.domain, m.engine, m.engine_state, m.desired, m.running, m.pending,
                        m.unhealthy, cell(&m.backlog), m.dry_run, m.paused
                    );
                    println!("  config: {}", Value::Object(m.engine_conf.clone()));
                    println!("  report: {}", serde_json::to_value(&d.report)?);
                }
            }
        }
        "decisions" => {
            let mut all: Vec<DecisionRecord> = Vec::new();
            for d in describe_domains(c, domain).await? {
                all.extend(d.decisions);
            }
            all.sort_by_key(|d| d.at);
            if as_json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let t: Vec<Vec<String>> = all
                    .iter()
                    .map(|d| {
                        vec![
                            cell(&d.at),
                            d.domain.clone(),
                            d.engine.clone(),
                            d.launched.len().to_string(),
                            d.destroyed.len().to_string(),
                            d.desired.to_string(),
                            d.reasons.join("; "),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "at",
                        "domain",
                        "engine",
                        "launched",
                        "destroyed",
                        "desired",
                        "reason",
                    ],
                    &t,
                );
            }
        }
        other => anyhow::bail!("cannot inspect {other:?}: choose nodes, domains or decisions"),
    }
    Ok(())
}

/// `describe_domain` of the named domain, or of every domain of the run.
async fn describe_domains(
    c: &Client,
    domain: Option<&str>,
) -> anyhow::Result<Vec<DomainDescription>> {
    let mut out = Vec::new();
    for d in domain_names(c, domain).await? {
        out.push(c.must(&DescribeDomainRequest { domain: d }).await?);
    }
    Ok(out)
}

async fn domain_names(c: &Client, domain: Option<&str>) -> anyhow::Result<Vec<String>> {
    if let Some(d) = domain {
        return Ok(vec![d.to_string()]);
    }
    let list = c.must(&ListDomainsRequest {}).await?;
    Ok(list.into_iter().map(|d| d.domain).collect())
}

/// Every lifecycle event in the run's JSON logs, oldest first.
pub fn read_events(rec: &RunRecord) -> Vec<(String, EventRecord)> {
    let mut out = Vec::new();
    let dir = rec.run_dir.join("logs");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let source = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            if let Ok(text) = std::fs::read_to_string(&path) {
                for line in text.lines() {
                    if let Some(ev) = parse_event_line(line) {
                        out.push((source.clone(), ev));
                    }
                }
            }
        }
    }
    out.sort_by_key(|e| e.1.timestamp);
    out
}

pub fn events(rec: &RunRecord, kind: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let evs: Vec<(String, EventRecord)> = read_events(rec)
        .into_iter()
        .filter(|(_, e)| kind.is_none_or(|k| e.event == k))
        .collect();
    if as_json {
        let v: Vec<Value> = evs
            .iter()
            .map(|(src, e)| {
                json!({"timestamp": e.timestamp, "source": src, "event": e.event, "level": e.level, "fields": e.fields})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (src, e) in evs {
        let mut fields: Vec<String> = Vec::new();
        for (k, v) in &e.fields {
            if k == "message" || k == "span" || k == "spans" {
                continue;
            }
            fields.push(format!("{k}={}", s(v)));
        }
        println!(
            "{}  {:<18} {:<24} {}",
            e.timestamp.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            src,
            e.event,
            fields.join(" ")
        );
    }
    Ok(())
}

pub async fn find_workers(rec: &RunRecord, as_json: bool) -> anyhow::Result<()> {
    let c = Client::connect(rec).await?;
    let rows = node_rows(&c, None).await;
    c.close().await;
    let rows: Vec<NodeRow> = rows?
        .into_iter()
        .filter(|r| !r.state.is_terminal())
        .map(|mut r| {
            if r.driver == "local" {
                r.log_file = Some(
                    rec.run_dir
                        .join("workers")
                        .join(format!("{}.log", r.node_id)),
                );
                r.process_alive = Some(
                    r.iaas_id
                        .as_deref()
                        .and_then(|p| p.parse::<u32>().ok())
                        .is_some_and(pid_alive),
                );
            }
            r
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let t: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.node_id.clone(),
                    r.domain.clone(),
                    r.state.to_string(),
                    r.driver.clone(),
                    cell(&r.iaas_id),
                    cell(&r.log_file),
                ]
            })
            .collect();
        table(
            &[
                "node_id", "domain", "state", "driver", "iaas_id", "log_file",
            ],
            &t,
        );
    }
    Ok(())
}

/// Builds a reconfigure request from `KEY=VALUE` words: `dry_run` and `paused`
/// switch the domain; every other key goes to the engine, its value typed as a
/// policy file would type it (see [`engine_value`]).
pub fn reconfigure_request(
    domain: &str,
    assignments: &[String],
) -> anyhow::Result<ReconfigureRequest> {
    let mut req = ReconfigureRequest {
        domain: domain.to_string(),
        engine_conf: Map::new(),
        dry_run: None,
        paused: None,
    };
    if assignments.is_empty() {
        anyhow::bail!("nothing to change: give KEY=VALUE pairs, e.g. preserve_n=5");
    }
    for a in assignments {
        let Some((k, v)) = a.split_once('=') else {
            anyhow::bail!("{a:?} is not KEY=VALUE");
        };
        let (k, v) = (k.trim(), v.trim());
        let as_bool = || match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(anyhow::anyhow!("{k} must be true or false, got {v:?}")),
        };
        match k {
            "dry_run" => req.dry_run = Some(as_bool()?),
            "paused" => req.paused = Some(as_bool()?),
            "" => anyhow::bail!("{a:?} has no key"),
            _ => {
                if v.is_empty() {
                    anyhow::bail!(
                        "{k} has no value: give {k}=VALUE (for an empty string, quote it: {k}='\"\"')"
                    );
                }
                req.engine_conf.insert(k.to_string(), engine_value(v));
            }
        }
    }
    Ok(req)
}

/// An engine value as typed on the command line, read the way a policy TOML file
/// reads it: `5` is the integer 5, `2.5` a float, `true` a boolean, `"5"` or `'5'`
/// the string "5". Anything that is not a TOML scalar stays the string as typed
/// (`jobs.x`, `lots`, `hello world`), and so do TOML's dates, arrays and tables and
/// the floats JSON cannot carry (`inf`, `nan`).
pub fn engine_value(v: &str) -> Value {
    let as_typed = || Value::String(v.to_string());
    match v.parse::<toml::Value>() {
        Ok(toml::Value::Integer(i)) => json!(i),
        Ok(toml::Value::Float(f)) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(as_typed),
        Ok(toml::Value::Boolean(b)) => json!(b),
        Ok(toml::Value::String(s)) => Value::String(s),
        _ => as_typed(),
    }
}

pub async fn reconfigure(
    rec: &RunRecord,
    domain: &str,
    assignments: &[String],
    as_json: bool,
) -> anyhow::Result<()> {
    let req = reconfigure_request(domain, assignments)?;
    let c = Client::connect(rec).await?;
    let r = c.ask(&req).await;
    c.close().await;
    match r {
        Ok(v) => {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"accepted": true, "domain": v}))?
                );
            } else {
                println!(
                    "accepted: domain {domain} now has {}",
                    Value::Object(v.engine_conf)
                );
            }
            Ok(())
        }
        Err(e)
            if matches!(
                e.code,
                epu_core::wire::ErrorCode::Timeout | epu_core::wire::ErrorCode::Unavailable
            ) =>
        {
            Err(user_error(
                crate::client::EXIT_UNREACHABLE,
                format!("the controller did not answer: {}", e.message),
            ))
        }
        Err(e) => {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"accepted": false, "reason": e.message}))?
                );
            }
            Err(user_error(EXIT_REFUSED, format!("refused: {}", e.message)))
        }
    }
}

pub fn list(as_json: bool) -> anyhow::Result<()> {
    let runs = list_runs();
    if as_json {
        let v: Vec<Value> = runs
            .iter()
            .map(|r| json!({"run": r.run, "transport": r.transport, "up": r.supervisor_alive(), "state": r.state, "run_dir": r.run_dir, "created": r.created}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.run.clone(),
                format!("{:?}", r.transport).to_lowercase(),
                if r.supervisor_alive() {
                    "up".into()
                } else {
                    "down".into()
                },
                r.created.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.run_dir.display().to_string(),
            ]
        })
        .collect();
    table(&["run", "transport", "state", "created", "run_dir"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconfigure_words_become_a_request() {
        let r =
            reconfigure_request("web", &["preserve_n=5".into(), "dry_run=yes".into()]).expect("ok");
        assert_eq!(r.engine_conf.get("preserve_n"), Some(&json!(5)));
        assert_eq!(r.dry_run, Some(true));
        assert!(reconfigure_request("web", &["preserve_n".into()]).is_err());
        assert!(reconfigure_request("web", &["paused=maybe".into()]).is_err());
        assert!(reconfigure_request("web", &["=5".into()]).is_err());
        assert!(reconfigure_request("web", &[]).is_err());
    }

    #[test]
    fn reconfigure_values_are_typed_as_in_a_policy_file() {
        let table: &[(&str, Value)] = &[
            ("5", json!(5)),
            ("-3", json!(-3)),
            ("1_000", json!(1000)),
            ("2.5", json!(2.5)),
            ("1e3", json!(1000.0)),
            ("true", json!(true)),
            ("false", json!(false)),
            ("jobs.x", json!("jobs.x")),
            ("\"5\"", json!("5")),
            ("'true'", json!("true")),
            ("\"\"", json!("")),
            ("lots", json!("lots")),
            ("hello world", json!("hello world")),
            ("yes", json!("yes")),
            ("\"unterminated", json!("\"unterminated")),
            ("inf", json!("inf")),
            ("nan", json!("nan")),
            ("1979-05-27", json!("1979-05-27")),
            ("[1, 2]", json!("[1, 2]")),
            (
                "amqp://guest@host/%2f?x=1",
                json!("amqp://guest@host/%2f?x=1"),
            ),
        ];
        for (typed, want) in table {
            let r = reconfigure_request("web", &[format!("k={typed}")])
                .unwrap_or_else(|e| panic!("k={typed}: {e}"));
            assert_eq!(r.engine_conf.get("k"), Some(want), "k={typed}");
        }
        // Only the first `=` splits; spaces around the value are not part of it.
        let r = reconfigure_request("web", &["k = a=b ".into()]).expect("ok");
        assert_eq!(r.engine_conf.get("k"), Some(&json!("a=b")));
    }

    #[test]
    fn an_empty_engine_value_is_refused_and_says_how_to_quote() {
        let e = reconfigure_request("web", &["queue=".into()]).expect_err("refused");
        let m = e.to_string();
        assert!(m.contains("queue has no value"), "{m}");
        assert!(m.contains(r#"queue='""'"#), "{m}");
    }

    #[test]
    fn tables_end_with_a_newline() {
        let t = render_table(
            &["run", "state"],
            &[
                vec!["a".into(), "up".into()],
                vec!["longer".into(), "down".into()],
            ],
        );
        assert_eq!(t, "RUN     STATE\na       up\nlonger  down\n");
        // No rows: the header line alone, still ending with a newline.
        assert_eq!(render_table(&["run", "state"], &[]), "RUN  STATE\n");
        // Empty last cells are trimmed, but the line still ends.
        assert_eq!(
            render_table(&["a", "b"], &[vec!["x".into(), String::new()]]),
            "A  B\nx\n"
        );
    }

    #[test]
    fn a_cell_with_a_line_break_stays_on_its_row() {
        let t = render_table(
            &["id", "reason"],
            &[vec!["n1".into(), "exit 1\nboom".into()]],
        );
        assert_eq!(t, "ID  REASON\nn1  exit 1\\nboom\n");
        assert_eq!(t.lines().count(), 2);
    }

    #[test]
    fn cells_show_none_as_a_dash_strings_bare_and_numbers_as_json_does() {
        let table: &[(String, &str)] = &[
            (cell(&None::<String>), "-"),
            (cell(&Some("i-123")), "i-123"),
            (cell(&Some(3.0_f64)), "3.0"),
            (cell(&Some(FailReason::IaasFull)), "IAAS_FULL"),
            (cell(&7_u64), "7"),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
        let rows = vec![
            vec!["n1".to_string(), "RUNNING".into(), cell(&Some("123"))],
            vec!["n2".to_string(), "PENDING".into(), cell(&None::<String>)],
        ];
        let t = render_table(&["node_id", "state", "iaas_id"], &rows);
        assert_eq!(
            t,
            "NODE_ID  STATE    IAAS_ID\nn1       RUNNING  123\nn2       PENDING  -\n"
        );
    }
}
