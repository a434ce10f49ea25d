//! The local driver: a worker is an OS process group on this machine.
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
//! The node's `iaas_id` is the PID of the spawned process, which is also its process
//! group id (pgid); its *incarnation* is the process start time (field 22 of
//! `/proc/<pid>/stat`). Both must match before the driver signals or adopts a live
//! leader, so a recycled PID is never mistaken for a worker.
//!
//! # A worker is its whole process group
//!
//! The spawned process (usually `epu-agent`) is only the group *leader*; the real
//! workload (`sh -c …`) is its child, in the same group. When the leader dies on its own
//! (SIGKILL, OOM, a crash) its children are reparented to init but stay in the group, so
//! the driver treats the group, not the leader, as the instance:
//!
//! * Listing ([`scan_groups`], [`scan_workers`]): every live (non-zombie) process whose
//!   environment has `EPU_RUN=<run>` and an `EPU_NODE_ID` — the environment is the local
//!   driver's "run tag" — grouped by its process group id (field 5 of
//!   `/proc/<pid>/stat`). One [`ListedInstance`] per group: `iaas_id` = pgid; `Running`
//!   with the leader's start time as incarnation while the leader lives; `Stopping` with
//!   no incarnation when the group is *leaderless* (it exists and must be terminated).
//!   A group whose leader is alive but does not carry the run is not a worker of the run
//!   (somebody else's process group that one of our processes joined) and is not listed.
//!   `describe_iaas` and the reconcile therefore count groups, leaderless ones included:
//!   a leaderless group of a RUNNING node fails it (RUNNING_FAILED: the controller
//!   destroys it), one of a finished node (FAILED, TERMINATED) or of a TERMINATING node
//!   is terminated again, one of a node the store does not know is a zombie and is
//!   terminated. A repeated launch (same token, after a crash) adopts the groups that
//!   carry its node ids instead of spawning them again; a leaderless one is killed and
//!   its node reported exited.
//! * Exit of a child leader: noticed at once (tokio's child wait, driven by SIGCHLD) and
//!   reported as [`DriverEvent::Exited`] with the exit code or signal; what is left of
//!   its group is SIGKILLed.
//! * Terminate: if a live member of the group carries the run, SIGTERM to the group, and
//!   SIGKILL to the group after the grace (`terminate_grace_secs`, default 5 s) if *any*
//!   member is still alive. `Gone` only when no member lives.
//! * After a provisioner restart: [`IaasDriver::adopt`] takes the workers the store knows;
//!   live leaders (PID and start time match) are watched by polling `/proc` every
//!   `poll_interval_secs` (they are not our children, so there is no exit code). When a
//!   watched leader is found dead, or is already dead at adoption, the rest of its group
//!   is SIGKILLed (if members carrying the run remain) and the node reported exited.
//! * Teardown without a provisioner: [`kill_run_groups`] signals every group of a run
//!   from `/proc` alone, for `epumgmt killrun`.
//!
//! ## Why `killpg(pgid)` of a leaderless group is safe
//!
//! A PID number is never handed out while it is still in use as some process's process
//! group id (or session id): Linux frees a number only when no task uses it any more as
//! its PID, thread-group id, process-group id or session id (`free_pid` runs from
//! `__change_pid` once `pid_has_task` is false for every type), and the leader's number
//! is the group's id for as long as the group has members. So while a group has a live
//! member that carries our run, its pgid still names the group our worker's leader
//! created, no new process can have been given that number, and `killpg(pgid)` reaches
//! that group only. Once the group is empty the number may be reused; a new process with it is then
//! either a group leader that does not carry the run (not listed, never signalled) or a
//! new worker of the run whose start time differs from the recorded incarnation (a live
//! leader is only signalled when the incarnation matches). The one window left is a scan
//! followed by a signal a few microseconds later, during which the group would have to
//! empty *and* the PID space wrap around; the driver accepts it. Members that rewrote
//! their own environment (`env -i …`) do not count as carrying the run; a group made
//! only of those, with its leader dead, is left alone except by the grace-time SIGKILL
//! of a group the driver has just SIGTERMed (which only checks that the group has not
//! been emptied and re-created in between).
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// One local worker as `/proc` shows it: a process group with live members that carry
/// the run (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerGroup {
    /// The process group id: the PID of the process the driver spawned, the node's
    /// `iaas_id`.
    pub pgid: i32,
    /// `EPU_NODE_ID` of the leader while it lives, else of the lowest member.
    pub node_id: String,
    /// `EPU_LAUNCH_ID`, from the same process as `node_id`.
    pub launch_id: Option<String>,
    /// The leader (PID = pgid) is alive (not a zombie) and in the group.
    pub leader_alive: bool,
    /// The leader's start time (field 22 of its stat), while it is alive.
    pub leader_start_time: Option<u64>,
    /// The live members that carry the run, ascending (the leader among them while it
    /// lives).
    pub pids: Vec<i32>,
}

