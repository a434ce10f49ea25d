//! No command hangs: with the run's services frozen (SIGSTOP), a command gives up
//! at its `--timeout`, says what it was waiting for and exits 7; `killrun` says the
//! provisioner does not answer, goes on to terminate by the run's tag, and exits 0
//! with nothing left.

mod common;

use std::time::{Duration, Instant};

use common::{service_pids, signal, wait_for, Cli};

#[test]
fn a_frozen_run_gets_deadlines_and_killrun_falls_back_to_the_tag() {
    let cli = Cli::new("frozen");
    cli.launch("examples/sleeper/plan.toml");
    wait_for("3 RUNNING", 30, &cli, || cli.running().len() == 3);
    let (host, _) = service_pids(&cli);
    signal(host, "STOP");

    let t = Instant::now();
    let out = cli.out_within(
        &["inspect", "nodes", "--run", &cli.run, "--timeout", "2"],
        30,
    );
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "exit 7 at the deadline: {err}");
    assert!(
        err.contains("after 2 s") && err.contains("waiting for the provisioner's answer"),
        "it says what it waited for: {err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "gave up at 2 s, took {took:?}"
    );

    let t = Instant::now();
    let out = cli.out(&["killrun", "--run", &cli.run, "--timeout", "60"]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "killrun: {err}");
    assert!(
        err.contains("did not answer") && err.contains("terminating by the run's tag"),
        "it says the provisioner did not answer and what it does instead: {err}"
    );
    eprintln!("killrun of a frozen run: {:.1} s", took.as_secs_f64());
    common::assert_nothing_left(&cli);
}
