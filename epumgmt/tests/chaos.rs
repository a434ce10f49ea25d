//! The chaos suite: faults injected into sleeper runs over RabbitMQ, and the
//! invariants checked after each.
//!
//! Every trial launches its own run (random name, the sleeper domain: 3 local
//! workers under the n-preserving engine, the three services as processes under the
//! run's supervisor), waits for it to converge, injects one fault, and checks:
//! (a) the domain converges again within [`CONVERGE_BOUND`] (RUNNING and OK nodes
//! = the policy's size, each with its worker's process group alive, the controller
//! showing the same, every service ready), measured from the fault; (b) after that,
//! for [`HOLD_MIN`] and [`HOLD_DECISIONS`] further decisions, the live process
//! groups carrying `EPU_RUN=<run>` match the live node records one to one (no
//! duplicate, nothing unmanaged); (c) after `killrun` nothing of the run is left
//! (workers, processes, queues).
//!
//! The faults ([`Kind`]): SIGKILL of each service at a random moment (steady, mid
//! replacement of a worker, mid scale-up); the one-shot failpoints
//! (`EPU_FAILPOINTS_DIR`) in the controller's and the provisioner's launch windows;
//! SIGKILL of a worker's agent; termination of a worker's whole process group from
//! outside; a broker outage longer than `publish_timeout` (a proxy between the run
//! and the broker, which the services, the workers' agents and the CLI all go
//! through) with a worker dying during it — once longer than the domain's missing
//! timeout, once shorter (the domain's missing timeout raised to 30 s), so that
//! only the lost `instance_info` tells the controller about the death; a domain
//! added at runtime whose command the provisioner refuses (refused at `add_domain`;
//! and, added while allowed, refused at provision time after the operator took the
//! command out of the provisioner's `allowed_commands`).
//!
//! `chaos_short` runs in `cargo test --workspace` (a few trials per fault, three
//! runs at a time) and asserts every trial converged with no duplicate, leak or
//! leftover. `chaos_long` (ignored; `scripts/chaos.sh`) runs `EPU_CHAOS_TRIALS`
//! (default 20) per fault and prints the same table; it fails if any trial did.
//! Both take `EPU_CHAOS_PARALLEL` (runs at a time, default 3), `EPU_CHAOS_SEED`
//! (replays the random choices), `EPU_CHAOS_KINDS` (a comma-separated subset, by
//! the end of the run-name tag or part of the name: `kprov,fpiaas,outage`) and
//! `EPU_CHAOS_VERBOSE=1` (print each trial's last look), `EPU_CHAOS_KEEP_LOGS=1`
//! (keep every trial's logs, not only a failed one's) and `EPU_CHAOS_BOUND_SECS`
//! (another convergence bound, to watch whether a trial ever converges).
//! The logs of a failed trial are kept in `target/tmp/chaos/<run>/`.

#[path = "common/chaos.rs"]
mod chaos_kit;
mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos_kit::{
    add_domain, cli_ok, converge_and_hold, evidence, kill_group, log_events, log_lines, nodes,
    require_broker, save_logs, service_of, set_allowed_commands, status, table, teardown,
    wait_converged, write_plan, Converged, Expect, Node, NotConverged, Outcome, PlanOpts, Proxy,
    Rng, CONVERGE_BOUND,
};
use common::{run_with_deadline, signal, Cli, LONG_LIMIT};
use serde_json::{json, Value};

/// The faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KillProvisioner,
    KillController,
    KillAggregator,
    FpControllerAfterStore,
    FpProvisionerAfterStore,
    FpProvisionerAfterIaas,
    KillWorker,
    ExternalTermination,
    BrokerOutage,
    BrokerOutageShort,
    RefusedDomain,
}

