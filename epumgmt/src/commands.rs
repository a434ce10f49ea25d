//! The operator's commands that read or change a run without looking inside it:
//! events, reconfigure, list-runs; and the tables every command prints.

use epu_core::telemetry::{parse_event_line, EventRecord};
use epu_model::messages::ReconfigureRequest;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::client::Client;
use crate::rundir::{list_runs, user_error, RunRecord};

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

pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value as a table cell: `-` for none, strings bare, the rest as JSON writes it.
pub fn cell<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).map_or_else(|_| "-".into(), |v| s(&v))
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
    use epu_model::messages::FailReason;

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
