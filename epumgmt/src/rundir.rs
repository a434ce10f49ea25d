//! Run directories: where a run keeps its record, secret, stores and logs.
//!
//! `$EPU_HOME/runs/<run>/` (EPU_HOME defaults to `~/.epu`):
//! `run.json` (the record: transport, services, PIDs, addresses, log files),
//! `secret` (0600), `epu.sock` (standalone), `logs/*.jsonl` (the services' JSON
//! logs), `stores/`, `workers/` (local workers' logs), `config/` (generated
//! service configs, AMQP mode).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plan::PlanTransport;

/// Exit code: the run named (or implied) does not exist or is ambiguous.
pub const EXIT_NO_RUN: i32 = 3;

#[derive(Debug)]
pub struct UserError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

pub fn user_error(code: i32, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError {
        code,
        message: message.into(),
    })
}

pub fn epu_home() -> PathBuf {
    if let Some(h) = std::env::var_os("EPU_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".epu")
}

pub fn runs_dir() -> PathBuf {
    epu_home().join("runs")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub pid: Option<u32>,
    pub http_addr: Option<String>,
    pub log_file: PathBuf,
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Starting,
    Up,
    Stopping,
    Stopped,
    Failed,
}

/// `run.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub transport: PlanTransport,
    pub amqp_url: Option<String>,
    pub plan: PathBuf,
    pub run_dir: PathBuf,
    pub created: DateTime<Utc>,
    pub supervisor_pid: Option<u32>,
    pub state: RunState,
    #[serde(default)]
    pub message: Option<String>,
    pub services: Vec<ServiceRecord>,
}

impl RunRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("run.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(dir);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a run record", p.display()))
    }

    /// Writes atomically (temp file, then rename), mode 0600: it holds the broker URL.
    pub fn save(&self) -> anyhow::Result<()> {
        let p = Self::path(&self.run_dir);
        let tmp = self.run_dir.join(".run.json.tmp");
        write_private(&tmp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))?;
        Ok(())
    }

    pub fn supervisor_alive(&self) -> bool {
        self.supervisor_pid.is_some_and(pid_alive)
    }

    pub fn secret(&self) -> anyhow::Result<String> {
        let p = self.run_dir.join("secret");
        let s = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read the run's secret at {}", p.display()))?;
        Ok(s.trim().to_string())
    }
}

pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) is not alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is alive and is a process of the run in `run_dir`: its command line
/// names the run directory (the supervisor's `--run-dir`, a service's `--config`).
/// A PID the kernel has given to another process since is not ours to signal.
pub fn run_process_alive(pid: u32, run_dir: &Path) -> bool {
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

/// Every run directory with a record, sorted by name.
pub fn list_runs() -> Vec<RunRecord> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(runs_dir()) {
        for e in entries.flatten() {
            if let Ok(r) = RunRecord::load(&e.path()) {
                out.push(r);
            }
        }
    }
    out.sort_by(|a, b| a.run.cmp(&b.run));
    out
}

/// The run `--run` names, or the only live run.
pub fn resolve(run: Option<&str>) -> anyhow::Result<RunRecord> {
    if let Some(name) = run {
        let dir = runs_dir().join(name);
        if !RunRecord::path(&dir).exists() {
            return Err(user_error(
                EXIT_NO_RUN,
                format!(
                    "no run named {name:?} under {}; `epumgmt list-runs` shows the runs",
                    runs_dir().display()
                ),
            ));
        }
        return RunRecord::load(&dir);
    }
    let mut live: Vec<RunRecord> = list_runs()
        .into_iter()
        .filter(|r| r.supervisor_alive())
        .collect();
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(user_error(
            EXIT_NO_RUN,
            "no live run; start one with `epumgmt launch PLAN`, or name a stopped one with --run",
        )),
        _ => {
            let names: Vec<String> = live.iter().map(|r| r.run.clone()).collect();
            Err(user_error(
                EXIT_NO_RUN,
                format!(
                    "several runs are live ({}); say which with --run NAME",
                    names.join(", ")
                ),
            ))
        }
    }
}

pub fn check_new_run_dir(dir: &Path, run: &str) -> anyhow::Result<()> {
    if RunRecord::path(dir).exists() {
        let r = RunRecord::load(dir)?;
        if r.supervisor_alive() {
            bail!("run {run:?} is already up; stop it with `epumgmt killrun --run {run}` or choose another name with --run");
        }
    }
    Ok(())
}
