//! Driving `epumgmt` as a user types it: a private EPU_HOME, the real binaries.
//!
//! Every process a test starts through these helpers has a deadline. The core is
//! [`run_with_deadline`]: it spawns the command in its own process group with
//! stdout and stderr going to temporary files (not pipes, so a chatty child or a
//! grandchild holding the pipe open cannot block it), polls until the deadline, and
//! on timeout kills the whole group and returns [`RunError::TimedOut`] with the
//! command line and what it had printed. The `Cli` methods panic on top of it,
//! adding the run's logs. Defaults: [`DEFAULT_LIMIT`] (60 s) for a command,
//! [`LONG_LIMIT`] (240 s) for `launch` and `killrun`; `Cli::out_within` and
//! `Cli::ok_within` take a limit of their own.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a CLI command may take, unless the call says otherwise.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(60);
/// How long `launch` and `killrun` may take (the CLI's own defaults are 180 s
/// and 300 s; a test's runs are small and local).
pub const LONG_LIMIT: Duration = Duration::from_secs(240);
/// The `--timeout` the cleanup `killrun` in `Cli`'s `Drop` passes to the CLI...
pub const CLEANUP_TIMEOUT_SECS: u64 = 30;
/// ...and how long it is given from outside before it is killed.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(45);

/// How much of a command's stdout and stderr an error message shows (the end).
const SHOW_BYTES: usize = 16 * 1024;

pub struct Cli {
    pub home: tempfile::TempDir,
    pub run: String,
}

/// Why a command run through [`run_with_deadline`] gave no [`Output`].
#[derive(Debug)]
pub enum RunError {
    /// It could not be started (or its output could not be captured).
    Spawn {
        command: String,
        error: std::io::Error,
    },
    /// It was still running at the deadline and was killed (with its process group).
    TimedOut {
        command: String,
        limit: Duration,
        stdout: String,
        stderr: String,
    },
}

impl RunError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, RunError::TimedOut { .. })
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spawn { command, error } => write!(f, "cannot run `{command}`: {error}"),
            RunError::TimedOut {
                command,
                limit,
                stdout,
                stderr,
            } => write!(
                f,
                "`{command}` did not finish within {} s and was killed\n\
                 --- its stdout so far ---\n{}\n--- its stderr so far ---\n{}",
                limit.as_secs_f64(),
                tail(stdout, SHOW_BYTES),
                tail(stderr, SHOW_BYTES)
            ),
        }
    }
}

impl std::error::Error for RunError {}

/// The end of `s`, at most `max` bytes (on a character boundary).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes left out ...]\n{}", &s[start..])
}

fn shell_word(w: &OsStr) -> String {
    let w = w.to_string_lossy();
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The command as a shell line: the environment it sets, the program, the arguments.
pub fn command_line(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| {
            let k = k.to_string_lossy();
            let secret = ["SECRET", "PASSWORD", "TOKEN"]
                .iter()
                .any(|w| k.to_ascii_uppercase().contains(w));
            v.map(|v| {
                if secret {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={}", shell_word(v))
                }
            })
        })
        .collect();
    words.push(shell_word(cmd.get_program()));
    words.extend(cmd.get_args().map(shell_word));
    words.join(" ")
}

