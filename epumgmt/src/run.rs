//! Launching a run, supervising its services, and killing it.
//!
//! `launch` makes the run directory and starts a detached supervisor process
//! (`epumgmt supervise`). In standalone mode the supervisor *is* the host: every
//! service runs in it on the in-process bus. In AMQP mode it starts the three
//! service binaries level by level, waits for each level's `/readyz`, and restarts
//! a service that dies, with backoff. `killrun` asks the provisioner to terminate
//! everything, waits until nothing is left — checked at the IaaS, not only in the
//! provisioner's records — then stops the supervisor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use epu_core::backoff::Backoff;
use epu_core::wire::{Op, Service};
use epu_model::messages::{
    DescribeIaasReply, DescribeNodesReply, DescribeNodesRequest, TerminateAllReply,
    TerminateAllRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Map, Value};

use crate::client::Client;
use crate::plan::{LaunchPlan, PlanTransport};
use crate::rundir::{
    check_new_run_dir, pid_alive, runs_dir, user_error, write_private, RunRecord, RunState,
    ServiceRecord,
};

/// Exit code: killrun found instances or processes left.
pub const EXIT_LEFTOVERS: i32 = 5;

pub async fn launch(plan_path: &Path, run: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
    let plan = LaunchPlan::load(plan_path)?;
    let run = plan.run_name(run, plan_path)?;
    let dir = runs_dir().join(run.as_str());
    check_new_run_dir(&dir, run.as_str())?;
    if dir.exists() {
        // A stopped run of the same name: start afresh.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the old run directory {}", dir.display()))?;
    }
    for sub in ["logs", "stores", "workers", "config"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private(&dir.join("secret"), plan.secret().as_bytes())?;
    let plan_abs = std::fs::canonicalize(plan_path).unwrap_or_else(|_| plan_path.to_path_buf());
    let rec = RunRecord {
        run: run.to_string(),
        transport: plan.transport,
        amqp_url: (plan.transport == PlanTransport::Amqp).then(|| plan.amqp_url()),
        plan: plan_abs,
        run_dir: dir.clone(),
        created: chrono::Utc::now(),
        supervisor_pid: None,
        state: RunState::Starting,
        message: None,
        services: vec![],
    };
    rec.save()?;
    let exe = std::env::current_exe().context("cannot find the epumgmt executable")?;
    let out = std::fs::File::create(dir.join("logs").join("supervisor.out"))?;
    let err = out.try_clone()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("supervise")
        .arg("--run-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let child = cmd.spawn().context("cannot start the run's supervisor")?;
    let pid = child.id();
    // The supervisor outlives us; it is reaped by init when it exits.
    drop(child);
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rec = RunRecord::load(&dir)?;
        match rec.state {
            RunState::Up => {
                println!("{run}");
                eprintln!(
                    "run {run} is up ({:?}); `epumgmt status --run {run}` shows it",
                    rec.transport
                );
                return Ok(());
            }
            RunState::Failed | RunState::Stopped => {
                bail!(
                    "run {run} did not start: {}; see {}",
                    rec.message
                        .unwrap_or_else(|| "the supervisor stopped".into()),
                    dir.join("logs").display()
                );
            }
            _ => {}
        }
        if !pid_alive(pid) {
            bail!(
                "the supervisor of run {run} exited during launch; see {}",
                dir.join("logs").join("supervisor.out").display()
            );
        }
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            bail!(
                "run {run} was not up after {timeout:?}; stopped it; see {}",
                dir.join("logs").display()
            );
        }
    }
}

/// The supervisor process's entry point.
pub async fn supervise(dir: &Path) -> anyhow::Result<()> {
    let mut rec = RunRecord::load(dir)?;
    rec.supervisor_pid = Some(std::process::id());
    rec.save()?;
    let plan = LaunchPlan::load(&rec.plan)?;
    let result = match rec.transport {
        PlanTransport::Standalone => crate::host::run_standalone(&mut rec, &plan).await,
        PlanTransport::Amqp => supervise_processes(&mut rec, &plan).await,
    };
    if let Err(e) = &result {
        rec.state = RunState::Failed;
        rec.message = Some(format!("{e:#}"));
        let _ = rec.save();
    }
    result
}

