//! Driving `epumgmt` as a user types it: a private EPU_HOME, the real binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Cli {
    pub home: tempfile::TempDir,
    pub run: String,
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

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_epumgmt"));
        c.args(args).env("EPU_HOME", self.home.path());
        c
    }

    /// Runs and returns the output, whatever the exit code.
    pub fn out(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run epumgmt")
    }

    /// Runs and asserts exit 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.out(args);
        assert!(
            o.status.success(),
            "epumgmt {args:?} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
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

    pub fn launch(&self, plan: &str) {
        let plan = repo().join(plan);
        let out = self.ok(&["launch", plan.to_str().expect("utf8"), "--run", &self.run]);
        assert_eq!(out.trim(), self.run, "launch prints the run name");
    }

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
}

impl Drop for Cli {
    /// Whatever happened, nothing of the run stays alive.
    fn drop(&mut self) {
        let _ = self
            .cmd(&["killrun", "--run", &self.run, "--timeout", "30"])
            .output();
        for pid in live_workers(&self.run) {
            signal(pid, "KILL");
        }
    }
}

pub fn wait_for(what: &str, secs: u64, cli: &Cli, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            panic!(
                "timed out after {secs}s waiting for: {what}\n{}",
                cli.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn signal(pid: u64, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
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
