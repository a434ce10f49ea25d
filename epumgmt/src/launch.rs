//! Launching a run and supervising its services.
//!
//! `launch` makes the run directory and starts a detached supervisor process
//! (`epumgmt supervise`). In standalone mode the supervisor *is* the host: every
//! service runs in it on the in-process bus. In AMQP mode it starts the three
//! service binaries level by level, waits for each level's `/readyz`, and restarts
//! a service that dies, with backoff.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use epu_core::backoff::Backoff;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Map, Value};

use crate::killrun::EXIT_LEFTOVERS;
use crate::plan::{LaunchPlan, PlanTransport};
use crate::rundir::{
    check_new_run_dir, pid_alive, run_process_alive, runs_dir, user_error, write_private,
    RunRecord, RunState, ServiceRecord,
};

pub async fn launch(plan_path: &Path, run: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
    let plan = LaunchPlan::load(plan_path)?;
    let run = plan.run_name(run, plan_path)?;
    plan.check_domains(run.as_str())?;
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
    let mut base = base;
    if let (Some(t), Some(Value::Object(bus))) = (plan.queue_type, base.get_mut("bus")) {
        bus.insert("queue_type".into(), json!(t.as_str()));
    }
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
            if crate::client::http_status(a, "/readyz").await == Some(200) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use epu_core::config::{BusConfig, QueueType};

    fn record() -> RunRecord {
        RunRecord {
            run: "qt".into(),
            transport: PlanTransport::Amqp,
            amqp_url: Some("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            plan: PathBuf::from("plan.toml"),
            run_dir: PathBuf::from("/tmp/epu-qt"),
            created: chrono::Utc::now(),
            supervisor_pid: None,
            state: RunState::Starting,
            message: None,
            services: vec![],
        }
    }

    fn bus_of(plan: &str, service: &str) -> BusConfig {
        let plan: LaunchPlan = toml::from_str(plan).expect("plan");
        let cfg =
            service_config(&record(), &plan, service, "s3cret-s3cret-s3cret").expect("config");
        serde_json::from_value(cfg["bus"].clone()).expect("a [bus] section the service reads")
    }

    #[test]
    fn the_plans_queue_type_reaches_every_service() {
        for service in crate::plan::SERVICES {
            let bus = bus_of("transport = \"amqp\"\nqueue_type = \"quorum\"\n", service);
            assert_eq!(bus.queue_type, QueueType::Quorum, "{service}");
            let bus = bus_of("transport = \"amqp\"\n", service);
            assert_eq!(bus.queue_type, QueueType::Classic, "{service}: the default");
        }
        let bad = toml::from_str::<LaunchPlan>("transport = \"amqp\"\nqueue_type = \"mirrored\"\n");
        let shown = format!("{:?}", bad.expect_err("an unknown queue type is refused"));
        assert!(
            shown.contains("classic") && shown.contains("quorum"),
            "{shown}"
        );
    }
}