/// The JSON value written for a service's own config file.
fn service_config(
    rec: &RunRecord,
    plan: &LaunchPlan,
    service: &str,
    secret: &str,
) -> anyhow::Result<Value> {
    let dir = &rec.run_dir;
    let mut cfg = match service {
        "provisioner" => plan.provisioner.clone(),
        "sensor-aggregator" => plan.sensor_aggregator.clone(),
        _ => plan.controller.clone(),
    };
    let base: Map<String, Value> = serde_json::from_value(json!({
        "run": rec.run,
        "bus": {"transport": "amqp", "amqp_url": rec.amqp_url, "secret": secret},
        "telemetry": {
            "log_format": "json",
            "log_file": dir.join("logs").join(format!("{service}.jsonl")),
            "http_addr": "127.0.0.1:0",
        },
        "store": {"path": dir.join("stores").join(service)},
    }))?;
    for (k, v) in base {
        cfg.entry(k).or_insert(v);
    }
    match service {
        "provisioner" => {
            cfg.entry("run_dir").or_insert(json!(dir));
        }
        "controller" => {
            cfg.insert("policies".into(), json!(plan.domains));
        }
        _ => {
            if !cfg.contains_key("domains") {
                cfg.insert(
                    "domains".into(),
                    Value::Array(crate::host::sensor_domains(plan)?),
                );
            }
        }
    }
    Ok(Value::Object(cfg))
}

fn service_binary(name: &str) -> PathBuf {
    let bin = if name == "controller" {
        "epu-controller".to_string()
    } else {
        name.to_string()
    };
    // Next to epumgmt (cargo puts a workspace's binaries together), else on PATH.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join(&bin);
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from(bin)
}

struct Child {
    name: String,
    proc: tokio::process::Child,
}