impl WorkerGroup {
    /// The group as [`IaasDriver::list`] reports it.
    pub fn listed(&self) -> ListedInstance {
        ListedInstance {
            iaas_id: self.pgid.to_string(),
            incarnation: self
                .leader_start_time
                .filter(|_| self.leader_alive)
                .map(|t| t.to_string()),
            node_id: Some(self.node_id.clone()),
            launch_id: self.launch_id.clone(),
            state: if self.leader_alive {
                InstanceState::Running
            } else {
                InstanceState::Stopping
            },
            addresses: Vec::new(),
            failure: None,
        }
    }
}

/// One process as the scan read it: its stat and its `EPU_*` variables.
#[derive(Clone, Debug, Default)]
struct ProcInfo {
    pid: i32,
    stat: Option<ProcStat>,
    env: HashMap<String, String>,
}

/// Whether a process is a live member of a worker of `run` (and of `run_dir`, if given).
fn carries_run(p: &ProcInfo, run: &str, run_dir: Option<&Path>) -> bool {
    p.stat.is_some_and(|st| st.is_alive())
        && p.env.get("EPU_RUN").map(String::as_str) == Some(run)
        && p.env.contains_key("EPU_NODE_ID")
        && run_dir.is_none_or(|d| p.env.get("EPU_RUN_DIR").is_some_and(|v| Path::new(v) == d))
}

