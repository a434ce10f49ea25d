//! queue-workers: 300 jobs grow the pool (never above 10); drained, it shrinks
//! back to 1 after the cooldown; killrun leaves nothing.

mod common;

use std::time::{Duration, Instant};

use common::{bin, live_workers, repo, Cli};

#[test]
fn the_pool_follows_the_backlog() {
    let cli = Cli::new("qw");
    // The example's domain watches jobs.queue-workers; give this run its own copy.
    let dir = tempfile::tempdir().expect("tmp");
    let queue = format!("jobs.{}", cli.run);
    let domain = std::fs::read_to_string(repo().join("examples/queue-workers/domain.toml"))
        .expect("domain")
        .replace(
            "queue = \"jobs.queue-workers\"",
            &format!("queue = \"{queue}\""),
        );
    std::fs::write(dir.path().join("domain.toml"), domain).expect("write");
    let plan =
        std::fs::read_to_string(repo().join("examples/queue-workers/plan.toml")).expect("plan");
    let plan_path = dir.path().join("plan.toml");
    std::fs::write(&plan_path, plan).expect("write");
    let out = cli.ok(&[
        "launch",
        plan_path.to_str().expect("utf8"),
        "--run",
        &cli.run,
    ]);
    assert_eq!(out.trim(), cli.run);
    common::wait_for("1 worker (min_instances)", 30, &cli, || {
        cli.running().len() == 1
    });

    let produced = std::process::Command::new(bin("epu-queue-producer"))
        .args(["--queue", &queue, "--count", "300", "--seconds", "1"])
        .status()
        .expect("producer");
    assert!(produced.success());

    // Watch: the pool grows above 1, never above 10, until the queue is drained
    // and the pool is back at 1.
    let mut peak = 0usize;
    let mut back_to_one = false;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut drained_seen = false;
    while Instant::now() < deadline {
        let live = cli
            .nodes()
            .into_iter()
            .filter(|n| {
                matches!(
                    n["state"].as_str(),
                    Some("REQUESTING" | "REQUESTED" | "PENDING" | "STARTED" | "RUNNING")
                )
            })
            .count();
        peak = peak.max(live);
        assert!(live <= 10, "the pool went above max_instances: {live}");
        let domains = cli.json(&["inspect", "domains", "--run", &cli.run]);
        let backlog = domains[0]["backlog"].as_f64().unwrap_or(-1.0);
        if peak > 1 && backlog == 0.0 {
            drained_seen = true;
        }
        if drained_seen && live == 1 {
            back_to_one = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        peak > 1,
        "the pool never grew (peak {peak})\n{}",
        cli.logs()
    );
    assert!(
        back_to_one,
        "the pool did not shrink back to 1 (peak {peak})\n{}",
        cli.logs()
    );
    eprintln!("queue-workers: peak pool {peak}");

    cli.ok(&["killrun", "--run", &cli.run]);
    assert!(live_workers(&cli.run).is_empty());
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["-q", "delete_queue", &queue])
        .status();
}
