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
use epu_model::messages::{
    DescribeIaasReply, DescribeIaasRequest, DescribeNodesReply, DescribeNodesRequest,
    TerminateAllReply, TerminateAllRequest,
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
        // A stopped run of the same name: start afresh — unless something of it is
        // still running at an IaaS (its tag is this run name: a new run would adopt
        // it, and removing the directory would lose what `killrun` needs).
        refuse_leftovers(&dir, run.as_str(), timeout).await?;
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
    // A little before the command's own deadline, so that a run that does not come
    // up is stopped, not left half-started.
    let deadline = Instant::now() + timeout.saturating_sub(Duration::from_secs(2));
    eprintln!(
        "launch {run}: supervisor started (pid {pid}); logs in {}",
        dir.join("logs").display()
    );
    let mut seen: Vec<String> = Vec::new();
    loop {
        crate::deadline::waiting_for(format!("run {run} to come up (its services to be ready)"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rec = RunRecord::load(&dir)?;
        for s in &rec.services {
            if !seen.contains(&s.name) && rec.transport == PlanTransport::Amqp {
                eprintln!(
                    "launch {run}: {} ready (pid {})",
                    s.name,
                    s.pid.map_or("?".into(), |p| p.to_string())
                );
                seen.push(s.name.clone());
            }
        }
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

/// Refuses to reuse the name of a stopped run that still has instances or
/// processes alive, listing them.
async fn refuse_leftovers(dir: &Path, run: &str, timeout: Duration) -> anyhow::Result<()> {
    let Ok(old) = RunRecord::load(dir) else {
        return Ok(());
    };
    eprintln!("launch {run}: checking that the previous run {run} left nothing running");
    crate::deadline::waiting_for(format!("the IaaS to list what the previous run {run} left"));
    let mut left =
        crate::teardown::live_instances(&old, (timeout / 3).max(Duration::from_secs(5))).await;
    let mut pids: Vec<u32> = old.supervisor_pid.into_iter().collect();
    pids.extend(old.services.iter().filter_map(|s| s.pid));
    pids.sort_unstable();
    pids.dedup();
    left.extend(
        pids.into_iter()
            .filter(|p| run_process_alive(*p, dir))
            .map(|p| json!({"process": p})),
    );
    if left.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "the previous run {run} still has {} thing(s) running; it was not launched again:",
        left.len()
    );
    for l in &left {
        msg.push_str(&format!("\n  {l}"));
    }
    msg.push_str(&format!(
        "\nrun `epumgmt killrun --run {run}` first (it terminates them by the run's tag), or pick another --run"
    ));
    Err(user_error(EXIT_LEFTOVERS, msg))
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
                    Value::Array(crate::host::sensor_domains(plan, &rec.run)?),
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

/// Whether `pid` is alive and is a process of the run in `run_dir`: its command line
/// names the run directory (the supervisor's `--run-dir`, a service's `--config`).
/// A PID the kernel has given to another process since is not ours to signal.
fn run_process_alive(pid: u32, run_dir: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = run_dir.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.windows(dir.len().max(1)).any(|w| w == dir))
}

/// What phase 1 of `killrun` (through the provisioner) got done.
#[derive(Default)]
struct ProvisionerPhase {
    /// The provisioner answered `terminate_all`.
    answered: bool,
    /// Nodes it still listed as live when the phase ended.
    remaining: Vec<Value>,
    /// Why the phase ended early, if it did.
    note: Option<String>,
    /// The provisioner, disabled, asked every IaaS it drives and none listed an
    /// instance of the run alive.
    iaas_clean: bool,
}

/// Consecutive unanswered requests after which `killrun` stops asking the
/// provisioner and goes on to terminate by the run's tag.
const MAX_UNANSWERED: u32 = 3;
/// How long one request to the provisioner waits during `killrun`.
const KILLRUN_ASK: Duration = Duration::from_secs(5);

/// Phase 1: the provisioner disables itself and terminates every instance it knows;
/// poll until it lists none live, `deadline`, or it stops answering.
async fn through_provisioner(
    rec: &RunRecord,
    deadline: Instant,
    started: Instant,
) -> ProvisionerPhase {
    let mut out = ProvisionerPhase::default();
    let left = || deadline.saturating_duration_since(Instant::now());
    let c = match tokio::time::timeout(left(), Client::connect(rec)).await {
        Ok(Ok(c)) => c.with_timeout(KILLRUN_ASK.min(left())),
        Ok(Err(e)) => {
            out.note = Some(format!("cannot reach the run's services: {e:#}"));
            return out;
        }
        Err(_) => {
            out.note = Some("the connection to the run's services did not open in time".into());
            return out;
        }
    };
    let first: Result<TerminateAllReply, _> = c.ask(&TerminateAllRequest {}).await;
    match first {
        Ok(r) => {
            out.answered = true;
            eprintln!(
                "killrun {}: provisioner disabled, {} instance(s) to terminate",
                rec.run, r.remaining
            );
        }
        Err(e) => {
            out.note = Some(format!(
                "the provisioner did not answer terminate_all ({})",
                e.message
            ));
            c.close().await;
            return out;
        }
    }
    let mut last = usize::MAX;
    let mut unanswered = 0;
    loop {
        let req = DescribeNodesRequest {
            domain: None,
            node_ids: vec![],
            live_only: true,
        };
        let reply: Result<DescribeNodesReply, _> = c.ask(&req).await;
        match reply {
            Ok(r) => {
                unanswered = 0;
                let n = r.nodes.len();
                if n != last {
                    eprintln!(
                        "killrun {}: {n} instance(s) remaining ({:.1}s)",
                        rec.run,
                        started.elapsed().as_secs_f64()
                    );
                }
                last = n;
                out.remaining = r
                    .nodes
                    .iter()
                    .map(|r| json!({"node_id": r.node_id, "state": r.state, "iaas_id": r.iaas_id}))
                    .collect();
                if n == 0 {
                    break;
                }
            }
            Err(e) => {
                unanswered += 1;
                if unanswered >= MAX_UNANSWERED {
                    out.note = Some(format!(
                        "the provisioner stopped answering ({} requests in a row: {})",
                        unanswered, e.message
                    ));
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            out.note = Some(format!(
                "the provisioner still listed {} live instance(s) when its share of the deadline ran out",
                out.remaining.len()
            ));
            break;
        }
        crate::deadline::waiting_for(format!(
            "the provisioner to terminate {} instance(s)",
            out.remaining.len()
        ));
        tokio::time::sleep(Duration::from_millis(300).min(left())).await;
    }
    if out.remaining.is_empty() && out.note.is_none() {
        // Asked at the IaaS by the provisioner itself, with its credentials. It is
        // disabled now: nothing can be launched after this answer.
        let r: Result<DescribeIaasReply, _> = c.ask(&DescribeIaasRequest {}).await;
        out.iaas_clean =
            r.is_ok_and(|r| r.errors.is_empty() && r.instances.iter().all(|i| !i.alive));
    }
    c.close().await;
    out
}

/// Stops the processes of the run that are still alive: the supervisor first (it
/// stops its services), then any service it left (a service outlives a supervisor
/// killed with SIGKILL). SIGTERM, then SIGKILL after `grace`. Returns the PIDs of
/// the run's processes still alive.
async fn stop_run_processes(rec: &RunRecord, grace: Duration) -> Vec<u32> {
    let dir = &rec.run_dir;
    let mut pids: Vec<u32> = rec.supervisor_pid.into_iter().collect();
    pids.extend(rec.services.iter().filter_map(|s| s.pid));
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != std::process::id() && run_process_alive(*p, dir));
    if pids.is_empty() {
        return pids;
    }
    crate::deadline::waiting_for(format!("the run's processes {pids:?} to exit"));
    // The supervisor first: it stops its services in order.
    if let Some(sup) = rec.supervisor_pid.filter(|p| pids.contains(p)) {
        let _ = kill(Pid::from_raw(sup as i32), Signal::SIGTERM);
        let until = Instant::now() + grace;
        while run_process_alive(sup, dir) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Services the supervisor did not stop (it was dead, or did not answer SIGTERM)
    // get their own SIGTERM and grace; a supervisor that ignored its SIGTERM gets
    // no second one.
    let services: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| Some(*p) != rec.supervisor_pid && run_process_alive(*p, dir))
        .collect();
    for p in &services {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
    }
    let until = Instant::now() + grace;
    while services.iter().any(|p| run_process_alive(*p, dir)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in pids.iter().filter(|p| run_process_alive(**p, dir)) {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
    }
    let until = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| run_process_alive(*p, dir)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pids.retain(|p| run_process_alive(*p, dir));
    pids
}

/// How long a worker or service has between SIGTERM and SIGKILL during `killrun`.
const KILLRUN_GRACE: Duration = Duration::from_secs(5);

/// Tears the run down and checks, at the IaaS, that nothing of it is left.
///
/// 1. If the supervisor lives: the provisioner terminates everything it knows
///    (bounded; an unanswering provisioner is reported, not retried forever).
/// 2. The run's own processes (supervisor, services) are stopped, so nothing can
///    start a worker behind our back.
/// 3. Every instance carrying the run's tag is terminated at the IaaS itself,
///    from the run directory alone, and the IaaS is asked again until it lists
///    none alive. This runs whether or not phase 1 worked.
///
/// Exit 0 only when the IaaS lists nothing alive and no process of the run lives.
pub async fn killrun(rec: &RunRecord, limit: Duration, as_json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    // Leave room to report before the command's own deadline.
    let margin = (limit / 10).clamp(Duration::from_millis(500), Duration::from_secs(15));
    let deadline = started + limit.saturating_sub(margin);
    let mut notes: Vec<String> = Vec::new();

    let phase1 = if rec.supervisor_alive() {
        let p = through_provisioner(rec, started + limit.mul_f64(0.5), started).await;
        if let Some(n) = &p.note {
            eprintln!(
                "killrun {}: {n}; terminating by the run's tag instead",
                rec.run
            );
            notes.push(n.clone());
        }
        p
    } else {
        let n = "the run's supervisor is not running; terminating by the run's tag".to_string();
        eprintln!("killrun {}: {n}", rec.run);
        notes.push(n);
        ProvisionerPhase::default()
    };
    let phase1_secs = started.elapsed().as_secs_f64();

    let procs_left = stop_run_processes(rec, KILLRUN_GRACE).await;
    let services_secs = started.elapsed().as_secs_f64() - phase1_secs;

    crate::deadline::waiting_for("the IaaS to list the run's instances");
    let tag_started = Instant::now();
    let mut tag = crate::teardown::terminate_by_tag(rec, deadline, KILLRUN_GRACE).await;
    let tag_secs = tag_started.elapsed().as_secs_f64();
    if phase1.iaas_clean {
        // An IaaS we could not ask ourselves (no credentials in this shell) was asked
        // by the disabled provisioner a moment ago and listed nothing alive.
        let before = tag.left.len();
        tag.left.retain(|v| v.get("error").is_none());
        if tag.left.len() < before {
            notes.push(
                "EC2 could not be asked from here (give killrun the AWS environment the run was launched with); the disabled provisioner's own check found nothing alive".into(),
            );
        }
    }
    if tag.local_groups > 0 || tag.ec2_terminated > 0 {
        eprintln!(
            "killrun {}: by the run's tag: {} local worker group(s) signalled, {} EC2 instance(s) terminated",
            rec.run, tag.local_groups, tag.ec2_terminated
        );
    }

    if rec.transport == PlanTransport::Amqp {
        crate::deadline::waiting_for("the broker to delete the run's queues");
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left.max(Duration::from_secs(1)), purge_topology(rec))
            .await
            .is_err()
        {
            notes.push("the run's queues could not be deleted in time (left on the broker)".into());
        }
    }
    let mut rec2 = RunRecord::load(&rec.run_dir).unwrap_or_else(|_| rec.clone());
    rec2.state = RunState::Stopped;
    rec2.message = Some("killed by killrun".into());
    let _ = rec2.save();

    // Phase 1's own list is only informative once phase 3 has checked the IaaS.
    let clean = tag.left.is_empty() && procs_left.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "run": rec.run,
                "clean": clean,
                "provisioner_answered": phase1.answered,
                "remaining_nodes": phase1.remaining,
                "iaas_instances_left": tag.left,
                "processes_alive": procs_left,
                "local_groups_signalled": tag.local_groups,
                "ec2_terminated_by_tag": tag.ec2_terminated,
                "notes": notes,
                "seconds": seconds,
                "phase_seconds": {"provisioner": phase1_secs, "processes": services_secs, "by_tag": tag_secs},
            }))?
        );
    } else if clean {
        println!(
            "run {} killed: the IaaS lists no instance of it and no process of it is alive ({seconds:.1}s)",
            rec.run
        );
    }
    if clean {
        return Ok(());
    }
    let mut msg = format!("run {} left things behind:", rec.run);
    for i in &tag.left {
        msg.push_str(&format!("\n  {i}"));
    }
    for p in &procs_left {
        msg.push_str(&format!("\n  process {p} of the run still alive"));
    }
    msg.push_str("\nrun `epumgmt killrun` again, or terminate these by hand");
    Err(user_error(EXIT_LEFTOVERS, msg))
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
