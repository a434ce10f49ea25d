//! Killing a run: `killrun` asks the provisioner to terminate everything, stops
//! the run's own processes, then terminates by the run's tag at the IaaS and waits
//! until nothing is left — checked at the IaaS, not only in the provisioner's
//! records.

use std::time::{Duration, Instant};

use epu_model::messages::{
    DescribeIaasReply, DescribeIaasRequest, DescribeNodesReply, DescribeNodesRequest,
    TerminateAllReply, TerminateAllRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::client::Client;
use crate::plan::PlanTransport;
use crate::rundir::{run_process_alive, user_error, RunRecord, RunState};

/// Exit code: killrun found instances or processes left.
pub const EXIT_LEFTOVERS: i32 = 5;
/// What phase 1 of `killrun` (through the provisioner) got done.
#[derive(Default)]
struct ProvisionerPhase {
    /// The provisioner answered `terminate_all`.
    answered: bool,
    /// Nodes it still listed as live when the phase ended.
    remaining: Vec<Value>,
    /// Why the phase ended early, if it did.
    note: Option<String>,
    /// The provisioner, disabled, asked every IaaS it drives and none listed an
    /// instance of the run alive.
    iaas_clean: bool,
}

/// Consecutive unanswered requests after which `killrun` stops asking the
/// provisioner and goes on to terminate by the run's tag.
const MAX_UNANSWERED: u32 = 3;
/// How long one request to the provisioner waits during `killrun`.
const KILLRUN_ASK: Duration = Duration::from_secs(5);

/// Phase 1: the provisioner disables itself and terminates every instance it knows;
/// poll until it lists none live, `deadline`, or it stops answering.
async fn through_provisioner(
    rec: &RunRecord,
    deadline: Instant,
    started: Instant,
) -> ProvisionerPhase {
    let mut out = ProvisionerPhase::default();
    let left = || deadline.saturating_duration_since(Instant::now());
    let c = match tokio::time::timeout(left(), Client::connect(rec)).await {
        Ok(Ok(c)) => c.with_timeout(KILLRUN_ASK.min(left())),
        Ok(Err(e)) => {
            out.note = Some(format!("cannot reach the run's services: {e:#}"));
            return out;
        }
        Err(_) => {
            out.note = Some("the connection to the run's services did not open in time".into());
            return out;
        }
    };
    let first: Result<TerminateAllReply, _> = c.ask(&TerminateAllRequest {}).await;
    match first {
        Ok(r) => {
            out.answered = true;
            eprintln!(
                "killrun {}: provisioner disabled, {} instance(s) to terminate",
                rec.run, r.remaining
            );
        }
        Err(e) => {
            out.note = Some(format!(
                "the provisioner did not answer terminate_all ({})",
                e.message
            ));
            c.close().await;
            return out;
        }
    }
    let mut last = usize::MAX;
    let mut unanswered = 0;
    loop {
        let req = DescribeNodesRequest {
            domain: None,
            node_ids: vec![],
            live_only: true,
            ..Default::default()
        };
        let reply: Result<DescribeNodesReply, _> = c.ask(&req).await;
        match reply {
            Ok(r) => {
                unanswered = 0;
                let n = r.nodes.len();
                if n != last {
                    eprintln!(
                        "killrun {}: {n} instance(s) remaining ({:.1}s)",
                        rec.run,
                        started.elapsed().as_secs_f64()
                    );
                }
                last = n;
                out.remaining = r
                    .nodes
                    .iter()
                    .map(|r| json!({"node_id": r.node_id, "state": r.state, "iaas_id": r.iaas_id}))
                    .collect();
                if n == 0 {
                    break;
                }
            }
            Err(e) => {
                unanswered += 1;
                if unanswered >= MAX_UNANSWERED {
                    out.note = Some(format!(
                        "the provisioner stopped answering ({} requests in a row: {})",
                        unanswered, e.message
                    ));
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            out.note = Some(format!(
                "the provisioner still listed {} live instance(s) when its share of the deadline ran out",
                out.remaining.len()
            ));
            break;
        }
        crate::deadline::waiting_for(format!(
            "the provisioner to terminate {} instance(s)",
            out.remaining.len()
        ));
        tokio::time::sleep(Duration::from_millis(300).min(left())).await;
    }
    if out.remaining.is_empty() && out.note.is_none() {
        // Asked at the IaaS by the provisioner itself, with its credentials. It is
        // disabled now: nothing can be launched after this answer.
        let r: Result<DescribeIaasReply, _> = c.ask(&DescribeIaasRequest {}).await;
        out.iaas_clean =
            r.is_ok_and(|r| r.errors.is_empty() && r.instances.iter().all(|i| !i.alive));
    }
    c.close().await;
    out
}

/// Stops the processes of the run that are still alive: the supervisor first (it
/// stops its services), then any service it left (a service outlives a supervisor
/// killed with SIGKILL). SIGTERM, then SIGKILL after `grace`. Returns the PIDs of
/// the run's processes still alive.
async fn stop_run_processes(rec: &RunRecord, grace: Duration) -> Vec<u32> {
    let dir = &rec.run_dir;
    let mut pids: Vec<u32> = rec.supervisor_pid.into_iter().collect();
    pids.extend(rec.services.iter().filter_map(|s| s.pid));
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != std::process::id() && run_process_alive(*p, dir));
    if pids.is_empty() {
        return pids;
    }
    crate::deadline::waiting_for(format!("the run's processes {pids:?} to exit"));
    // The supervisor first: it stops its services in order.
    if let Some(sup) = rec.supervisor_pid.filter(|p| pids.contains(p)) {
        let _ = kill(Pid::from_raw(sup as i32), Signal::SIGTERM);
        let until = Instant::now() + grace;
        while run_process_alive(sup, dir) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Services the supervisor did not stop (it was dead, or did not answer SIGTERM)
    // get their own SIGTERM and grace; a supervisor that ignored its SIGTERM gets
    // no second one.
    let services: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| Some(*p) != rec.supervisor_pid && run_process_alive(*p, dir))
        .collect();
    for p in &services {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
    }
    let until = Instant::now() + grace;
    while services.iter().any(|p| run_process_alive(*p, dir)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in pids.iter().filter(|p| run_process_alive(**p, dir)) {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
    }
    let until = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| run_process_alive(*p, dir)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pids.retain(|p| run_process_alive(*p, dir));
    pids
}

/// How long a worker or service has between SIGTERM and SIGKILL during `killrun`.
const KILLRUN_GRACE: Duration = Duration::from_secs(5);

/// Tears the run down and checks, at the IaaS, that nothing of it is left.
///
/// 1. If the supervisor lives: the provisioner terminates everything it knows
///    (bounded; an unanswering provisioner is reported, not retried forever).
/// 2. The run's own processes (supervisor, services) are stopped, so nothing can
///    start a worker behind our back.
/// 3. Every instance carrying the run's tag is terminated at the IaaS itself,
///    from the run directory alone, and the IaaS is asked again until it lists
///    none alive. This runs whether or not phase 1 worked.
///
/// Exit 0 only when the IaaS lists nothing alive and no process of the run lives.
pub async fn killrun(rec: &RunRecord, limit: Duration, as_json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    // Leave room to report before the command's own deadline.
    let margin = (limit / 10).clamp(Duration::from_millis(500), Duration::from_secs(15));
    let deadline = started + limit.saturating_sub(margin);
    let mut notes: Vec<String> = Vec::new();

    let phase1 = if rec.supervisor_alive() {
        let p = through_provisioner(rec, started + limit.mul_f64(0.5), started).await;
        if let Some(n) = &p.note {
            eprintln!(
                "killrun {}: {n}; terminating by the run's tag instead",
                rec.run
            );
            notes.push(n.clone());
        }
        p
    } else {
        let n = "the run's supervisor is not running; terminating by the run's tag".to_string();
        eprintln!("killrun {}: {n}", rec.run);
        notes.push(n);
        ProvisionerPhase::default()
    };
    let phase1_secs = started.elapsed().as_secs_f64();

    let procs_left = stop_run_processes(rec, KILLRUN_GRACE).await;
    let services_secs = started.elapsed().as_secs_f64() - phase1_secs;

    crate::deadline::waiting_for("the IaaS to list the run's instances");
    let tag_started = Instant::now();
    let mut tag = crate::teardown::terminate_by_tag(rec, deadline, KILLRUN_GRACE).await;
    let tag_secs = tag_started.elapsed().as_secs_f64();
    if phase1.iaas_clean {
        // An IaaS we could not ask ourselves (no credentials in this shell) was asked
        // by the disabled provisioner a moment ago and listed nothing alive.
        let before = tag.left.len();
        tag.left.retain(|v| v.get("error").is_none());
        if tag.left.len() < before {
            notes.push(
                "EC2 could not be asked from here (give killrun the AWS environment the run was launched with); the disabled provisioner's own check found nothing alive".into(),
            );
        }
    }
    if tag.local_groups > 0 || tag.ec2_terminated > 0 {
        eprintln!(
            "killrun {}: by the run's tag: {} local worker group(s) signalled, {} EC2 instance(s) terminated",
            rec.run, tag.local_groups, tag.ec2_terminated
        );
    }

    if rec.transport == PlanTransport::Amqp {
        crate::deadline::waiting_for("the broker to delete the run's queues");
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left.max(Duration::from_secs(1)), purge_topology(rec))
            .await
            .is_err()
        {
            notes.push("the run's queues could not be deleted in time (left on the broker)".into());
        }
    }
    let mut rec2 = RunRecord::load(&rec.run_dir).unwrap_or_else(|_| rec.clone());
    rec2.state = RunState::Stopped;
    rec2.message = Some("killed by killrun".into());
    let _ = rec2.save();

    // Phase 1's own list is only informative once phase 3 has checked the IaaS.
    let clean = tag.left.is_empty() && procs_left.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "run": rec.run,
                "clean": clean,
                "provisioner_answered": phase1.answered,
                "remaining_nodes": phase1.remaining,
                "iaas_instances_left": tag.left,
                "processes_alive": procs_left,
                "local_groups_signalled": tag.local_groups,
                "ec2_terminated_by_tag": tag.ec2_terminated,
                "notes": notes,
                "seconds": seconds,
                "phase_seconds": {"provisioner": phase1_secs, "processes": services_secs, "by_tag": tag_secs},
            }))?
        );
    } else if clean {
        println!(
            "run {} killed: the IaaS lists no instance of it and no process of it is alive ({seconds:.1}s)",
            rec.run
        );
    }
    if clean {
        return Ok(());
    }
    let mut msg = format!("run {} left things behind:", rec.run);
    for i in &tag.left {
        msg.push_str(&format!("\n  {i}"));
    }
    for p in &procs_left {
        msg.push_str(&format!("\n  process {p} of the run still alive"));
    }
    msg.push_str("\nrun `epumgmt killrun` again, or terminate these by hand");
    Err(user_error(EXIT_LEFTOVERS, msg))
}

/// Deletes the run's queues and exchange from the broker.
async fn purge_topology(rec: &RunRecord) {
    let Ok(run) = epu_core::wire::RunName::new(&rec.run) else {
        return;
    };
    let url = rec.amqp_url.clone().unwrap_or_default();
    let opts = epu_core::bus::BusOptions::new("epumgmt");
    if let Ok(b) = epu_core::bus::amqp::AmqpBus::connect(&url, run, opts).await {
        let _ = b.delete_topology().await;
        b.close().await;
    }
}