async fn start_service(rec: &RunRecord, name: &str) -> anyhow::Result<(Child, Option<String>)> {
    let dir = &rec.run_dir;
    let config = dir.join("config").join(format!("{name}.yaml"));
    let log = dir.join("logs").join(format!("{name}.jsonl"));
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.out")))?;
    let err = out.try_clone()?;
    let proc = tokio::process::Command::new(service_binary(name))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name} ({})", service_binary(name).display()))?;
    let mut child = Child {
        name: name.to_string(),
        proc,
    };
    // The service logs the address it bound (`http_listening`); then wait for /readyz.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut addr: Option<String> = None;
    loop {
        if let Ok(Some(status)) = child.proc.try_wait() {
            bail!(
                "{name} exited during start ({status}); see {}",
                dir.join("logs").join(format!("{name}.out")).display()
            );
        }
        if addr.is_none() {
            addr = find_http_addr(&log, offset);
        }
        if let Some(a) = &addr {
            if crate::commands::http_status(a, "/readyz").await == Some(200) {
                return Ok((child, addr));
            }
        }
        if Instant::now() > deadline {
            let _ = child.proc.kill().await;
            bail!("{name} was not ready within 90 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find_http_addr(log: &Path, offset: u64) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let start = usize::try_from(offset).ok()?.min(text.len());
    let text = String::from_utf8_lossy(&text[start..]);
    text.lines()
        .rev()
        .filter_map(epu_core::telemetry::parse_event_line)
        .filter(|e| e.event == epu_core::telemetry::events::HTTP_LISTENING)
        .find_map(|e| {
            e.fields
                .get("addr")
                .and_then(|a| a.as_str())
                .map(str::to_string)
        })
}

async fn supervise_processes(rec: &mut RunRecord, plan: &LaunchPlan) -> anyhow::Result<()> {
    let secret = rec.secret()?;
    for name in crate::plan::SERVICES {
        let cfg = service_config(rec, plan, name, &secret)?;
        write_private(
            &rec.run_dir.join("config").join(format!("{name}.yaml")),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
    }
    let mut children: Vec<Child> = Vec::new();
    let mut records: HashMap<String, ServiceRecord> = HashMap::new();
    for level in &plan.levels {
        for name in level {
            match start_service(rec, name).await {
                Ok((child, addr)) => {
                    records.insert(
                        name.clone(),
                        ServiceRecord {
                            name: name.clone(),
                            pid: child.proc.id(),
                            http_addr: addr,
                            log_file: rec.run_dir.join("logs").join(format!("{name}.jsonl")),
                            restarts: 0,
                        },
                    );
                    children.push(child);
                }
                Err(e) => {
                    stop_children(&mut children).await;
                    return Err(e);
                }
            }
        }
        rec.services = ordered(&records);
        rec.save()?;
    }
    rec.state = RunState::Up;
    rec.save()?;
    tracing::info!(event = "run_up", run = %rec.run, "every service is ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoffs: HashMap<String, epu_core::backoff::BackoffState> = HashMap::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        for child in children.iter_mut() {
            let exited = matches!(child.proc.try_wait(), Ok(Some(_)));
            if !exited {
                continue;
            }
            let name = child.name.clone();
            tracing::warn!(event = "service_died", service = %name, "restarting");
            let b = backoffs.entry(name.clone()).or_insert_with(|| {
                Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).state()
            });
            b.wait().await;
            match start_service(rec, &name).await {
                Ok((fresh, addr)) => {
                    if let Some(r) = records.get_mut(&name) {
                        r.pid = fresh.proc.id();
                        r.http_addr = addr;
                        r.restarts += 1;
                    }
                    *child = fresh;
                    b.reset();
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "restart failed; will try again")
                }
            }
            rec.services = ordered(&records);
            rec.save()?;
        }
    }
    rec.state = RunState::Stopping;
    rec.save()?;
    stop_children(&mut children).await;
    rec.state = RunState::Stopped;
    rec.save()?;
    Ok(())
}

fn ordered(records: &HashMap<String, ServiceRecord>) -> Vec<ServiceRecord> {
    crate::plan::SERVICES
        .iter()
        .filter_map(|s| records.get(*s).cloned())
        .collect()
}

/// SIGTERM in reverse start order, SIGKILL after 10 s.
async fn stop_children(children: &mut [Child]) {
    for c in children.iter_mut().rev() {
        if let Some(pid) = c.proc.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), c.proc.wait())
            .await
            .is_err()
        {
            let _ = c.proc.kill().await;
        }
    }
}