/// The pure half of [`scan_groups`]: the processes that carry the run, grouped by their
/// process group, ascending by pgid.
fn group_procs(run: &str, run_dir: Option<&Path>, procs: &[ProcInfo]) -> Vec<WorkerGroup> {
    let by_pid: HashMap<i32, &ProcInfo> = procs.iter().map(|p| (p.pid, p)).collect();
    let mut groups: BTreeMap<i32, Vec<&ProcInfo>> = BTreeMap::new();
    for p in procs {
        let Some(st) = p.stat else { continue };
        // pgid 0 is the kernel's; 1 is init's. Neither is ever a worker's.
        if st.pgrp > 1 && carries_run(p, run, run_dir) {
            groups.entry(st.pgrp).or_default().push(p);
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (pgid, mut members) in groups {
        members.sort_by_key(|p| p.pid);
        let leader = by_pid
            .get(&pgid)
            .copied()
            .filter(|l| l.stat.is_some_and(|st| st.is_alive() && st.pgrp == pgid));
        let named = match leader {
            Some(l) if carries_run(l, run, run_dir) => l,
            // A live leader that is not a worker of the run: not ours to list or signal.
            Some(_) => continue,
            None => members[0],
        };
        out.push(WorkerGroup {
            pgid,
            node_id: named.env.get("EPU_NODE_ID").cloned().unwrap_or_default(),
            launch_id: named.env.get("EPU_LAUNCH_ID").cloned(),
            leader_alive: leader.is_some(),
            leader_start_time: leader.and_then(|l| l.stat).map(|st| st.start_time),
            pids: members.iter().map(|p| p.pid).collect(),
        });
    }
    out
}

/// The numeric entries of `/proc`.
fn proc_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .collect()
}

/// Every live process with its stat and, for possible workers, its environment.
fn read_procs() -> Vec<ProcInfo> {
    proc_pids()
        .into_iter()
        .filter_map(|pid| {
            let st = proc_stat(pid)?;
            let env = if st.is_alive() && st.pgrp > 1 {
                proc_environ(pid).unwrap_or_default()
            } else {
                HashMap::new()
            };
            Some(ProcInfo {
                pid,
                stat: Some(st),
                env,
            })
        })
        .collect()
}

/// Every worker group of `run` on this machine, ascending by pgid: the live processes
/// whose environment has `EPU_RUN=<run>` and an `EPU_NODE_ID` (and, with `run_dir`,
/// `EPU_RUN_DIR=<run_dir>`), grouped by process group. Pure `/proc`: needs no driver,
/// store or runtime.
pub fn scan_groups(run: &str, run_dir: Option<&Path>) -> Vec<WorkerGroup> {
    group_procs(run, run_dir, &read_procs())
}

/// Every worker group of `run` as [`IaasDriver::list`] reports it (see
/// [`WorkerGroup::listed`]): one instance per process group, leaderless ones as
/// `Stopping`.
pub fn scan_workers(run: &str) -> Vec<ListedInstance> {
    scan_groups(run, None)
        .iter()
        .map(WorkerGroup::listed)
        .collect()
}

/// The live processes in process group `pgid`, whatever their environment.
fn live_members(pgid: i32) -> Vec<i32> {
    proc_pids()
        .into_iter()
        .filter(|pid| proc_stat(*pid).is_some_and(|st| st.is_alive() && st.pgrp == pgid))
        .collect()
}

/// Whether the group the driver signalled (with its leader's start time then, `None` if
/// it was leaderless) still has a live member. A live leader with another start time
/// means ours emptied and the number was reused: not there.
fn group_still_there(pgid: i32, leader_start: Option<u64>) -> bool {
    if let Some(st) = proc_stat(pgid).filter(|st| st.is_alive() && st.pgrp == pgid) {
        return leader_start == Some(st.start_time);
    }
    !live_members(pgid).is_empty()
}

/// SIGKILLs what is left of each group in `pgids` whose leader is dead, where members
/// carrying the run remain. Returns, per group, how many such members there were (0: not
/// signalled).
fn kill_remains(run: &str, pgids: &[i32]) -> Vec<(i32, usize)> {
    let groups: HashMap<i32, WorkerGroup> = scan_groups(run, None)
        .into_iter()
        .map(|g| (g.pgid, g))
        .collect();
    pgids
        .iter()
        .map(|pgid| match groups.get(pgid) {
            Some(g) if !g.leader_alive => {
                tracing::info!(pgid, pids = ?g.pids, "the worker's leader is dead; killing the rest of its process group");
                signal_group(*pgid, Signal::SIGKILL);
                (*pgid, g.pids.len())
            }
            _ => (*pgid, 0),
        })
        .collect()
}

/// Whether `terminate` has something to signal for the instance `pgid` (with the
/// recorded leader start time `incarnation`): `Some(leader start)` when the leader is
/// alive with that start time (or none was recorded), `Some(None)` when the leader is
/// dead but members carrying the run remain (a leaderless group), `None` when nothing of
/// it is left (or the number now belongs to another process).
fn terminate_target(run: &str, pgid: i32, incarnation: Option<&str>) -> Option<Option<u64>> {
    if let Some(st) = proc_stat(pgid).filter(|st| st.is_alive()) {
        let ours = incarnation.is_none_or(|t| t == st.start_time.to_string());
        return (ours && st.pgrp == pgid).then_some(Some(st.start_time));
    }
    scan_groups(run, None)
        .iter()
        .any(|g| g.pgid == pgid && !g.leader_alive)
        .then_some(None)
}

fn remains_note(killed: usize) -> String {
    if killed == 0 {
        String::new()
    } else {
        format!("; {killed} leftover process(es) of its group killed")
    }
}

/// How often [`kill_run_groups`] looks at `/proc` again.
const RUN_KILL_POLL: Duration = Duration::from_millis(50);

/// The teardown of [`kill_run_groups`], one look at `/proc` per step.
struct RunKill<'a> {
    run: &'a str,
    run_dir: Option<&'a Path>,
    kill_at: Instant,
    give_up_at: Instant,
    termed: HashSet<i32>,
}

impl<'a> RunKill<'a> {
    fn new(run: &'a str, run_dir: Option<&'a Path>, grace: Duration, deadline: Duration) -> Self {
        let now = Instant::now();
        RunKill {
            run,
            run_dir,
            kill_at: now + grace.min(deadline),
            give_up_at: now + deadline,
            termed: HashSet::new(),
        }
    }

    /// `Ok(left)` when done (empty: clean), `Err(wait)` to look again after `wait`.
    fn step(&mut self) -> Result<Vec<WorkerGroup>, Duration> {
        let groups = scan_groups(self.run, self.run_dir);
        if groups.is_empty() {
            return Ok(groups);
        }
        let now = Instant::now();
        if now >= self.kill_at {
            for g in &groups {
                signal_group(g.pgid, Signal::SIGKILL);
            }
        } else {
            for g in &groups {
                if self.termed.insert(g.pgid) {
                    signal_group(g.pgid, Signal::SIGTERM);
                }
            }
        }
        if now >= self.give_up_at {
            return Ok(groups);
        }
        let next = if now < self.kill_at {
            self.kill_at
        } else {
            self.give_up_at
        };
        Err(next.saturating_duration_since(now).min(RUN_KILL_POLL))
    }
}

