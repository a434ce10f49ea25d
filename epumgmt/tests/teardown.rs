//! Teardown that cannot lie, and workers that leave nothing behind:
//! - a worker's agent SIGKILLed alone takes its whole process group with it, whether
//!   the provisioner is up (it watches the leader) or down at that moment (it finds
//!   the leader dead when it adopts the worker after its restart);
//! - with the supervisor and every service SIGKILLed, `launch` of the same name
//!   refuses, listing the workers still running, and `killrun` terminates them by
//!   the run's tag from the run directory alone and exits 0 only when none is left.

mod common;

use std::time::Instant;

use common::{group_members, live_workers, pid_of, service_pids, signal, wait_for, Cli};
use serde_json::Value;

/// Every RUNNING node's agent has a live child in its group (the workload).
fn workloads_started(cli: &Cli, n: usize) -> bool {
    let r = cli.running();
    r.len() == n && r.iter().all(|x| group_members(pid_of(x)).len() >= 2)
}

/// Gone, or a zombie nobody has reaped yet.
fn dead(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

fn node_ids(nodes: &[Value]) -> Vec<String> {
    nodes.iter().map(|n| n["node_id"].to_string()).collect()
}

/// SIGKILLs the agent of one RUNNING node (its workload lives on in the group) and
/// returns the group id and the node ids running before.
fn kill_one_agent(cli: &Cli) -> (u64, Vec<String>) {
    let (pgid, before) = pick_victim(cli);
    signal(pgid, "KILL");
    (pgid, before)
}

/// The agent (group leader) of one RUNNING node, and the node ids running now.
fn pick_victim(cli: &Cli) -> (u64, Vec<String>) {
    let running = cli.running();
    let before = node_ids(&running);
    let pgid = pid_of(&running[0]);
    let members = group_members(pgid);
    assert!(
        members.len() >= 2,
        "the agent's group has its workload: {members:?}"
    );
    (pgid, before)
}

fn replaced_and_group_gone(cli: &Cli, pgid: u64, before: &[String]) -> bool {
    let r = cli.running();
    group_members(pgid).is_empty()
        && r.len() == 3
        && r.iter()
            .any(|n| !before.contains(&n["node_id"].to_string()))
}

#[test]
fn an_agent_killed_alone_takes_its_group_while_the_provisioner_is_up() {
    let cli = Cli::new("orphan-up");
    cli.launch("examples/sleeper/plan.toml");
    wait_for("3 RUNNING with workloads", 30, &cli, || {
        workloads_started(&cli, 3)
    });
    let (pgid, before) = kill_one_agent(&cli);
    wait_for(
        "the killed agent's group empty and the domain back at 3",
        30,
        &cli,
        || replaced_and_group_gone(&cli, pgid, &before),
    );
    cli.ok(&["killrun", "--run", &cli.run]);
    assert!(live_workers(&cli.run).is_empty());
}

#[test]
fn an_agent_killed_while_the_provisioner_is_down_takes_its_group_after_the_restart() {
    let cli = Cli::new("orphan-down");
    cli.launch("examples/sleeper/plan-amqp.toml");
    wait_for("3 RUNNING with workloads", 30, &cli, || {
        workloads_started(&cli, 3)
    });
    let status = cli.json(&["status", "--run", &cli.run]);
    let prov = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["service"] == "provisioner"))
        .and_then(|x| x["pid"].as_u64())
        .unwrap_or_else(|| panic!("no provisioner pid: {status}"));
    // Chosen while the provisioner can still answer `inspect nodes`.
    let (pgid, before) = pick_victim(&cli);
    signal(prov, "KILL");
    wait_for("the provisioner dead", 10, &cli, || dead(prov));
    // The supervisor waits its backoff (500 ms) before it starts the provisioner again.
    signal(pgid, "KILL");
    wait_for("the provisioner restarted", 60, &cli, || {
        let s = cli.json(&["status", "--run", &cli.run]);
        s["services"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["service"] == "provisioner" && x["restarts"] == 1 && x["ready"] == true)
        })
    });
    wait_for(
        "the killed agent's group empty and the domain back at 3",
        60,
        &cli,
        || replaced_and_group_gone(&cli, pgid, &before),
    );
    // It was the restarted provisioner, adopting the dead leader, that killed the rest.
    let victim = cli
        .nodes()
        .into_iter()
        .find(|n| pid_of(n) == pgid)
        .unwrap_or_else(|| panic!("no node for pid {pgid}"));
    let text = victim.to_string();
    assert!(
        text.contains("while the provisioner was down") && text.contains("leftover process"),
        "{victim}"
    );
    cli.ok(&["killrun", "--run", &cli.run]);
    assert!(live_workers(&cli.run).is_empty());
}

#[test]
fn killrun_after_every_process_of_the_run_was_sigkilled_leaves_nothing() {
    let cli = Cli::new("killall");
    let plan = common::repo().join("examples/sleeper/plan-amqp.toml");
    let plan = plan.to_str().expect("utf8");
    cli.launch("examples/sleeper/plan-amqp.toml");
    wait_for("3 RUNNING with workloads", 30, &cli, || {
        workloads_started(&cli, 3)
    });
    let (sup, services) = service_pids(&cli);
    assert_eq!(services.len(), 3, "three service processes");
    signal(sup, "KILL");
    for p in &services {
        signal(*p, "KILL");
    }
    wait_for("supervisor and services dead", 10, &cli, || {
        dead(sup) && services.iter().all(|p| dead(*p))
    });
    let workers = live_workers(&cli.run);
    assert!(
        workers.len() >= 6,
        "the workers outlive their services: {workers:?}"
    );

    // The name is not reused while its workers run.
    let again = cli.out(&["launch", plan, "--run", &cli.run]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(5), "launch refuses: {err}");
    assert!(err.contains("killrun"), "it says what to do: {err}");
    assert!(err.contains("\"pgid\""), "it lists the workers: {err}");
    assert!(
        !live_workers(&cli.run).is_empty(),
        "a refused launch touches nothing"
    );

    let t = Instant::now();
    let out = cli.json(&["killrun", "--run", &cli.run]);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("killrun with every service dead: {secs:.2} s: {out}");
    assert_eq!(out["clean"], true, "{out}");
    assert_eq!(out["provisioner_answered"], false, "{out}");
    assert!(
        out["local_groups_signalled"].as_u64().unwrap_or(0) >= 3,
        "{out}"
    );
    common::assert_nothing_left(&cli);

    // Now the name is free again.
    cli.launch("examples/sleeper/plan-amqp.toml");
    wait_for("3 RUNNING again", 30, &cli, || cli.running().len() == 3);
    cli.ok(&["killrun", "--run", &cli.run]);
    assert!(live_workers(&cli.run).is_empty());
}
