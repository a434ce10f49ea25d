//! The sleeper over RabbitMQ: separate provisioner, sensor-aggregator and
//! epu-controller processes under the run's supervisor.

mod common;

use common::{live_workers, pid_of, signal, wait_for, Cli};
use std::process::Command;

fn queues_of(run: &str) -> Vec<String> {
    let out = common::run_with_deadline(
        Command::new("rabbitmqctl").args(["-q", "list_queues", "name"]),
        common::DEFAULT_LIMIT,
    )
    .unwrap_or_else(|e| {
        panic!("rabbitmqctl (install rabbitmq-server; bash scripts/test.sh does): {e}")
    });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("epu.{run}.")))
        .map(str::to_string)
        .collect()
}

#[test]
fn amqp_sleeper_with_separate_services() {
    let cli = Cli::new("amqp");
    cli.launch("examples/sleeper/plan-amqp.toml");
    let status = cli.json(&["status", "--run", &cli.run]);
    let services = status["services"].as_array().expect("services").clone();
    assert_eq!(services.len(), 3);
    let pids: Vec<&serde_json::Value> = services.iter().map(|s| &s["pid"]).collect();
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2],
        "separate processes: {status}"
    );
    wait_for("3 RUNNING", 30, &cli, || cli.running().len() == 3);

    let before: Vec<String> = cli
        .running()
        .iter()
        .map(|n| n["node_id"].to_string())
        .collect();
    signal(pid_of(&cli.running()[0]), "KILL");
    wait_for("replaced", 30, &cli, || {
        let r = cli.running();
        r.len() == 3
            && r.iter()
                .any(|n| !before.contains(&n["node_id"].to_string()))
    });

    // A service that dies is restarted by the supervisor.
    let ctl = services
        .iter()
        .find(|s| s["service"] == "controller")
        .expect("controller");
    signal(ctl["pid"].as_u64().expect("pid"), "KILL");
    wait_for("controller restarted", 60, &cli, || {
        let s = cli.json(&["status", "--run", &cli.run]);
        s["services"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["service"] == "controller" && x["restarts"] == 1 && x["ready"] == true)
        })
    });

    cli.ok(&[
        "reconfigure",
        "--run",
        &cli.run,
        "--domain",
        "sleeper",
        "preserve_n=5",
    ]);
    wait_for("5 RUNNING", 30, &cli, || cli.running().len() == 5);

    cli.ok(&["killrun", "--run", &cli.run]);
    assert!(live_workers(&cli.run).is_empty());
    assert!(
        queues_of(&cli.run).is_empty(),
        "queues left: {:?}",
        queues_of(&cli.run)
    );
}