impl Kind {
    const ALL: [Kind; 11] = [
        Kind::KillProvisioner,
        Kind::KillController,
        Kind::KillAggregator,
        Kind::FpControllerAfterStore,
        Kind::FpProvisionerAfterStore,
        Kind::FpProvisionerAfterIaas,
        Kind::KillWorker,
        Kind::ExternalTermination,
        Kind::BrokerOutage,
        Kind::BrokerOutageShort,
        Kind::RefusedDomain,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::KillProvisioner => "sigkill provisioner",
            Kind::KillController => "sigkill controller",
            Kind::KillAggregator => "sigkill sensor-aggregator",
            Kind::FpControllerAfterStore => "fp controller_after_store_before_send",
            Kind::FpProvisionerAfterStore => "fp provisioner_after_store_before_iaas",
            Kind::FpProvisionerAfterIaas => "fp provisioner_after_iaas_before_store",
            Kind::KillWorker => "sigkill worker agent",
            Kind::ExternalTermination => "external termination (group)",
            Kind::BrokerOutage => "broker outage > missing + worker death",
            Kind::BrokerOutageShort => "broker outage < missing + worker death",
            Kind::RefusedDomain => "refused provision (runtime domain)",
        }
    }

    /// The part of the run name that says the fault.
    fn tag(self) -> &'static str {
        match self {
            Kind::KillProvisioner => "cx-kprov",
            Kind::KillController => "cx-kctl",
            Kind::KillAggregator => "cx-kagg",
            Kind::FpControllerAfterStore => "cx-fpctl",
            Kind::FpProvisionerAfterStore => "cx-fpstore",
            Kind::FpProvisionerAfterIaas => "cx-fpiaas",
            Kind::KillWorker => "cx-kwork",
            Kind::ExternalTermination => "cx-ext",
            Kind::BrokerOutage => "cx-outage",
            Kind::BrokerOutageShort => "cx-shortout",
            Kind::RefusedDomain => "cx-refused",
        }
    }

    /// The service a SIGKILL or failpoint trial crashes, by its name in `status`.
    fn service(self) -> Option<&'static str> {
        match self {
            Kind::KillProvisioner
            | Kind::FpProvisionerAfterStore
            | Kind::FpProvisionerAfterIaas => Some("provisioner"),
            Kind::KillController | Kind::FpControllerAfterStore => Some("controller"),
            Kind::KillAggregator => Some("sensor-aggregator"),
            _ => None,
        }
    }

    fn failpoint(self) -> Option<&'static str> {
        match self {
            Kind::FpControllerAfterStore => Some("controller_after_store_before_send"),
            Kind::FpProvisionerAfterStore => Some("provisioner_after_store_before_iaas"),
            Kind::FpProvisionerAfterIaas => Some("provisioner_after_iaas_before_store"),
            _ => None,
        }
    }

    /// Trials of this kind in the short form.
    fn short_trials(self) -> usize {
        match self {
            Kind::KillProvisioner | Kind::KillController | Kind::KillAggregator => 2,
            Kind::KillWorker => 2,
            _ => 1,
        }
    }
}

/// The sleeper's size (examples/sleeper/domain.toml) and the size a scale-up asks.
const SIZE: usize = 3;
const SCALED: usize = 4;
/// How long the broker is away: always longer than the `publish_timeout_secs` the
/// outage trials set ([`OUTAGE_PUBLISH_TIMEOUT`]); the long outage also longer than
/// the sleeper's missing timeout (4 s), the short one shorter than the missing
/// timeout its trial sets ([`SHORT_OUTAGE_MISSING_SECS`]).
const OUTAGE_MS: (u64, u64) = (6_000, 9_000);
const SHORT_OUTAGE_MS: (u64, u64) = (3_800, 4_800);
const OUTAGE_PUBLISH_TIMEOUT: u64 = 2;
const SHORT_OUTAGE_MISSING_SECS: f64 = 30.0;
/// When, into the outage, the worker dies: early enough that the provisioner's
/// `instance_info` about it times out (publish timeout) before the broker is back.
const DEATH_MS: (u64, u64) = (300, 1_500);
const SHORT_DEATH_MS: (u64, u64) = (300, 800);

/// One trial's run and what it is given.
struct Trial<'a> {
    cli: &'a Cli,
    rng: Rng,
    failpoints: PathBuf,
    proxy: Option<&'a Proxy>,
}

/// What a fault did: when, what it was, and what the run must look like after.
struct Fault {
    t0: Instant,
    variant: String,
    expect: Expect,
    /// When the fault ended (an outage), if later than `t0`.
    ended: Option<Instant>,
    /// The worker it killed, if any.
    victim: Option<String>,
    /// Nodes of the sleeper domain it calls for launching (a replacement, a
    /// scale-up).
    launches: usize,
}

