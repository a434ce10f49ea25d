//! The README's first command, as a user runs it: the standalone sleeper.

mod common;

use common::{live_workers, pid_of, signal, wait_for, Cli};

#[test]
fn standalone_sleeper_lives_heals_reconfigures_and_dies_clean() {
    let cli = Cli::new("sleeper");
    cli.launch("examples/sleeper/plan.toml");
    wait_for("3 RUNNING", 30, &cli, || cli.running().len() == 3);

    // SIGKILL one worker: back to 3, with a new node.
    let before: Vec<String> = cli
        .running()
        .iter()
        .map(|n| n["node_id"].to_string())
        .collect();
    let victim = cli.running()[0].clone();
    signal(pid_of(&victim), "KILL");
    wait_for("the killed worker FAILED and replaced", 30, &cli, || {
        let nodes = cli.nodes();
        let failed = nodes
            .iter()
            .any(|n| n["node_id"] == victim["node_id"] && n["state"] == "FAILED");
        let running = cli.running();
        failed
            && running.len() == 3
            && running
                .iter()
                .any(|n| !before.contains(&n["node_id"].to_string()))
    });

    // SIGSTOP a worker's agent: it goes silent, is judged MISSING, and is replaced.
    let stopped = cli.running()[0].clone();
    signal(pid_of(&stopped), "STOP");
    wait_for("the silent worker MISSING and replaced", 40, &cli, || {
        let nodes = cli.nodes();
        let gone = nodes.iter().any(|n| {
            n["node_id"] == stopped["node_id"]
                && (n["health"] == "MISSING"
                    || n["state"] == "TERMINATING"
                    || n["state"] == "TERMINATED")
        });
        gone && cli.running().len() == 3
    });
    signal(pid_of(&stopped), "CONT");

    // Reconfigure through the CLI; a bad value is refused with exit 4.
    let out = cli.ok(&[
        "reconfigure",
        "--run",
        &cli.run,
        "--domain",
        "sleeper",
        "preserve_n=5",
    ]);
    assert!(out.contains("accepted"), "{out}");
    let bad = cli.out(&[
        "reconfigure",
        "--run",
        &cli.run,
        "--domain",
        "sleeper",
        "preserve_n=lots",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(4),
        "refused: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("preserve_n"));
    wait_for("5 RUNNING", 30, &cli, || cli.running().len() == 5);

    // Status, events and find-workers tell the story.
    let status = cli.json(&["status", "--run", &cli.run]);
    assert_eq!(status["domains"][0]["running"], 5, "{status}");
    assert!(status["services"]
        .as_array()
        .expect("services")
        .iter()
        .all(|s| s["ready"] == true));
    let events = cli.json(&["events", "--run", &cli.run, "--kind", "node_state"]);
    assert!(events.as_array().expect("events").len() >= 10, "{events}");
    let decisions = cli.json(&["inspect", "decisions", "--run", &cli.run]);
    assert!(!decisions.as_array().expect("decisions").is_empty());
    let workers = cli.json(&["find-workers", "--run", &cli.run]);
    assert!(workers
        .as_array()
        .expect("workers")
        .iter()
        .any(|w| w["process_alive"] == true));

    // killrun: exit 0, and no worker process of the run is alive.
    let out = cli.ok(&["killrun", "--run", &cli.run]);
    assert!(out.contains("killed"), "{out}");
    assert!(
        live_workers(&cli.run).is_empty(),
        "workers left: {:?}",
        live_workers(&cli.run)
    );
    let runs = cli.json(&["list-runs"]);
    assert_eq!(runs[0]["up"], false);
    // With the run down, commands say so with their exit code.
    let o = cli.out(&["status"]);
    assert_eq!(o.status.code(), Some(3), "no live run");
}
