//! The operator's commands that look inside a live run: status, inspect
//! nodes/domains/decisions, find-workers, and the node rows they share.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use epu_model::lifecycle::{Health, NodeState};
use epu_model::messages::{
    DecisionRecord, DescribeDomainRequest, DescribeNodesRequest, DomainDescription, DomainSummary,
    FailReason, ListDomainsRequest,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{http_status, Client};
use crate::commands::{cell, s, table};
use crate::rundir::{pid_alive, RunRecord};

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

impl NodeRow {
    /// The row's value in `column` (one of its field names), as a table cell.
    fn column(&self, column: &str) -> String {
        match column {
            "node_id" => self.node_id.clone(),
            "domain" => self.domain.clone(),
            "state" => self.state.to_string(),
            "health" => self.health.to_string(),
            "iaas_id" => cell(&self.iaas_id),
            "launch_id" => self.launch_id.clone(),
            "driver" => self.driver.clone(),
            "reason" => cell(&self.reason),
            "reason_detail" => cell(&self.reason_detail),
            "since" => cell(&self.since),
            "log_file" => cell(&self.log_file),
            "process_alive" => cell(&self.process_alive),
            _ => "-".into(),
        }
    }
}

/// Prints node rows as a table of `columns`.
fn print_nodes(rows: &[NodeRow], columns: &[&str]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| r.column(c)).collect())
        .collect();
    table(columns, &cells);
}

/// Node rows: the provisioner's records, with health from the controller.
pub async fn node_rows(c: &Client, domain: Option<&str>) -> anyhow::Result<Vec<NodeRow>> {
    let req = DescribeNodesRequest {
        domain: domain.map(str::to_string),
        node_ids: vec![],
        live_only: false,
        ..Default::default()
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
                print_nodes(
                    &rows,
                    &[
                        "node_id",
                        "domain",
                        "state",
                        "health",
                        "iaas_id",
                        "launch_id",
                        "reason",
                    ],
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
        print_nodes(
            &rows,
            &[
                "node_id", "domain", "state", "driver", "iaas_id", "log_file",
            ],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_tables_show_each_column_from_its_field() {
        let row = NodeRow {
            node_id: "n1".into(),
            domain: "web".into(),
            state: NodeState::Running,
            health: Health::Ok,
            iaas_id: None,
            launch_id: "l1".into(),
            driver: "local".into(),
            reason: Some(FailReason::ProcessExited),
            reason_detail: None,
            since: None,
            log_file: Some(PathBuf::from("/r/workers/n1.log")),
            process_alive: Some(true),
        };
        let table: &[(&str, &str)] = &[
            ("node_id", "n1"),
            ("domain", "web"),
            ("state", "RUNNING"),
            ("health", "OK"),
            ("iaas_id", "-"),
            ("launch_id", "l1"),
            ("driver", "local"),
            ("reason", "PROCESS_EXITED"),
            ("log_file", "/r/workers/n1.log"),
            ("process_alive", "true"),
            ("colour", "-"),
        ];
        for (column, want) in table {
            assert_eq!(row.column(column), *want, "{column}");
        }
    }
}