type Check = Box<dyn FnMut(&Value, &[Node]) -> Vec<String>>;

fn running_nodes(cli: &Cli) -> Result<Vec<Node>, String> {
    Ok(nodes(cli)?.into_iter().filter(Node::healthy).collect())
}

/// A random RUNNING worker: its node id and pgid (the agent's PID).
fn victim(t: &mut Trial<'_>) -> Result<(String, u64), String> {
    let running = running_nodes(t.cli)?;
    let n = t
        .rng
        .pick(&running)
        .ok_or_else(|| "no RUNNING worker to pick".to_string())?;
    let pgid = n
        .pgid()
        .ok_or_else(|| format!("RUNNING node {} has no PID: {:?}", n.node_id, n.iaas_id))?;
    Ok((n.node_id.clone(), pgid))
}

fn reconfigure(cli: &Cli, n: usize) -> Result<(), String> {
    cli_ok(
        cli,
        &[
            "reconfigure",
            "--run",
            &cli.run,
            "--domain",
            "sleeper",
            &format!("preserve_n={n}"),
        ],
        Duration::from_secs(45),
    )
    .map(|_| ())
}

/// A check that the service `name` was restarted (more restarts than `before`,
/// another pid) and is ready.
fn restarted(name: &'static str, pid: u64, before: u64) -> Check {
    Box::new(move |status: &Value, _: &[Node]| {
        match service_of(status, name) {
        Some((p, r, true)) if r > before && p != pid => vec![],
        other => vec![format!(
            "{name} not restarted yet (pid, restarts, ready) = {other:?}; before: pid {pid}, {before} restarts"
        )],
    }
    })
}

fn both(mut a: Check, mut b: Check) -> Check {
    Box::new(move |s: &Value, n: &[Node]| {
        let mut v = a(s, n);
        v.extend(b(s, n));
        v
    })
}

/// SIGKILL of a service at a random moment.
fn kill_service(t: &mut Trial<'_>, name: &'static str) -> Result<(Fault, Check), String> {
    let st = status(t.cli)?;
    let (pid, restarts, _) =
        service_of(&st, name).ok_or_else(|| format!("no {name} in the status: {st}"))?;
    let moment = *t
        .rng
        .pick(&["steady", "mid-replacement", "mid-scale-up"])
        .unwrap_or(&"steady");
    let mut size = SIZE;
    let mut killed = None;
    let (t0, variant) = match moment {
        "mid-replacement" => {
            let (id, agent) = victim(t)?;
            killed = Some(id);
            let lag = t.rng.millis(0, 1_500);
            let t0 = Instant::now();
            signal(agent, "KILL");
            std::thread::sleep(lag);
            signal(pid, "KILL");
            (t0, format!("mid-replacement +{}ms", lag.as_millis()))
        }
        "mid-scale-up" => {
            let lag = t.rng.millis(0, 1_000);
            let t0 = Instant::now();
            reconfigure(t.cli, SCALED)?;
            size = SCALED;
            std::thread::sleep(lag);
            signal(pid, "KILL");
            (t0, format!("mid-scale-up +{}ms", lag.as_millis()))
        }
        _ => {
            let lag = t.rng.millis(0, 2_000);
            std::thread::sleep(lag);
            let t0 = Instant::now();
            signal(pid, "KILL");
            (t0, format!("steady +{}ms", lag.as_millis()))
        }
    };
    Ok((
        Fault {
            t0,
            variant,
            expect: Expect::sleeper(size),
            ended: None,
            launches: usize::from(killed.is_some()) + (size - SIZE),
            victim: killed,
        },
        restarted(name, pid, restarts),
    ))
}

