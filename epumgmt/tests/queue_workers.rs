//! queue-workers: the shipped plan, unchanged, under a random run name. 300 jobs on
//! the run's queue `jobs.<run>` (the plan says `jobs.{run}`) grow the pool (never
//! above 10); drained, it shrinks back to 1 after the cooldown; killrun leaves
//! nothing.

mod common;

use std::time::{Duration, Instant};

use common::{bin, live_workers, output_within, Cli};

/// Deletes the run's work queue (durable, so it would outlive the test), whatever
/// the test's outcome; bounded, and never panics.
struct QueueCleanup(String);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let mut c = std::process::Command::new("rabbitmqctl");
        c.args(["-q", "delete_queue", &self.0]);
        let _ = common::run_with_deadline(&mut c, Duration::from_secs(30));
    }
}

#[test]
fn the_pool_follows_the_backlog() {
    // Declared before `cli`, so dropped after it: the queue goes once the run's
    // workers (which would declare it again) are gone.
    let _cleanup: QueueCleanup;
    let cli = Cli::new("qw");
    // The plan's policy names its queue `jobs.{run}`: this run's is jobs.<run>.
    let queue = format!("jobs.{}", cli.run);
    _cleanup = QueueCleanup(queue.clone());
    cli.launch("examples/queue-workers/plan.toml");
    common::wait_for("1 worker (min_instances)", 30, &cli, || {
        cli.running().len() == 1
    });

    let produced = output_within(
        std::process::Command::new(bin("epu-queue-producer")).args([
            "--queue",
            &queue,
            "--count",
            "300",
            "--seconds",
            "1",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        produced.status.success(),
        "the producer failed ({}): {}",
        produced.status,
        String::from_utf8_lossy(&produced.stderr)
    );

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
}