/// Runs `cmd` to completion or until `limit` has passed, whichever is first.
///
/// stdin is `/dev/null`; stdout and stderr go to temporary files, read back at the
/// end. The command runs in a process group of its own; on timeout the whole group
/// is killed (SIGKILL), so nothing it started in that group lingers (a run's
/// supervisor has a group of its own and is left to `killrun`).
pub fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Result<Output, RunError> {
    use std::os::unix::process::CommandExt;
    let command = command_line(cmd);
    let spawn_err = |error: std::io::Error| RunError::Spawn {
        command: command.clone(),
        error,
    };
    let out = tempfile::NamedTempFile::new().map_err(spawn_err)?;
    let err = tempfile::NamedTempFile::new().map_err(spawn_err)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().map_err(spawn_err)?)
        .stderr(err.reopen().map_err(spawn_err)?)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let read = |f: &tempfile::NamedTempFile| std::fs::read(f.path()).unwrap_or_default();
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(Output {
                    status,
                    stdout: read(&out),
                    stderr: read(&err),
                })
            }
            Ok(None) => {}
            Err(e) => {
                kill_group(&mut child);
                return Err(spawn_err(e));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(&mut child);
            return Err(RunError::TimedOut {
                command,
                limit,
                stdout: String::from_utf8_lossy(&read(&out)).into_owned(),
                stderr: String::from_utf8_lossy(&read(&err)).into_owned(),
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// SIGKILL to the child's process group (its PID: it was spawned as the group
/// leader), then to the child itself in case that failed, and reap it.
fn kill_group(child: &mut std::process::Child) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    if let Ok(pgid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// [`run_with_deadline`], panicking with the command line and its output when it
/// cannot be run or times out. For commands that are not `epumgmt` (use the `Cli`
/// methods for those: their panics carry the run's logs too).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    run_with_deadline(cmd, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// The limit for an `epumgmt` command line: [`LONG_LIMIT`] for `launch` and
/// `killrun`, else [`DEFAULT_LIMIT`]; when the line gives the CLI a longer
/// `--timeout N` of its own, N + 15 s, so that the CLI's own deadline (exit 7, saying
/// what it waited for) comes first.
pub fn limit_for(args: &[&str]) -> Duration {
    let base = if args.iter().any(|a| matches!(*a, "launch" | "killrun")) {
        LONG_LIMIT
    } else {
        DEFAULT_LIMIT
    };
    let own = args
        .iter()
        .position(|a| *a == "--timeout")
        .and_then(|i| args.get(i + 1))
        .copied()
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--timeout=")))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(|t| Duration::from_secs_f64(t) + Duration::from_secs(15));
    own.map_or(base, |own| own.max(base))
}

/// The workspace's binaries live beside `epumgmt` (target/debug).
pub fn bin(name: &str) -> PathBuf {
    let epumgmt = PathBuf::from(env!("CARGO_BIN_EXE_epumgmt"));
    let p = epumgmt.parent().expect("bin dir").join(name);
    assert!(
        p.exists(),
        "{} is not built: run the suite with `cargo test --workspace` (or `cargo build --workspace` first)",
        p.display()
    );
    p
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_path_buf()
}

impl Cli {
    pub fn new(prefix: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Cli {
            home: tempfile::tempdir().expect("tmp"),
            run: format!("t-{prefix}-{}", &suffix[..8]),
        }
    }

    /// The `epumgmt` command with the test's EPU_HOME, not yet started. Run it with
    /// [`Cli::run_cmd`] (it has a deadline), not with `.output()`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_epumgmt"));
        c.args(args).env("EPU_HOME", self.home.path());
        c
    }

    /// Runs `cmd` (usually from [`Cli::cmd`], with extra environment) under
    /// `limit`; whatever the exit code, its output. Panics if it cannot be run or
    /// times out, with the command line, what it printed and the run's logs.
    pub fn run_cmd(&self, cmd: &mut Command, limit: Duration) -> Output {
        run_with_deadline(cmd, limit).unwrap_or_else(|e| panic!("{e}\n{}", self.logs_report()))
    }

    /// Runs under `limit`; the output, or why there is none.
    pub fn try_out_within(&self, args: &[&str], limit: Duration) -> Result<Output, RunError> {
        run_with_deadline(&mut self.cmd(args), limit)
    }

    /// Runs and returns the output, whatever the exit code; the limit is
    /// [`limit_for`] the command (60 s; 240 s for `launch` and `killrun`).
    pub fn out(&self, args: &[&str]) -> Output {
        self.run_cmd(&mut self.cmd(args), limit_for(args))
    }

    /// [`Cli::out`] with a limit of `secs` seconds.
    pub fn out_within(&self, args: &[&str], secs: u64) -> Output {
        self.run_cmd(&mut self.cmd(args), Duration::from_secs(secs))
    }

    /// Runs and asserts exit 0; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.out(args);
        self.check_ok(args, o)
    }

    /// [`Cli::ok`] with a limit of `secs` seconds.
    pub fn ok_within(&self, args: &[&str], secs: u64) -> String {
        let o = self.out_within(args, secs);
        self.check_ok(args, o)
    }

    fn check_ok(&self, args: &[&str], o: Output) -> String {
        assert!(
            o.status.success(),
            "`{}` failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
            command_line(&self.cmd(args)),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.logs_report()
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.ok(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"))
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.json(&["inspect", "nodes", "--run", &self.run])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn running(&self) -> Vec<Value> {
        self.nodes()
            .into_iter()
            .filter(|n| n["state"] == "RUNNING" && n["health"] != "MISSING")
            .collect()
    }

    /// `launch` (within [`LONG_LIMIT`]), asserting it prints the run name.
    pub fn launch(&self, plan: &str) {
        let plan = repo().join(plan);
        let out = self.ok(&["launch", plan.to_str().expect("utf8"), "--run", &self.run]);
        assert_eq!(out.trim(), self.run, "launch prints the run name");
    }

    /// The last 30 lines of each of the run's logs.
    pub fn logs(&self) -> String {
        let dir = self.home.path().join("runs").join(&self.run).join("logs");
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                s.push_str(&format!("== {}\n", e.path().display()));
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// [`Cli::logs`] under a heading, or a line saying there are none.
    fn logs_report(&self) -> String {
        let logs = self.logs();
        if logs.is_empty() {
            format!("--- run {}: no logs (yet) ---", self.run)
        } else {
            format!(
                "--- run {}: its logs (last 30 lines each) ---\n{logs}",
                self.run
            )
        }
    }

    /// Processes other than ours whose command line mentions this test's EPU_HOME
    /// (the run's supervisor, and its services when they are separate processes).
    pub fn leftover_processes(&self) -> Vec<u64> {
        let home = self.home.path().as_os_str().as_encoded_bytes().to_vec();
        let me = u64::from(std::process::id());
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if !cmdline.windows(home.len()).any(|w| w == home.as_slice()) {
                continue;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Cli {
    /// Whatever happened, nothing of the run stays alive, and cleanup cannot hang:
    /// `killrun --timeout 30` killed from outside after [`CLEANUP_LIMIT`], then
    /// SIGKILL to whatever of the run is still there. Never panics (this may run
    /// while a test is already panicking).
    fn drop(&mut self) {
        let secs = CLEANUP_TIMEOUT_SECS.to_string();
        let mut c = self.cmd(&["killrun", "--run", &self.run, "--timeout", &secs]);
        if let Err(e) = run_with_deadline(&mut c, CLEANUP_LIMIT) {
            eprintln!("cleanup of run {}: {e}\n{}", self.run, self.logs_report());
        }
        for pid in live_workers(&self.run) {
            signal(pid, "KILL");
        }
        for pid in self.leftover_processes() {
            eprintln!(
                "cleanup of run {}: process {pid} outlived killrun; killed",
                self.run
            );
            signal(pid, "KILL");
        }
    }
}

/// Polls `f` (every 250 ms) until it is true; panics after `secs` seconds, saying
/// what it waited for, how long and how often it looked, the run's nodes as far as
/// `inspect nodes` can tell within 10 s, and the run's logs. Each look that runs
/// the CLI has its own deadline, so a look cannot hang either.
pub fn wait_for(what: &str, secs: u64, cli: &Cli, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut looks = 0u32;
    loop {
        looks += 1;
        if f() {
            return;
        }
        if Instant::now() > deadline {
            let nodes = match cli.try_out_within(
                &["inspect", "nodes", "--run", &cli.run],
                Duration::from_secs(10),
            ) {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => e.to_string(),
            };
            panic!(
                "timed out after {secs} s waiting for: {what} (looked {looks} times over {:.1} s)\n\
                 --- epumgmt inspect nodes --run {} ---\n{nodes}\n{}",
                start.elapsed().as_secs_f64(),
                cli.run,
                cli.logs_report()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `kill -SIG PID`, ignoring failure (also used while cleaning up, which must not
/// panic).
pub fn signal(pid: u64, sig: &str) {
    let _ = run_with_deadline(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
        Duration::from_secs(10),
    );
}

/// Worker processes of a run, found in the process table (their environment).
pub fn live_workers(run: &str) -> Vec<u64> {
    let want = format!("EPU_RUN={run}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if !zombie && env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

pub fn pid_of(node: &Value) -> u64 {
    node["iaas_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("node without a PID: {node}"))
}

/// Live (not zombie) processes whose process group is `pgid`: what is left of a
/// local worker whose group leader was `pgid`.
pub fn group_members(pgid: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let alive = fields.first().is_some_and(|s| *s != "Z" && *s != "X");
        if alive && fields.get(2).and_then(|g| g.parse::<u64>().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// The PIDs of the run's services and supervisor, from `status --json`.
pub fn service_pids(cli: &Cli) -> (u64, Vec<u64>) {
    let s = cli.json(&["status", "--run", &cli.run]);
    let services = s["services"]
        .as_array()
        .unwrap_or_else(|| panic!("status without services: {s}"))
        .iter()
        .filter_map(|x| x["pid"].as_u64())
        .collect();
    let sup = s["supervisor_pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("status without supervisor_pid: {s}"));
    (sup, services)
}

/// No worker process of the run and no process of its run directory is alive.
pub fn assert_nothing_left(cli: &Cli) {
    let workers = live_workers(&cli.run);
    assert!(
        workers.is_empty(),
        "workers of run {} alive: {workers:?}",
        cli.run
    );
    let procs = cli.leftover_processes();
    assert!(
        procs.is_empty(),
        "processes of run {} alive: {procs:?}",
        cli.run
    );
}
