//! The local driver: a worker is an OS process on this machine.
//!
//! # Lifecycle
//!
//! A launch spawns the deployable's `command` with its `args` in its own process group
//! (`setpgid` through `CommandExt::process_group(0)`), stdin from `/dev/null`, stdout and
//! stderr appended to `<run_dir>/workers/<node_id>.log`, working directory the
//! deployable's `cwd` or `<run_dir>/workers/<node_id>/`. The process exists the moment the
//! spawn returns, so the node goes `REQUESTED → RUNNING` at once (no PENDING, no
//! STARTED: there is nothing to wait for; the heartbeat agent tells the rest).
//!
//! The node's `iaas_id` is the PID; its *incarnation* is the process start time (field 22
//! of `/proc/<pid>/stat`). Both must match before the driver signals or adopts a process,
//! so a recycled PID is never mistaken for a worker.
//!
//! * Exit of a child: noticed at once (tokio's child wait, driven by SIGCHLD) and reported
//!   as [`DriverEvent::Exited`] with the exit code or signal. What is left of its process
//!   group is killed.
//! * Terminate: SIGTERM to the process group, SIGKILL after the grace
//!   (`terminate_grace_secs`, default 5 s) if the leader is still there.
//! * After a provisioner restart: [`IaasDriver::adopt`] takes the workers the store knows;
//!   live ones (PID and start time match) are watched by polling `/proc` every
//!   `poll_interval_secs` (they are not our children, so there is no exit code), dead
//!   ones are reported at once.
//! * Listing: every process-group leader whose environment has `EPU_RUN=<run>` and an
//!   `EPU_NODE_ID` — the environment is the local driver's "run tag". A repeated launch
//!   (same token, after a crash) adopts the processes that carry its node ids instead of
//!   spawning them again.
//!
//! # What a worker gets
//!
//! The provisioner's own environment minus every `EPU_*` variable, then the deployable's
//! `env`, then (these win):
//!
//! | variable | value |
//! |---|---|
//! | `EPU_RUN` | the run name |
//! | `EPU_NODE_ID` | the node id |
//! | `EPU_DOMAIN` | the domain |
//! | `EPU_LAUNCH_ID` | the launch id |
//! | `EPU_RUN_DIR` | the run directory (absolute) |
//! | `EPU_BUS__TRANSPORT` | `amqp` or `local` (then the bus socket is `<run_dir>/epu.sock`) |
//! | `EPU_BUS__AMQP_URL` | the broker URL, with the `amqp` transport |
//! | `EPU_HEARTBEAT__INTERVAL_SECS` | the heartbeat interval, when configured |
//! | `EPUVAR_<NAME>` | each launch variable `NAME` |
//!
//! The names follow `epu_core::config`'s override scheme, so an agent that loads its
//! config with `epu_core::config::load` reads them as its keys `run`, `node_id`, …,
//! `bus.amqp_url`, `heartbeat.interval_secs`. Launch variables use the `EPUVAR_` prefix
//! because they are not config keys.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use epu_core::wire::RunName;
use epu_model::messages::Deployable;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use super::{
    DriverEvent, EventReceiver, IaasDriver, IaasError, IaasErrorKind, InstanceRef, InstanceState,
    LaunchOutcome, LaunchRequest, LaunchedInstance, ListedInstance, TerminateOutcome,
};