/// Kills every worker group of `run` (and `run_dir`, if given) from `/proc` alone, for
/// the operator's teardown when the provisioner may be dead: SIGTERM to every group,
/// up to `grace` for them to exit, then SIGKILL to what remains (and to groups that
/// appeared meanwhile), until none is left or `deadline` (counted from the call, the
/// grace included) has passed. Returns the groups still alive at the end: empty means
/// clean.
///
/// Independent of any provisioner state; needs a tokio runtime only for
/// `tokio::time::sleep`.
pub async fn kill_run_groups(
    run: &str,
    run_dir: Option<&Path>,
    grace: Duration,
    deadline: Duration,
) -> Vec<WorkerGroup> {
    let mut k = RunKill::new(run, run_dir, grace, deadline);
    loop {
        match k.step() {
            Ok(left) => return left,
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
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
        let run = self.run.to_string();
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
                if gone.is_empty() {
                    continue;
                }
                let pgids: Vec<i32> = gone.iter().map(|(pid, _)| *pid).collect();
                let run = run.clone();
                let killed: HashMap<i32, usize> = tokio::task::spawn_blocking(move || {
                    kill_remains(&run, &pgids).into_iter().collect()
                })
                .await
                .unwrap_or_default();
                for (pid, info) in gone {
                    let note = remains_note(killed.get(&pid).copied().unwrap_or(0));
                    let _ = events.send(DriverEvent::Exited {
                        node_id: info.node_id,
                        iaas_id: pid.to_string(),
                        incarnation: Some(info.start_time),
                        detail: format!(
                            "exited (not a child of this provisioner: exit status unknown){note}"
                        ),
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
        let existing = tokio::task::spawn_blocking(move || scan_groups(&run, None))
            .await
            .unwrap_or_default();
        let mut by_node: HashMap<String, WorkerGroup> = HashMap::new();
        for g in existing {
            by_node.insert(g.node_id.clone(), g);
        }
        let mut out = LaunchOutcome::default();
        for node_id in &req.node_ids {
            if let Some(group) = by_node.remove(node_id) {
                if !group.leader_alive {
                    // Launched before a crash, and its leader died since: what is left
                    // of the group goes, and the node is a failed launch.
                    signal_group(group.pgid, Signal::SIGKILL);
                    tracing::info!(node_id = %node_id, pgid = group.pgid, pids = ?group.pids, "a worker launched before the crash lost its leader; killed the rest of its group");
                    out.failed.push((
                        node_id.clone(),
                        IaasError::new(
                            IaasErrorKind::Other,
                            format!(
                                "the worker launched before the provisioner restarted has died (process group {} had lost its leader; {} leftover process(es) killed)",
                                group.pgid,
                                group.pids.len()
                            ),
                        ),
                    ));
                    continue;
                }
                let found = group.listed();
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
            if pid <= 1 {
                out.push(TerminateOutcome::Gone);
                continue;
            }
            let run = self.run.to_string();
            let incarnation = r.incarnation.clone();
            let target = tokio::task::spawn_blocking(move || {
                terminate_target(&run, pid, incarnation.as_deref())
            })
            .await
            .unwrap_or(None);
            let Some(leader_start) = target else {
                out.push(TerminateOutcome::Gone);
                continue;
            };
            signal_group(pid, Signal::SIGTERM);
            let grace = self.settings.terminate_grace;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let there =
                    tokio::task::spawn_blocking(move || group_still_there(pid, leader_start))
                        .await
                        .unwrap_or(true);
                if there {
                    tracing::info!(pid, "worker group still there after the grace; SIGKILL");
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
                let run = self.run.to_string();
                let killed = tokio::task::spawn_blocking(move || kill_remains(&run, &[pid]))
                    .await
                    .ok()
                    .and_then(|v| v.first().map(|(_, n)| *n))
                    .unwrap_or(0);
                let _ = self.events.send(DriverEvent::Exited {
                    node_id: r.node_id.clone(),
                    iaas_id: r.iaas_id.clone(),
                    incarnation: r.incarnation.clone(),
                    detail: format!(
                        "the worker process is gone (it ended while the provisioner was down){}",
                        remains_note(killed)
                    ),
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

    /// A process for [`group_procs`]: pid, state, pgrp, start time, and its `EPU_*`
    /// environment (`run`, `run_dir`, `node`; `None` leaves a variable out).
    fn p(
        pid: i32,
        state: char,
        pgrp: i32,
        run: Option<&str>,
        run_dir: Option<&str>,
        node: Option<&str>,
    ) -> ProcInfo {
        let mut env = HashMap::new();
        for (k, v) in [
            ("EPU_RUN", run),
            ("EPU_RUN_DIR", run_dir),
            ("EPU_NODE_ID", node),
        ] {
            if let Some(v) = v {
                env.insert(k.to_string(), v.to_string());
            }
        }
        ProcInfo {
            pid,
            stat: Some(ProcStat {
                state,
                pgrp,
                start_time: 1000 + pid as u64,
            }),
            env,
        }
    }

    #[test]
    fn processes_are_grouped_into_workers_by_process_group() {
        let r = Some("r1");
        let d = Some("/runs/r1");
        struct Case {
            what: &'static str,
            procs: Vec<ProcInfo>,
            run_dir: Option<&'static str>,
            /// (pgid, node_id, leader_alive, pids)
            want: Vec<(i32, &'static str, bool, Vec<i32>)>,
        }
        let cases = vec![
            Case {
                what: "a live leader and its workload child",
                procs: vec![
                    p(10, 'S', 10, r, d, Some("n1")),
                    p(11, 'S', 10, r, d, Some("n1")),
                ],
                run_dir: None,
                want: vec![(10, "n1", true, vec![10, 11])],
            },
            Case {
                what: "the leader died (gone): its child is a leaderless group",
                procs: vec![p(11, 'S', 10, r, d, Some("n1"))],
                run_dir: None,
                want: vec![(10, "n1", false, vec![11])],
            },
            Case {
                what: "a zombie leader does not count as alive, nor as a member",
                procs: vec![
                    p(10, 'Z', 10, r, d, Some("n1")),
                    p(11, 'R', 10, r, d, Some("n1")),
                ],
                run_dir: None,
                want: vec![(10, "n1", false, vec![11])],
            },
            Case {
                what: "zombie members are left out; a group of zombies is no worker",
                procs: vec![
                    p(20, 'Z', 20, r, d, Some("n2")),
                    p(21, 'Z', 20, r, d, Some("n2")),
                ],
                run_dir: None,
                want: vec![],
            },
            Case {
                what: "a live leader that is not of the run: the group is not ours",
                procs: vec![
                    p(30, 'S', 30, None, None, None),
                    p(31, 'S', 30, r, d, Some("n3")),
                ],
                run_dir: None,
                want: vec![],
            },
            Case {
                what: "another run's workers are not listed",
                procs: vec![p(40, 'S', 40, Some("r2"), d, Some("n4"))],
                run_dir: None,
                want: vec![],
            },
            Case {
                what: "without EPU_NODE_ID a process is no worker",
                procs: vec![p(50, 'S', 50, r, d, None)],
                run_dir: None,
                want: vec![],
            },
            Case {
                what: "the run dir filter: same run name, another directory",
                procs: vec![
                    p(60, 'S', 60, r, Some("/elsewhere"), Some("n6")),
                    p(70, 'S', 70, r, d, Some("n7")),
                ],
                run_dir: Some("/runs/r1"),
                want: vec![(70, "n7", true, vec![70])],
            },
            Case {
                what: "init's and the kernel's groups are never a worker's",
                procs: vec![
                    p(80, 'S', 1, r, d, Some("n8")),
                    p(81, 'S', 0, r, d, Some("n8")),
                ],
                run_dir: None,
                want: vec![],
            },
            Case {
                what: "several groups come out ascending by pgid",
                procs: vec![
                    p(92, 'S', 92, r, d, Some("b")),
                    p(90, 'S', 90, r, d, Some("a")),
                ],
                run_dir: None,
                want: vec![(90, "a", true, vec![90]), (92, "b", true, vec![92])],
            },
        ];
        for c in cases {
            let got = group_procs("r1", c.run_dir.map(Path::new), &c.procs);
            let got: Vec<(i32, String, bool, Vec<i32>)> = got
                .into_iter()
                .map(|g| (g.pgid, g.node_id, g.leader_alive, g.pids))
                .collect();
            let want: Vec<(i32, String, bool, Vec<i32>)> = c
                .want
                .into_iter()
                .map(|(a, b, l, p)| (a, b.to_string(), l, p))
                .collect();
            assert_eq!(got, want, "{}", c.what);
        }
    }

    #[test]
    fn a_leaderless_group_is_listed_stopping_without_an_incarnation() {
        let g = group_procs("r1", None, &[p(11, 'S', 10, Some("r1"), None, Some("n1"))]);
        let l = g[0].listed();
        assert_eq!(l.state, InstanceState::Stopping);
        assert_eq!(l.incarnation, None);
        assert_eq!(l.iaas_id, "10");
        let g = group_procs("r1", None, &[p(10, 'S', 10, Some("r1"), None, Some("n1"))]);
        let l = g[0].listed();
        assert_eq!(l.state, InstanceState::Running);
        assert_eq!(l.incarnation.as_deref(), Some("1010"));
    }
}