/// Arms a failpoint and causes a launch (a scale-up or a worker's death).
fn failpoint(
    t: &mut Trial<'_>,
    fp: &'static str,
    name: &'static str,
) -> Result<(Fault, Check), String> {
    let st = status(t.cli)?;
    let (pid, restarts, _) =
        service_of(&st, name).ok_or_else(|| format!("no {name} in the status: {st}"))?;
    let file = t.failpoints.join(fp);
    std::fs::write(&file, b"").map_err(|e| format!("cannot arm {}: {e}", file.display()))?;
    let cause = *t.rng.pick(&["scale-up", "replace"]).unwrap_or(&"replace");
    let t0 = Instant::now();
    let mut killed = None;
    let size = if cause == "scale-up" {
        reconfigure(t.cli, SCALED)?;
        SCALED
    } else {
        let (id, agent) = victim(t)?;
        signal(agent, "KILL");
        killed = Some(id);
        SIZE
    };
    let reached: Check = Box::new(move |_: &Value, _: &[Node]| {
        if file.exists() {
            vec![format!(
                "failpoint {fp} not reached (its file is still there)"
            )]
        } else {
            vec![]
        }
    });
    Ok((
        Fault {
            t0,
            variant: cause.to_string(),
            expect: Expect::sleeper(size),
            ended: None,
            victim: killed,
            launches: 1,
        },
        both(reached, restarted(name, pid, restarts)),
    ))
}

fn no_check() -> Check {
    Box::new(|_: &Value, _: &[Node]| Vec::new())
}

fn kill_worker(t: &mut Trial<'_>, whole_group: bool) -> Result<(Fault, Check), String> {
    let (id, pgid) = victim(t)?;
    let lag = t.rng.millis(0, 1_000);
    std::thread::sleep(lag);
    let t0 = Instant::now();
    if whole_group {
        kill_group(pgid)?;
    } else {
        signal(pgid, "KILL");
    }
    Ok((
        Fault {
            t0,
            variant: format!("+{}ms", lag.as_millis()),
            expect: Expect::sleeper(SIZE),
            ended: None,
            victim: Some(id),
            launches: 1,
        },
        no_check(),
    ))
}

fn broker_outage(t: &mut Trial<'_>, short: bool) -> Result<(Fault, Check), String> {
    let proxy = t.proxy.ok_or("the outage trial runs behind a proxy")?;
    let (id, agent) = victim(t)?;
    let ((o_lo, o_hi), (d_lo, d_hi)) = if short {
        (SHORT_OUTAGE_MS, SHORT_DEATH_MS)
    } else {
        (OUTAGE_MS, DEATH_MS)
    };
    let outage = t.rng.millis(o_lo, o_hi);
    let death = t.rng.millis(d_lo, d_hi);
    let t0 = Instant::now();
    let cut = proxy.cut();
    std::thread::sleep(death);
    signal(agent, "KILL");
    // The fault lasts this long; the run is looked at again once it is over.
    std::thread::sleep(outage.saturating_sub(t0.elapsed()));
    proxy.restore()?;
    let ended = Instant::now();
    Ok((
        Fault {
            t0,
            variant: format!(
                "{:.1}s outage, {cut} conns cut, worker killed +{}ms",
                outage.as_secs_f64(),
                death.as_millis()
            ),
            expect: Expect::sleeper(SIZE),
            ended: Some(ended),
            victim: Some(id),
            launches: 1,
        },
        no_check(),
    ))
}