/// Settings of the local driver.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// The run directory; workers' logs go to `<run_dir>/workers/`.
    pub run_dir: PathBuf,
    /// SIGTERM → SIGKILL grace.
    pub terminate_grace: Duration,
    /// How often adopted (non-child) workers are checked in `/proc`.
    pub poll_interval: Duration,
    /// Extra `EPU_*` variables every worker gets (`EPU_BUS__*`, `EPU_HEARTBEAT__*`).
    pub worker_env: BTreeMap<String, String>,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub pgrp: i32,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Running, sleeping, stopped…: not a zombie or dead.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/<pid>/stat` (the command name may hold spaces and
/// parentheses, so fields are counted after the last `)`).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state), fields[2] field 5 (pgrp), fields[19] field 22.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        state,
        pgrp,
        start_time,
    })
}

/// `/proc/<pid>/stat` of a process, if it exists.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Whether `pid` is alive and (when given) started at `start_time`.
pub fn is_alive(pid: i32, start_time: Option<&str>) -> bool {
    match proc_stat(pid) {
        Some(st) if st.is_alive() => match start_time {
            Some(t) => t == st.start_time.to_string(),
            None => true,
        },
        _ => false,
    }
}

fn proc_environ(pid: i32) -> Option<HashMap<String, String>> {
    let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut out = HashMap::new();
    for entry in bytes.split(|b| *b == 0) {
        let Ok(s) = std::str::from_utf8(entry) else {
            continue;
        };
        if let Some((k, v)) = s.split_once('=') {
            if k.starts_with("EPU_") {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    Some(out)
}

/// Every live process-group leader of `run` on this machine (see the module docs).
pub fn scan_workers(run: &str) -> Vec<ListedInstance> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(st) = proc_stat(pid) else { continue };
        if !st.is_alive() || st.pgrp != pid {
            continue;
        }
        let Some(env) = proc_environ(pid) else {
            continue;
        };
        if env.get("EPU_RUN").map(String::as_str) != Some(run) {
            continue;
        }
        let Some(node_id) = env.get("EPU_NODE_ID") else {
            continue;
        };
        out.push(ListedInstance {
            iaas_id: pid.to_string(),
            incarnation: Some(st.start_time.to_string()),
            node_id: Some(node_id.clone()),
            launch_id: env.get("EPU_LAUNCH_ID").cloned(),
            state: InstanceState::Running,
            addresses: Vec::new(),
            failure: None,
        });
    }
    out
}

#[derive(Clone, Debug)]
struct Watched {
    node_id: String,
    start_time: String,
    /// Our child: its exit comes from `wait`, not from polling.
    child: bool,
}

/// The local driver. See the module docs.
pub struct LocalDriver {
    run: RunName,
    settings: LocalSettings,
    events: mpsc::UnboundedSender<DriverEvent>,
    events_rx: Mutex<Option<EventReceiver>>,
    watched: Arc<Mutex<HashMap<i32, Watched>>>,
    watcher_started: AtomicBool,
    /// One launch at a time, so "scan, then spawn what is missing" is atomic.
    launch_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for LocalDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDriver")
            .field("run", &self.run)
            .field("run_dir", &self.settings.run_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn exit_detail(status: &std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        return format!("killed by signal {sig} ({name})");
    }
    "exited".to_string()
}

fn signal_group(pid: i32, sig: Signal) {
    if pid <= 1 {
        return;
    }
    // ESRCH (already gone) and EPERM are both "nothing more we can do".
    let _ = killpg(Pid::from_raw(pid), sig);
}

impl LocalDriver {
    /// A driver for `run`. The run directory is made absolute and created on first
    /// launch.
    pub fn new(run: RunName, mut settings: LocalSettings) -> Self {
        if settings.run_dir.is_relative() {
            if let Ok(cwd) = std::env::current_dir() {
                settings.run_dir = cwd.join(&settings.run_dir);
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        LocalDriver {
            run,
            settings,
            events: tx,
            events_rx: Mutex::new(Some(rx)),
            watched: Arc::new(Mutex::new(HashMap::new())),
            watcher_started: AtomicBool::new(false),
            launch_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Where a node's log goes.
    pub fn log_path(&self, node_id: &str) -> PathBuf {
        self.settings
            .run_dir
            .join("workers")
            .join(format!("{node_id}.log"))
    }

    /// Starts the `/proc` poller for adopted workers (once).
    fn ensure_watcher(&self) {
        if self.watcher_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let watched = self.watched.clone();
        let events = self.events.clone();
        let every = self.settings.poll_interval.max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if events.is_closed() {
                    return;
                }
                let gone: Vec<(i32, Watched)> = {
                    let mut w = lock(&watched);
                    let dead: Vec<i32> = w
                        .iter()
                        .filter(|(pid, info)| {
                            !info.child && !is_alive(**pid, Some(&info.start_time))
                        })
                        .map(|(pid, _)| *pid)
                        .collect();
                    dead.into_iter()
                        .filter_map(|pid| w.remove(&pid).map(|info| (pid, info)))
                        .collect()
                };
                for (pid, info) in gone {
                    let _ = events.send(DriverEvent::Exited {
                        node_id: info.node_id,
                        iaas_id: pid.to_string(),
                        incarnation: Some(info.start_time),
                        detail: "exited (not a child of this provisioner: exit status unknown)"
                            .to_string(),
                    });
                }
            }
        });
    }

    fn adopt_one(&self, pid: i32, node_id: &str, start_time: &str) {
        let mut w = lock(&self.watched);
        w.entry(pid).or_insert_with(|| Watched {
            node_id: node_id.to_string(),
            start_time: start_time.to_string(),
            child: false,
        });
    }

    fn spawn_worker(
        &self,
        req: &LaunchRequest,
        node_id: &str,
        spec: &epu_model::messages::LocalDeployable,
    ) -> Result<LaunchedInstance, IaasError> {
        let workers = self.settings.run_dir.join("workers");
        let cwd = match &spec.cwd {
            Some(c) => PathBuf::from(c),
            None => workers.join(node_id),
        };
        fs::create_dir_all(&cwd).map_err(|e| io_error("create the working directory", &cwd, &e))?;
        let log_path = self.log_path(node_id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_error("open the log file", &log_path, &e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_error("open the log file", &log_path, &e))?;

        let mut cmd =
            tokio::process::Command::new(epu_core::service::resolve_command(&spec.command));
        cmd.args(&spec.args)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EPU_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&spec.env);
        for (k, v) in &req.vars {
            cmd.env(format!("EPUVAR_{k}"), v);
        }
        cmd.envs(&self.settings.worker_env);
        cmd.env("EPU_RUN", req.run.as_str())
            .env("EPU_NODE_ID", node_id)
            .env("EPU_DOMAIN", &req.domain)
            .env("EPU_LAUNCH_ID", &req.launch_id)
            .env("EPU_RUN_DIR", &self.settings.run_dir);

        let mut child = cmd.spawn().map_err(|e| {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    IaasErrorKind::BadRequest
                }
                _ => IaasErrorKind::Other,
            };
            IaasError::new(kind, format!("cannot start {:?}: {e}", spec.command))
        })?;
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(IaasError::new(
                IaasErrorKind::Other,
                "the worker exited before its pid could be read",
            ));
        };
        // The child is not reaped until we wait, so its stat is readable even if it
        // has already exited.
        let start_time = proc_stat(pid)
            .map(|s| s.start_time.to_string())
            .unwrap_or_else(|| "0".to_string());
        lock(&self.watched).insert(
            pid,
            Watched {
                node_id: node_id.to_string(),
                start_time: start_time.clone(),
                child: true,
            },
        );
        let watched = self.watched.clone();
        let events = self.events.clone();
        let node = node_id.to_string();
        let incarnation = start_time.clone();
        tokio::spawn(async move {
            let detail = match child.wait().await {
                Ok(status) => exit_detail(&status),
                Err(e) => format!("exit status unknown: {e}"),
            };
            lock(&watched).remove(&pid);
            // Whatever the worker left behind in its group goes with it.
            signal_group(pid, Signal::SIGKILL);
            let _ = events.send(DriverEvent::Exited {
                node_id: node,
                iaas_id: pid.to_string(),
                incarnation: Some(incarnation),
                detail,
            });
        });
        tracing::debug!(node_id, pid, log = %log_path.display(), "spawned a local worker");
        Ok(LaunchedInstance {
            node_id: node_id.to_string(),
            iaas_id: pid.to_string(),
            incarnation: Some(start_time),
            state: InstanceState::Running,
            addresses: Vec::new(),
        })
    }
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> IaasError {
    IaasError::new(
        IaasErrorKind::Other,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

#[async_trait]
impl IaasDriver for LocalDriver {
    fn name(&self) -> &str {
        "local"
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<LaunchOutcome, IaasError> {
        let Deployable::Local(spec) = &req.deployable else {
            return Err(IaasError::bad_request(
                "the local driver launches local deployables only",
            ));
        };
        self.ensure_watcher();
        let _one_at_a_time = self.launch_lock.lock().await;
        let run = req.run.to_string();
        let existing = tokio::task::spawn_blocking(move || scan_workers(&run))
            .await
            .unwrap_or_default();
        let mut by_node: HashMap<String, ListedInstance> = HashMap::new();
        for inst in existing {
            if let Some(n) = inst.node_id.clone() {
                by_node.insert(n, inst);
            }
        }
        let mut out = LaunchOutcome::default();
        for node_id in &req.node_ids {
            if let Some(found) = by_node.remove(node_id) {
                // Launched before a crash: adopt it, launch nothing.
                let start = found.incarnation.clone().unwrap_or_default();
                if let Ok(pid) = found.iaas_id.parse::<i32>() {
                    self.adopt_one(pid, node_id, &start);
                }
                tracing::info!(node_id = %node_id, pid = %found.iaas_id, "adopted a running worker instead of launching it again");
                out.instances.push(LaunchedInstance {
                    node_id: node_id.clone(),
                    iaas_id: found.iaas_id,
                    incarnation: found.incarnation,
                    state: InstanceState::Running,
                    addresses: Vec::new(),
                });
                continue;
            }
            match self.spawn_worker(req, node_id, spec) {
                Ok(inst) => out.instances.push(inst),
                Err(e) => out.failed.push((node_id.clone(), e)),
            }
        }
        Ok(out)
    }

    async fn terminate(
        &self,
        instances: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError> {
        let mut out = Vec::with_capacity(instances.len());
        for r in instances {
            let Ok(pid) = r.iaas_id.parse::<i32>() else {
                out.push(TerminateOutcome::Gone);
                continue;
            };
            if pid <= 1 || !is_alive(pid, r.incarnation.as_deref()) {
                out.push(TerminateOutcome::Gone);
                continue;
            }
            signal_group(pid, Signal::SIGTERM);
            let grace = self.settings.terminate_grace;
            let start = r.incarnation.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if is_alive(pid, start.as_deref()) {
                    tracing::info!(pid, "worker still there after the grace; SIGKILL");
                    signal_group(pid, Signal::SIGKILL);
                }
            });
            out.push(TerminateOutcome::Stopping);
        }
        Ok(out)
    }

    async fn list(&self, run: &RunName) -> Result<Vec<ListedInstance>, IaasError> {
        let run = run.to_string();
        tokio::task::spawn_blocking(move || scan_workers(&run))
            .await
            .map_err(|e| IaasError::new(IaasErrorKind::Other, format!("process scan failed: {e}")))
    }

    async fn adopt(&self, instances: &[InstanceRef]) {
        self.ensure_watcher();
        for r in instances {
            let Ok(pid) = r.iaas_id.parse::<i32>() else {
                continue;
            };
            let known_child = lock(&self.watched).get(&pid).is_some_and(|w| w.child);
            if known_child {
                continue;
            }
            if is_alive(pid, r.incarnation.as_deref()) {
                let start = r.incarnation.clone().unwrap_or_default();
                self.adopt_one(pid, &r.node_id, &start);
                tracing::info!(node_id = %r.node_id, pid, "re-adopted a live worker");
            } else {
                let _ = self.events.send(DriverEvent::Exited {
                    node_id: r.node_id.clone(),
                    iaas_id: r.iaas_id.clone(),
                    incarnation: r.incarnation.clone(),
                    detail: "the worker process is gone (it ended while the provisioner was down)"
                        .to_string(),
                });
            }
        }
    }

    fn take_events(&self) -> Option<EventReceiver> {
        lock(&self.events_rx).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_counts_after_the_command_name() {
        let text = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let st = parse_stat(text).expect("parses");
        assert_eq!(st.state, 'S');
        assert_eq!(st.pgrp, 4242);
        assert_eq!(st.start_time, 987654);
        assert!(st.is_alive());
        assert!(parse_stat("garbage").is_none());
        let z = parse_stat("1 (x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0").expect("z");
        assert!(!z.is_alive());
    }

    #[test]
    fn our_own_process_is_alive_with_its_start_time() {
        let me = std::process::id() as i32;
        let st = proc_stat(me).expect("own stat");
        assert!(is_alive(me, Some(&st.start_time.to_string())));
        assert!(!is_alive(me, Some("1")));
    }
}
