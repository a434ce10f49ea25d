//! The test helpers' own tests: every process a test starts has a deadline, and a
//! command that hangs fails the test quickly, saying what it was and what it printed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{command_line, limit_for, run_with_deadline, RunError, DEFAULT_LIMIT, LONG_LIMIT};

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

#[test]
fn a_hanging_command_times_out_quickly() {
    let started = Instant::now();
    let r = run_with_deadline(Command::new("sleep").arg("30"), Duration::from_secs(1));
    let took = started.elapsed();
    let Err(e) = r else {
        panic!("sleep 30 finished within 1 s: {r:?}")
    };
    assert!(e.is_timeout(), "{e}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "gave up after {took:?}"
    );
    let m = e.to_string();
    assert!(m.contains("`sleep 30`"), "{m}");
    assert!(m.contains("within 1 s"), "{m}");
}

#[test]
fn a_timeout_shows_what_was_printed_and_kills_the_whole_group() {
    // The shell prints, starts a grandchild in its group, and waits for it.
    let r = run_with_deadline(
        &mut sh("echo before; echo oops >&2; sleep 30 & echo $!; wait"),
        Duration::from_secs(1),
    );
    let Err(RunError::TimedOut { stdout, stderr, .. }) = &r else {
        panic!("not a timeout: {r:?}")
    };
    assert!(stdout.starts_with("before\n"), "{stdout:?}");
    assert_eq!(stderr, "oops\n");
    let m = r.as_ref().expect_err("timeout").to_string();
    assert!(m.contains("before") && m.contains("oops"), "{m}");
    // The grandchild went with it (reaped by init, or a zombie for a moment).
    let grandchild: u32 = stdout.lines().nth(1).expect("pid").parse().expect("pid");
    let gone = || {
        std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let until = Instant::now() + Duration::from_secs(5);
    while !gone() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(), "the grandchild {grandchild} outlived the timeout");
}

#[test]
fn a_chatty_command_cannot_block_on_its_output() {
    // Far more than a pipe holds (64 KiB), on both streams.
    let r = run_with_deadline(
        &mut sh(
            "head -c 2000000 /dev/zero | tr '\\0' x; head -c 500000 /dev/zero | tr '\\0' y >&2",
        ),
        Duration::from_secs(20),
    )
    .expect("finishes");
    assert!(r.status.success());
    assert_eq!(r.stdout.len(), 2_000_000);
    assert_eq!(r.stderr.len(), 500_000);
}

#[test]
fn exit_status_and_both_streams_come_back() {
    let r = run_with_deadline(
        &mut sh("echo out; echo err >&2; exit 3"),
        Duration::from_secs(10),
    )
    .expect("finishes");
    assert_eq!(r.status.code(), Some(3));
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
}

#[test]
fn a_missing_program_is_a_spawn_error() {
    let r = run_with_deadline(
        &mut Command::new("/nonexistent/epu-no-such-program"),
        Duration::from_secs(5),
    );
    assert!(matches!(r, Err(RunError::Spawn { .. })), "{r:?}");
}

#[test]
fn command_lines_are_shown_as_typed_with_secrets_redacted() {
    let mut c = Command::new("epumgmt");
    c.args(["launch", "my plan.toml", "--run", "r1"])
        .env("EPU_HOME", "/tmp/h")
        .env("AWS_SECRET_ACCESS_KEY", "hunter2");
    let line = command_line(&c);
    assert!(
        line.ends_with("epumgmt launch 'my plan.toml' --run r1"),
        "{line}"
    );
    assert!(line.contains("EPU_HOME=/tmp/h"), "{line}");
    assert!(!line.contains("hunter2"), "{line}");
}

#[test]
fn launch_and_killrun_get_the_long_limit() {
    assert_eq!(limit_for(&["status", "--run", "r"]), DEFAULT_LIMIT);
    assert_eq!(
        limit_for(&["launch", "plan.toml", "--run", "r"]),
        LONG_LIMIT
    );
    assert_eq!(limit_for(&["killrun", "--run", "r"]), LONG_LIMIT);
    // A longer --timeout of the CLI's own wins, with a margin for its message.
    assert_eq!(
        limit_for(&["status", "--timeout", "100"]),
        Duration::from_secs(115)
    );
    assert_eq!(limit_for(&["killrun", "--timeout=30"]), LONG_LIMIT);
}

#[test]
fn an_epumgmt_command_runs_through_the_cli_helper() {
    let cli = common::Cli::new("harness");
    let o = cli.out_within(&["--help"], 30);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--timeout"));
    let runs = cli.json(&["list-runs"]);
    assert_eq!(runs, serde_json::json!([]));
    // The human table ends with a newline even when there are no runs.
    let table = cli.ok(&["list-runs"]);
    assert!(table.starts_with("RUN"), "{table:?}");
    assert!(table.ends_with('\n'), "{table:?}");
}

#[test]
fn the_cli_wrapper_panics_on_a_timeout_naming_the_command_and_the_run() {
    let cli = common::Cli::new("harness");
    let started = Instant::now();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cli.run_cmd(
            &mut sh("echo waiting for godot; sleep 30"),
            Duration::from_secs(1),
        )
    }))
    .expect_err("a timeout panics");
    assert!(started.elapsed() < Duration::from_secs(5));
    let m = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        m.contains("`sh -c 'echo waiting for godot; sleep 30'`"),
        "{m}"
    );
    assert!(m.contains("did not finish within 1 s"), "{m}");
    assert!(m.contains("waiting for godot"), "{m}");
    assert!(
        m.contains(&format!("run {}: no logs (yet)", cli.run)),
        "{m}"
    );
}