/// A refused provision, both ways a domain added at runtime meets one:
/// (A) `add_domain` of a deployable the provisioner refuses (a command not in its
/// `allowed_commands`) is refused at once, naming the key, and nothing runs for it;
/// (B) a domain added while its command was allowed (at size 0), after the operator
/// took the command out of the provisioner's `allowed_commands` and restarted it,
/// is grown to 2: its nodes turn REJECTED with REQUEST_REFUSED and nothing runs for
/// it. The sleeper keeps its very nodes throughout. The fault (and the clock) is the
/// grow in (B).
fn refused_domain(t: &mut Trial<'_>) -> Result<(Fault, Check), String> {
    let before: BTreeSet<String> = running_nodes(t.cli)?
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    let policy = |name: &str, n: u64| {
        json!({
            "name": name,
            "engine": "npreserving",
            "engine_conf": {"preserve_n": n},
            "deployable": {"driver": "local", "command": "sleep", "args": ["60"]},
        })
    };
    let mut forbidden = vec!["refused".to_string()];
    // (A) `sleep` is not allowed yet... (the plan allows `epu-agent` and `true`)
    let at_add = match add_domain(t.cli, policy("refused-at-add", 2)) {
        Err(e) if e.contains("allowed_commands") => "refused at add_domain".to_string(),
        Err(e) => {
            return Err(format!(
                "add_domain of a refused command failed otherwise: {e}"
            ))
        }
        Ok(_) => {
            // A controller that does not ask the provisioner first: its nodes must
            // turn REJECTED at provision time instead.
            forbidden.push("refused-at-add".to_string());
            "accepted at add_domain".to_string()
        }
    };
    // (B) ...then allowed, the domain added at size 0, and taken out again.
    set_allowed_commands(t.cli, &["epu-agent", "true", "sleep"])?;
    restart_provisioner(t.cli)?;
    add_domain(t.cli, policy("refused", 0)).map_err(|e| format!("add_domain at size 0: {e}"))?;
    set_allowed_commands(t.cli, &["epu-agent", "true"])?;
    let (pid, restarts) = restart_provisioner(t.cli)?;
    let t0 = Instant::now();
    cli_ok(
        t.cli,
        &[
            "reconfigure",
            "--run",
            &t.cli.run,
            "--domain",
            "refused",
            "preserve_n=2",
        ],
        Duration::from_secs(45),
    )?;
    let watched = forbidden.clone();
    let refused_check: Check = Box::new(move |_: &Value, nodes: &[Node]| {
        let mut p = Vec::new();
        let sleeper: BTreeSet<String> = nodes
            .iter()
            .filter(|n| n.domain == "sleeper" && n.healthy())
            .map(|n| n.node_id.clone())
            .collect();
        if sleeper != before {
            p.push(format!(
                "the sleeper domain changed: RUNNING {sleeper:?}, before the refused domain {before:?}"
            ));
        }
        for domain in &watched {
            let of: Vec<&Node> = nodes.iter().filter(|n| &n.domain == domain).collect();
            let rejected = of
                .iter()
                .filter(|n| n.state == "REJECTED" && n.reason.as_deref() == Some("REQUEST_REFUSED"))
                .count();
            if rejected < 2 {
                p.push(format!(
                    "domain {domain}: {rejected} nodes REJECTED with REQUEST_REFUSED, want 2; its nodes: {:?}",
                    of.iter()
                        .map(|n| format!("{} {} {:?}", n.node_id, n.state, n.reason))
                        .collect::<Vec<_>>()
                ));
            }
            for n in of.iter().filter(|n| n.state == "REJECTED") {
                if n.reason.as_deref() != Some("REQUEST_REFUSED") {
                    p.push(format!(
                        "node {} REJECTED with reason {:?}",
                        n.node_id, n.reason
                    ));
                }
            }
        }
        p
    });
    let mut expect = Expect::sleeper(SIZE);
    expect.forbidden.extend(forbidden);
    expect.forbidden.insert("refused-at-add".to_string());
    Ok((
        Fault {
            t0,
            variant: format!("{at_add}; sleep refused after a restart"),
            expect,
            ended: None,
            victim: None,
            launches: 0,
        },
        both(refused_check, restarted_since("provisioner", pid, restarts)),
    ))
}

/// A check that the service `name` is still the one started as `pid` with
/// `restarts` restarts, and ready (nothing crashed it since).
fn restarted_since(name: &'static str, pid: u64, restarts: u64) -> Check {
    Box::new(move |status: &Value, _: &[Node]| {
        match service_of(status, name) {
        Some((p, r, true)) if r == restarts && p == pid => vec![],
        other => vec![format!(
            "{name} is not the one restarted with the new allowed_commands (pid {pid}, {restarts} restarts): (pid, restarts, ready) = {other:?}"
        )],
    }
    })
}

