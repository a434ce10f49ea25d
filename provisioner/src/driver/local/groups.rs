//! The `/proc` side of the local driver: reading processes, grouping the ones that carry
//! a run into [`WorkerGroup`]s ([`scan_groups`], its pure half `group_procs`), and
//! signalling and killing process groups ([`kill_run_groups`] for the teardown).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::super::{InstanceState, ListedInstance};

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
    /// The group as [`IaasDriver::list`](crate::driver::IaasDriver::list) reports it.
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

/// Every worker group of `run` as [`IaasDriver::list`](crate::driver::IaasDriver::list) reports it (see
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
pub(super) fn group_still_there(pgid: i32, leader_start: Option<u64>) -> bool {
    if let Some(st) = proc_stat(pgid).filter(|st| st.is_alive() && st.pgrp == pgid) {
        return leader_start == Some(st.start_time);
    }
    !live_members(pgid).is_empty()
}

/// SIGKILLs what is left of each group in `pgids` whose leader is dead, where members
/// carrying the run remain. Returns, per group, how many such members there were (0: not
/// signalled).
pub(super) fn kill_remains(run: &str, pgids: &[i32]) -> Vec<(i32, usize)> {
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
pub(super) fn terminate_target(
    run: &str,
    pgid: i32,
    incarnation: Option<&str>,
) -> Option<Option<u64>> {
    if let Some(st) = proc_stat(pgid).filter(|st| st.is_alive()) {
        let ours = incarnation.is_none_or(|t| t == st.start_time.to_string());
        return (ours && st.pgrp == pgid).then_some(Some(st.start_time));
    }
    scan_groups(run, None)
        .iter()
        .any(|g| g.pgid == pgid && !g.leader_alive)
        .then_some(None)
}

pub(super) fn remains_note(killed: usize) -> String {
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

pub(super) fn signal_group(pid: i32, sig: Signal) {
    if pid <= 1 {
        return;
    }
    // ESRCH (already gone) and EPERM are both "nothing more we can do".
    let _ = killpg(Pid::from_raw(pid), sig);
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
