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

mod groups;
mod spawn;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use epu_core::wire::RunName;
use epu_model::messages::Deployable;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::{
    DriverEvent, EventReceiver, IaasDriver, IaasError, IaasErrorKind, InstanceRef, InstanceState,
    LaunchOutcome, LaunchRequest, LaunchedInstance, ListedInstance, TerminateOutcome,
};

pub use groups::{
    is_alive, kill_run_groups, parse_stat, proc_stat, scan_groups, scan_workers, ProcStat,
    WorkerGroup,
};

use groups::{group_still_there, kill_remains, remains_note, signal_group, terminate_target};
use watch::Watched;

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