/// SIGKILLs the provisioner and waits (60 s at most) for the supervisor to have
/// started it again and for it to be ready; its new (pid, restarts).
fn restart_provisioner(cli: &Cli) -> Result<(u64, u64), String> {
    let st = status(cli)?;
    let (pid, restarts, _) = service_of(&st, "provisioner")
        .ok_or_else(|| format!("no provisioner in the status: {st}"))?;
    signal(pid, "KILL");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(st) = status(cli) {
            last = service_of(&st, "provisioner");
            if let Some((p, r, true)) = last {
                if r > restarts && p != pid {
                    return Ok((p, r));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!(
        "the provisioner (pid {pid}, {restarts} restarts) was not restarted and ready within 60 s; last seen (pid, restarts, ready) = {last:?}"
    ))
}

/// Launches the trial's run with the failpoint directory in its environment.
fn launch(
    cli: &Cli,
    plan: &std::path::Path,
    failpoints: &std::path::Path,
    proxied: bool,
) -> Result<(), String> {
    let plan = plan.to_str().ok_or("plan path is not UTF-8")?;
    let mut cmd = cli.cmd(&["launch", plan, "--run", &cli.run]);
    cmd.env("EPU_FAILPOINTS_DIR", failpoints);
    if proxied {
        // The plan's broker URL and secret must win.
        cmd.env_remove("EPU_AMQP_URL").env_remove("EPU_SECRET");
    }
    let o = run_with_deadline(&mut cmd, LONG_LIMIT).map_err(|e| e.to_string())?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() || out.trim() != cli.run {
        return Err(format!(
            "launch exited {}: {}{}",
            o.status,
            out.trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

/// One trial, start to end; everything that goes wrong lands in the outcome.
fn run_trial(kind: Kind, seed: u64, cli: &Cli, out: &mut Outcome) -> Result<(), String> {
    let proxy = match kind {
        Kind::BrokerOutage | Kind::BrokerOutageShort => Some(Proxy::start()?),
        _ => None,
    };
    let opts = PlanOpts {
        amqp_url: proxy.as_ref().map(Proxy::url),
        publish_timeout_secs: proxy.as_ref().map(|_| OUTAGE_PUBLISH_TIMEOUT),
        allowed_commands: (kind == Kind::RefusedDomain)
            .then(|| vec!["epu-agent".to_string(), "true".to_string()]),
        missing_timeout_secs: (kind == Kind::BrokerOutageShort)
            .then_some(SHORT_OUTAGE_MISSING_SECS),
    };
    let failpoints = cli.home.path().join("failpoints");
    std::fs::create_dir_all(&failpoints).map_err(|e| format!("failpoints dir: {e}"))?;
    let plan = write_plan(cli.home.path(), &cli.run, &opts)?;
    launch(cli, &plan, &failpoints, proxy.is_some())?;
    let initial = wait_converged(cli, &Expect::sleeper(SIZE), CONVERGE_BOUND)?;
    let before: BTreeSet<String> = initial.nodes.iter().map(|n| n.node_id.clone()).collect();
    let running_before: Vec<String> = initial
        .nodes
        .iter()
        .filter(|n| n.healthy())
        .map(|n| n.node_id.clone())
        .collect();

    let mut t = Trial {
        cli,
        rng: Rng::new(seed),
        failpoints,
        proxy: proxy.as_ref(),
    };
    let wall_t0 = chrono::Utc::now();
    let (fault, mut check) = match kind {
        Kind::KillProvisioner | Kind::KillController | Kind::KillAggregator => {
            kill_service(&mut t, kind.service().unwrap_or_default())?
        }
        Kind::FpControllerAfterStore
        | Kind::FpProvisionerAfterStore
        | Kind::FpProvisionerAfterIaas => failpoint(
            &mut t,
            kind.failpoint().unwrap_or_default(),
            kind.service().unwrap_or_default(),
        )?,
        Kind::KillWorker => kill_worker(&mut t, false)?,
        Kind::ExternalTermination => kill_worker(&mut t, true)?,
        Kind::BrokerOutage => broker_outage(&mut t, false)?,
        Kind::BrokerOutageShort => broker_outage(&mut t, true)?,
        Kind::RefusedDomain => refused_domain(&mut t)?,
    };
    out.variant = fault.variant.clone();
    let result = converge_and_hold(cli, &fault.expect, fault.t0, bound(), &mut *check);
    let (conv, failure) = match result {
        Ok(c) => (c, None),
        Err(NotConverged {
            what,
            last,
            flaps,
            duplicates,
            leaks,
            seen,
        }) => {
            let mut e = format!("{what}\n");
            if let Some(l) = last {
                e.push_str(&l.render());
            }
            (
                Converged {
                    secs: 0.0,
                    flaps,
                    duplicates,
                    leaks,
                    last: String::new(),
                    seen,
                },
                Some(e),
            )
        }
    };
    out.converged = failure.is_none();
    if out.converged {
        out.secs = Some(conv.secs);
        out.secs_after = fault
            .ended
            .map(|e| (conv.secs - e.duration_since(fault.t0).as_secs_f64()).max(0.0));
    }
    out.flaps = conv.flaps;
    // Churn: sleeper nodes launched after the fault, and workers other than the
    // victim that did not survive it.
    out.launched = conv
        .seen
        .iter()
        .filter(|(id, (d, _))| d == "sleeper" && !before.contains(*id))
        .count();
    out.launches_wanted = fault.launches;
    out.collateral = running_before
        .iter()
        .filter(|id| Some(*id) != fault.victim.as_ref())
        .filter_map(|id| match conv.seen.get(id) {
            Some((_, st)) if st == "RUNNING" => None,
            Some((_, st)) => Some(format!("{id} was RUNNING before the fault, then {st}")),
            None => Some(format!("{id} was RUNNING before the fault, then forgotten")),
        })
        .collect();
    out.last_look = conv.last;
    out.duplicates = conv.duplicates;
    out.leaks = conv.leaks;
    out.failure = failure;
    if let (true, Some(victim)) = (fault.ended.is_some(), &fault.victim) {
        // Was the victim's FAILED instance_info lost to the outage (publish timeout)?
        let dropped = log_lines(cli, "provisioner", wall_t0, &|v| {
            v["node_id"] == victim.as_str()
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cannot send instance_info"))
        });
        out.variant = format!(
            "{}, instance_info {}",
            out.variant,
            if dropped.is_empty() {
                "delivered"
            } else {
                "dropped"
            }
        );
    }
    if let (Some(fp), Some(svc)) = (kind.failpoint(), kind.service()) {
        // The failpoint fired where it says, after the fault began.
        let log = if svc == "controller" {
            "controller"
        } else {
            svc
        };
        let hits: Vec<_> = log_events(cli, log, "failpoint_reached", wall_t0)
            .into_iter()
            .filter(|(_, v)| v["failpoint"] == fp)
            .collect();
        match hits.first() {
            Some((at, _)) => {
                let after = (*at - wall_t0).as_seconds_f64();
                out.variant = format!("{}, fired +{after:.1}s", out.variant);
                if out.secs.is_some_and(|c| c < after) {
                    out.converged = false;
                    out.failure = Some(format!(
                        "converged {:.1} s after the fault, before the failpoint fired (+{after:.1} s): the checks missed the crash",
                        out.secs.unwrap_or_default()
                    ));
                }
            }
            None => {
                let why = format!("no failpoint_reached {fp} in {log}.jsonl after the fault");
                out.converged = false;
                out.failure = Some(match out.failure.take() {
                    Some(f) => format!("{f}\n{why}"),
                    None => why,
                });
            }
        }
    }
    if !out.ok() {
        out.evidence = evidence(cli, wall_t0, 30);
    }
    out.teardown_left = teardown(cli);
    drop(proxy);
    Ok(())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

fn trial(kind: Kind, seed: u64) -> Outcome {
    let started = Instant::now();
    let cli = Cli::new(kind.tag());
    let mut out = Outcome {
        kind: kind.name().to_string(),
        run: cli.run.clone(),
        ..Outcome::default()
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_trial(kind, seed, &cli, &mut out)
    }));
    let err = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(p) => Some(format!("panicked: {}", panic_text(&*p))),
    };
    if let Some(e) = err {
        out.converged = false;
        out.failure = Some(match out.failure.take() {
            Some(f) => format!("{f}\n{e}"),
            None => e,
        });
        if out.evidence.is_empty() {
            out.evidence = evidence(
                &cli,
                chrono::Utc::now() - chrono::TimeDelta::seconds(120),
                30,
            );
        }
        if out.teardown_left.is_empty() {
            out.teardown_left = teardown(&cli);
        }
    }
    if !out.ok() || std::env::var("EPU_CHAOS_KEEP_LOGS").is_ok_and(|v| v == "1") {
        out.logs = save_logs(&cli);
    }
    out.wall_secs = started.elapsed().as_secs_f64();
    out
}

/// The convergence bound: [`CONVERGE_BOUND`], or `EPU_CHAOS_BOUND_SECS` (to watch
/// longer whether a trial that does not converge ever does).
fn bound() -> Duration {
    env_usize("EPU_CHAOS_BOUND_SECS")
        .and_then(|s| u64::try_from(s).ok())
        .map_or(CONVERGE_BOUND, Duration::from_secs)
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `per_kind` trials of each fault, `EPU_CHAOS_PARALLEL` runs at a time; prints
/// the table and the failures; returns the outcomes.
fn suite(label: &str, per_kind: &dyn Fn(Kind) -> usize) -> (Vec<Outcome>, String) {
    require_broker();
    let seed = Rng::seed_from_env();
    let parallel = env_usize("EPU_CHAOS_PARALLEL").unwrap_or(3).max(1);
    let verbose = std::env::var("EPU_CHAOS_VERBOSE").is_ok_and(|v| v == "1");
    let only: Option<Vec<String>> = std::env::var("EPU_CHAOS_KINDS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut rng = Rng::new(seed);
    let mut specs: Vec<(Kind, u64)> = Vec::new();
    for k in Kind::ALL {
        let wanted = only.as_ref().is_none_or(|o| {
            o.iter()
                .any(|x| k.tag().ends_with(x.as_str()) || k.name().contains(x.as_str()))
        });
        if wanted {
            for _ in 0..per_kind(k) {
                specs.push((k, rng.next_u64()));
            }
        }
    }
    rng.shuffle(&mut specs);
    eprintln!(
        "chaos {label}: {} trials, {parallel} at a time, seed {seed} (EPU_CHAOS_SEED={seed} replays the choices)",
        specs.len()
    );
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(VecDeque::from(specs)));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let queue = queue.clone();
            let results = results.clone();
            std::thread::spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some((kind, seed)) = next else { break };
                let o = trial(kind, seed);
                eprintln!("chaos: {}", o.line());
                if verbose {
                    eprintln!("{}", o.last_look);
                }
                results.lock().unwrap_or_else(|p| p.into_inner()).push(o);
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let outcomes = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
    let mut report = format!(
        "\n=== chaos {label}: {} trials in {:.0} s (seed {seed}, {parallel} at a time, bound {} s) ===\n{}",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        bound().as_secs(),
        table(&outcomes, &kinds)
    );
    let outages: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.secs_after.map(|s| format!("{s:.1}")))
        .collect();
    if !outages.is_empty() {
        report.push_str(&format!(
            "broker outage: convergence after the outage ended (s): {}\n",
            outages.join(" ")
        ));
    }
    let mut flaps: BTreeMap<&str, u32> = BTreeMap::new();
    for o in &outcomes {
        *flaps.entry(o.kind.as_str()).or_default() += o.flaps;
    }
    let flapped: Vec<String> = flaps
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if !flapped.is_empty() {
        report.push_str(&format!(
            "converged and came apart again before holding: {}\n",
            flapped.join(", ")
        ));
    }
    for o in outcomes.iter().filter(|o| !o.ok()) {
        report.push('\n');
        report.push_str(&o.report());
    }
    eprintln!("{report}");
    (outcomes, report)
}

/// The short form: a few trials of every fault; every trial must converge within
/// the bound with no duplicate, no leak and nothing left after `killrun`.
#[test]
fn chaos_short() {
    let (outcomes, report) = suite("short", &|k| k.short_trials());
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    assert!(
        failed == 0 && !outcomes.is_empty(),
        "{failed} of {} chaos trials failed:{report}",
        outcomes.len()
    );
}

/// The long form: `EPU_CHAOS_TRIALS` (default 20) trials of every fault
/// (`scripts/chaos.sh`).
#[test]
// Ignored in the plain `cargo test` (20 trials per fault take ~15 min); CI runs it
// with EPU_CHAOS_TRIALS=1 from scripts/test.sh, developers with scripts/chaos.sh.
#[ignore = "long: scripts/chaos.sh runs it (EPU_CHAOS_TRIALS per fault); scripts/test.sh runs it with 1"]
fn chaos_long() {
    let n = env_usize("EPU_CHAOS_TRIALS").unwrap_or(20).max(1);
    let (outcomes, report) = suite("long", &|_| n);
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    assert!(
        failed == 0,
        "{failed} of {} chaos trials failed:{report}",
        outcomes.len()
    );
}