/// Worker processes of this run still alive: local workers carry `EPU_RUN` and
/// `EPU_RUN_DIR` in their environment.
pub fn live_local_workers(run: &str, run_dir: &Path) -> Vec<u32> {
    let want_run = format!("EPU_RUN={run}");
    let want_dir = format!("EPU_RUN_DIR={}", run_dir.display());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let mut has_run = false;
        let mut has_dir = false;
        for var in env.split(|b| *b == 0) {
            if var == want_run.as_bytes() {
                has_run = true;
            } else if var == want_dir.as_bytes() {
                has_dir = true;
            }
        }
        if has_run && has_dir && pid_alive(pid) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

pub async fn killrun(rec: &RunRecord, timeout: Duration, as_json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut remaining_nodes: Vec<Value> = Vec::new();
    let mut iaas_left: Vec<Value> = Vec::new();
    if rec.supervisor_alive() {
        let c = Client::connect(rec).await?;
        let first: TerminateAllReply = c
            .must(
                Service::Provisioner,
                Op::TerminateAll,
                &TerminateAllRequest {},
            )
            .await?;
        if !as_json {
            eprintln!(
                "killrun {}: provisioner disabled, {} instance(s) to terminate",
                rec.run, first.remaining
            );
        }
        let mut last = usize::MAX;
        loop {
            let req = DescribeNodesRequest {
                domain: None,
                node_ids: vec![],
                live_only: true,
            };
            let reply: Result<DescribeNodesReply, _> =
                c.ask(Service::Provisioner, Op::DescribeNodes, &req).await;
            let live = match reply {
                Ok(r) => r.nodes,
                Err(e) => {
                    eprintln!(
                        "killrun {}: provisioner did not answer ({}); retrying",
                        rec.run, e.message
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let n = live.len();
            if n != last && !as_json {
                eprintln!(
                    "killrun {}: {n} instance(s) remaining ({:.1}s)",
                    rec.run,
                    started.elapsed().as_secs_f64()
                );
            }
            last = n;
            if n == 0 {
                break;
            }
            if started.elapsed() > timeout {
                remaining_nodes = live
                    .iter()
                    .map(|r| json!({"node_id": r.node_id, "state": r.state, "iaas_id": r.iaas_id}))
                    .collect();
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Checked at the IaaS itself, not the records: the provisioner lists every
        // instance carrying this run's tag.
        match c
            .ask::<_, DescribeIaasReply>(Service::Provisioner, Op::DescribeIaas, &json!({}))
            .await
        {
            Ok(r) => {
                for inst in r.instances.into_iter().filter(|i| i.alive) {
                    iaas_left.push(json!(inst));
                }
                for e in r.errors {
                    iaas_left.push(json!({"error": e}));
                }
            }
            Err(e) => {
                iaas_left.push(json!({"error": format!("cannot list the IaaS: {}", e.message)}))
            }
        }
        c.close().await;
        stop_supervisor(rec).await;
    }
    if rec.transport == PlanTransport::Amqp {
        purge_topology(rec).await;
    }
    let workers = live_local_workers(&rec.run, &rec.run_dir);
    let mut rec2 = RunRecord::load(&rec.run_dir).unwrap_or_else(|_| rec.clone());
    rec2.state = RunState::Stopped;
    let _ = rec2.save();
    let clean = remaining_nodes.is_empty() && iaas_left.is_empty() && workers.is_empty();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "run": rec.run, "clean": clean, "remaining_nodes": remaining_nodes,
                "iaas_instances_left": iaas_left, "worker_pids_alive": workers,
                "seconds": started.elapsed().as_secs_f64(),
            }))?
        );
    } else if clean {
        println!(
            "run {} killed: no instance and no worker process left ({:.1}s)",
            rec.run,
            started.elapsed().as_secs_f64()
        );
    }
    if clean {
        return Ok(());
    }
    let mut msg = format!("run {} left things behind:", rec.run);
    for n in &remaining_nodes {
        msg.push_str(&format!(
            "\n  node {} in {} ({})",
            n["node_id"], n["state"], n["iaas_id"]
        ));
    }
    for i in &iaas_left {
        msg.push_str(&format!("\n  instance {} at the IaaS", i));
    }
    for p in &workers {
        msg.push_str(&format!("\n  worker process {p} still alive"));
    }
    Err(user_error(EXIT_LEFTOVERS, msg))
}

async fn stop_supervisor(rec: &RunRecord) {
    let Some(pid) = rec.supervisor_pid else {
        return;
    };
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if pid_alive(pid) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Deletes the run's queues and exchange from the broker.
async fn purge_topology(rec: &RunRecord) {
    let Ok(run) = epu_core::wire::RunName::new(&rec.run) else {
        return;
    };
    let url = rec.amqp_url.clone().unwrap_or_default();
    let opts = epu_core::bus::BusOptions::new("epumgmt");
    if let Ok(b) = epu_core::bus::amqp::AmqpBus::connect(&url, run, opts).await {
        let _ = b.delete_topology().await;
        b.close().await;
    }
}
