//! The chaos suite's helpers (`tests/chaos.rs`): what a fault trial needs besides
//! the CLI helpers of `common/mod.rs`.
//!
//! - [`Rng`]: a small seeded generator (splitmix64) for the random moments; the seed is
//!   printed so a run's choices can be replayed (`EPU_CHAOS_SEED`).
//! - [`Proxy`]: a TCP proxy (tokio) between a run and the broker on 127.0.0.1:5672. An
//!   outage ([`Proxy::cut`]) closes every proxied connection and stops listening, so
//!   new connections are refused, until [`Proxy::restore`] listens on the same port.
//! - [`write_plan`]: a sleeper plan for one trial (broker URL, publish timeout,
//!   allowed commands).
//! - [`look`]: one observation of a run — its node records (`inspect nodes`), the
//!   controller's view (`status`), its decision marks (`inspect domains`) and the
//!   process groups carrying `EPU_RUN=<run>` — checked against the invariants: the
//!   domain at its size with live workers (problems), one live instance per live
//!   record (duplicates, leaks).
//! - [`converge_and_hold`]: looks until the run has converged and stayed so for
//!   [`HOLD_MIN`] and [`HOLD_DECISIONS`] further decisions (the positive marker before
//!   the negative "no duplicate appeared"), within a bound.
//! - [`teardown`]: `killrun`, then nothing of the run may be left (workers, processes,
//!   queues; leftover queues are deleted).
//! - [`evidence`], [`save_logs`], [`table`]: what a finding is reported with.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{live_workers, run_with_deadline, Cli};

/// The broker every trial uses (directly, or behind a [`Proxy`]).
pub const BROKER: &str = "127.0.0.1:5672";
/// How long a domain may take, from the fault, to converge again.
pub const CONVERGE_BOUND: Duration = Duration::from_secs(60);
/// How long a converged run must stay converged before it counts...
pub const HOLD_MIN: Duration = Duration::from_secs(3);
/// ...and how many further decisions of each domain it must see meanwhile.
pub const HOLD_DECISIONS: usize = 3;
/// How long those decisions may take to be seen.
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);
/// The pause between two looks.
const LOOK_PAUSE: Duration = Duration::from_millis(300);
/// `--timeout` of each CLI call a look makes, and the limit from outside.
const LOOK_CLI_TIMEOUT: &str = "10";
const LOOK_CLI_LIMIT: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------------
// Randomness

/// splitmix64: enough for random moments and choices, reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// `EPU_CHAOS_SEED` when set, else a random one.
    pub fn seed_from_env() -> u64 {
        std::env::var("EPU_CHAOS_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                let b = *uuid::Uuid::new_v4().as_bytes();
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        let n = u64::try_from(xs.len()).ok()?;
        xs.get(usize::try_from(self.below(n)).ok()?)
    }

    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = usize::try_from(self.below(i as u64 + 1)).unwrap_or(0);
            xs.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------
// The broker proxy

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct ProxyInner {
    accept: Option<tokio::task::JoinHandle<()>>,
    conns: Vec<tokio::task::AbortHandle>,
    accepted: u64,
}

/// A TCP proxy on 127.0.0.1:<free port> forwarding to [`BROKER`], with outages.
/// It runs on a runtime of its own (one worker thread), so the synchronous test
/// drives it from any thread.
pub struct Proxy {
    rt: Option<tokio::runtime::Runtime>,
    port: u16,
    upstream: SocketAddr,
    inner: Arc<Mutex<ProxyInner>>,
}

impl Proxy {
    pub fn start() -> Result<Proxy, String> {
        let upstream: SocketAddr = BROKER
            .parse()
            .map_err(|e| format!("broker address {BROKER}: {e}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the proxy's runtime: {e}"))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| format!("the proxy cannot listen on 127.0.0.1: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("the proxy's address: {e}"))?
            .port();
        let p = Proxy {
            rt: Some(rt),
            port,
            upstream,
            inner: Arc::new(Mutex::new(ProxyInner::default())),
        };
        p.serve(listener);
        Ok(p)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker URL through the proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        lock(&self.inner).accepted
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the proxy's runtime lives until drop")
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let inner = self.inner.clone();
        let upstream = self.upstream;
        let task = self.rt().spawn(async move {
            loop {
                let (mut down, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let conn = tokio::spawn(async move {
                    let Ok(Ok(mut up)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(upstream),
                    )
                    .await
                    else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
                let mut g = lock(&inner);
                g.conns.retain(|c| !c.is_finished());
                g.conns.push(conn.abort_handle());
                g.accepted += 1;
            }
        });
        lock(&self.inner).accept = Some(task);
    }

    /// The outage begins: stop listening (new connections are refused) and close
    /// every proxied connection. Returns how many were open.
    pub fn cut(&self) -> usize {
        let accept = lock(&self.inner).accept.take();
        if let Some(a) = accept {
            a.abort();
            // Once the accept task is gone nobody adds a connection any more.
            let _ = self
                .rt()
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), a).await });
        }
        let conns = std::mem::take(&mut lock(&self.inner).conns);
        let open = conns.iter().filter(|c| !c.is_finished()).count();
        for c in &conns {
            c.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while conns.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        open
    }

    /// The outage ends: listen on the same port again.
    pub fn restore(&self) -> Result<(), String> {
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.rt().block_on(tokio::net::TcpListener::bind(&addr)) {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the proxy cannot listen on {addr} again: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Fails, saying how to start it, when nothing listens on [`BROKER`].
pub fn require_broker() {
    let addr: SocketAddr = BROKER.parse().expect("broker address");
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        panic!(
            "the chaos suite needs RabbitMQ on {BROKER} (guest/guest): {e}; \
             start it (`sudo service rabbitmq-server start`; bash scripts/test.sh installs it)"
        );
    }
}

// ---------------------------------------------------------------------------------
// Plans

/// What a trial's plan changes from `examples/sleeper/plan-amqp.toml`.
#[derive(Default)]
pub struct PlanOpts {
    /// The broker URL of the run (the services, its workers and the CLI).
    pub amqp_url: Option<String>,
    /// `bus.publish_timeout_secs` of every service. A service's `[bus]` section
    /// replaces the one `launch` writes as a whole (not key by key), so this also
    /// writes the URL and the plan's secret into each.
    pub publish_timeout_secs: Option<u64>,
    /// The provisioner's `drivers.local.allowed_commands`.
    pub allowed_commands: Option<Vec<String>>,
    /// The sleeper domain's `health.missing_timeout_secs` (the example's is 4 s):
    /// written as a copy of examples/sleeper/domain.toml beside the plan.
    pub missing_timeout_secs: Option<f64>,
}

/// Writes the trial's plan (the sleeper domain, the example's timing) into `dir`.
pub fn write_plan(dir: &Path, run: &str, o: &PlanOpts) -> Result<PathBuf, String> {
    let mut domain = crate::common::repo().join("examples/sleeper/domain.toml");
    if let Some(m) = o.missing_timeout_secs {
        let text = std::fs::read_to_string(&domain)
            .map_err(|e| format!("cannot read {}: {e}", domain.display()))?;
        let mut policy: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", domain.display()))?;
        let health = policy
            .entry("health")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(h) = health.as_table_mut() {
            h.insert("missing_timeout_secs".into(), toml::Value::Float(m));
        }
        let text = toml::to_string(&policy).map_err(|e| format!("domain as TOML: {e}"))?;
        domain = dir.join("domain.toml");
        std::fs::write(&domain, text)
            .map_err(|e| format!("cannot write {}: {e}", domain.display()))?;
    }
    let mut local = json!({"heartbeat_interval_secs": 0.5});
    if let Some(a) = &o.allowed_commands {
        local["allowed_commands"] = json!(a);
    }
    let mut plan = json!({
        "run": run,
        "transport": "amqp",
        "domains": [domain],
        "provisioner": {
            "poll_interval_secs": 1.0,
            "terminate_grace_secs": 2.0,
            "drivers": {"local": local},
        },
        "sensor_aggregator": {"nodes_poll_secs": 0.5},
        "controller": {"timing": {"decision_interval_secs": 1.0}},
    });
    let url = o.amqp_url.clone();
    if let Some(u) = &url {
        plan["amqp_url"] = json!(u);
    }
    if let Some(t) = o.publish_timeout_secs {
        let secret = format!("chaos-{}", uuid::Uuid::new_v4().simple());
        plan["secret"] = json!(secret);
        let bus = json!({
            "transport": "amqp",
            "amqp_url": url.unwrap_or_else(|| format!("amqp://guest:guest@{BROKER}/%2f")),
            "secret": secret,
            "publish_timeout_secs": t,
        });
        for s in ["provisioner", "sensor_aggregator", "controller"] {
            plan[s]["bus"] = bus.clone();
        }
    }
    let text = toml::to_string(&plan).map_err(|e| format!("plan as TOML: {e}"))?;
    let path = dir.join("plan.toml");
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------------
// Reading a run

/// `epumgmt ARGS --json`, parsed; an error (never a panic) when it fails.
pub fn cli_json(cli: &Cli, args: &[&str]) -> Result<Value, String> {
    let mut a = args.to_vec();
    a.extend(["--json", "--timeout", LOOK_CLI_TIMEOUT]);
    let o = cli
        .try_out_within(&a, LOOK_CLI_LIMIT)
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "`epumgmt {}` exited {}: {}",
            a.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| {
        format!(
            "`epumgmt {}` printed no JSON ({e}): {}",
            a.join(" "),
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// `epumgmt ARGS` must exit 0; its stdout, or why not.
pub fn cli_ok(cli: &Cli, args: &[&str], limit: Duration) -> Result<String, String> {
    let o = cli.try_out_within(args, limit).map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "`epumgmt {}` exited {}: {}{}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// One node record as `inspect nodes --json` shows it.
#[derive(Clone, Debug)]
pub struct Node {
    pub node_id: String,
    pub domain: String,
    pub state: String,
    pub health: String,
    pub iaas_id: Option<String>,
    pub reason: Option<String>,
    pub reason_detail: Option<String>,
}

/// The states after which a record names no instance.
pub const TERMINAL: [&str; 3] = ["TERMINATED", "FAILED", "REJECTED"];
/// The states that are (or will be) capacity of the domain.
const CAPACITY: [&str; 5] = [
    "REQUESTED",
    "ERROR_RETRYING",
    "PENDING",
    "STARTED",
    "RUNNING",
];

impl Node {
    fn from_json(v: &Value) -> Option<Node> {
        let s = |k: &str| v[k].as_str().map(str::to_string);
        Some(Node {
            node_id: s("node_id")?,
            domain: s("domain").unwrap_or_default(),
            state: s("state").unwrap_or_default(),
            health: s("health").unwrap_or_default(),
            iaas_id: s("iaas_id").filter(|x| !x.is_empty()),
            reason: s("reason"),
            reason_detail: s("reason_detail"),
        })
    }

    /// Not terminal: the record names (or will name) a live instance.
    pub fn live(&self) -> bool {
        !TERMINAL.contains(&self.state.as_str())
    }

    pub fn pgid(&self) -> Option<u64> {
        self.iaas_id.as_deref().and_then(|s| s.parse().ok())
    }

    /// RUNNING and heartbeating.
    pub fn healthy(&self) -> bool {
        self.state == "RUNNING" && self.health == "OK"
    }
}

pub fn nodes(cli: &Cli) -> Result<Vec<Node>, String> {
    let v = cli_json(cli, &["inspect", "nodes", "--run", &cli.run])?;
    let arr = v
        .as_array()
        .ok_or_else(|| format!("inspect nodes printed no list: {v}"))?;
    Ok(arr.iter().filter_map(Node::from_json).collect())
}

pub fn status(cli: &Cli) -> Result<Value, String> {
    cli_json(cli, &["status", "--run", &cli.run])
}

/// A service's (pid, restarts, ready) in a `status --json`.
pub fn service_of(status: &Value, name: &str) -> Option<(u64, u64, bool)> {
    let s = status["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == name)?;
    Some((
        s["pid"].as_u64()?,
        s["restarts"].as_u64().unwrap_or(0),
        s["ready"] == true,
    ))
}

/// Per domain, the time of its engine's last decision (`inspect domains`): it moves
/// on with every decision, also one that changes nothing.
pub fn decision_marks(cli: &Cli) -> Result<BTreeMap<String, String>, String> {
    let v = cli_json(cli, &["inspect", "domains", "--run", &cli.run])?;
    let mut out = BTreeMap::new();
    for d in v.as_array().into_iter().flatten() {
        let Some(name) = d["domain"].as_str() else {
            continue;
        };
        let at = d["report"]["detail"]["at"]
            .as_str()
            .or_else(|| d["report"]["at"].as_str());
        if let Some(at) = at {
            out.insert(name.to_string(), at.to_string());
        }
    }
    Ok(out)
}

/// One local worker: a live process group with processes carrying `EPU_RUN=<run>`.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub pgid: u64,
    pub node_ids: BTreeSet<String>,
    pub domains: BTreeSet<String>,
    pub pids: Vec<u64>,
}

fn proc_fields(pid: u64) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Alive and not a zombie.
pub fn pid_alive(pid: u64) -> bool {
    proc_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

/// The run's live process groups, by pgid, from `/proc` (environment and stat).
pub fn run_groups(run: &str) -> BTreeMap<u64, Group> {
    let want = format!("EPU_RUN={run}");
    let mut out: BTreeMap<u64, Group> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.contains(&want.as_bytes()) {
            continue;
        }
        let Some(f) = proc_fields(pid) else { continue };
        if f.first().is_none_or(|s| s == "Z" || s == "X") {
            continue;
        }
        let Some(pgid) = f.get(2).and_then(|g| g.parse::<u64>().ok()) else {
            continue;
        };
        let var = |name: &str| {
            let prefix = format!("{name}=");
            vars.iter()
                .find_map(|v| v.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let g = out.entry(pgid).or_insert_with(|| Group {
            pgid,
            ..Group::default()
        });
        g.pids.push(pid);
        if let Some(n) = var("EPU_NODE_ID") {
            g.node_ids.insert(n);
        }
        if let Some(d) = var("EPU_DOMAIN") {
            g.domains.insert(d);
        }
    }
    out
}

/// SIGKILL to a whole process group (as an IaaS console terminating an instance).
pub fn kill_group(pgid: u64) -> Result<(), String> {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let raw = i32::try_from(pgid).map_err(|e| format!("pgid {pgid}: {e}"))?;
    killpg(Pid::from_raw(raw), Signal::SIGKILL).map_err(|e| format!("killpg {pgid}: {e}"))
}

// ---------------------------------------------------------------------------------
// Looking and judging

/// What a run must look like.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// Each domain's size.
    pub targets: BTreeMap<String, usize>,
    /// Domains nothing may ever run for.
    pub forbidden: BTreeSet<String>,
}

impl Expect {
    pub fn sleeper(n: usize) -> Self {
        Expect {
            targets: BTreeMap::from([("sleeper".to_string(), n)]),
            forbidden: BTreeSet::new(),
        }
    }
}

/// A trial's own condition on a look (a service restarted, a failpoint reached):
/// what is still wrong, empty when it holds.
pub type Extra<'a> = &'a mut dyn FnMut(&Value, &[Node]) -> Vec<String>;

/// One observation of the run and how it measures up.
pub struct Look {
    /// When its last read was done.
    pub at: Instant,
    pub nodes: Vec<Node>,
    pub groups: BTreeMap<u64, Group>,
    pub marks: BTreeMap<String, String>,
    /// The controller's domain summaries (`status --json`'s `domains`).
    pub summaries: Value,
    /// Why the run has not converged (invariant (a), and transient mismatches).
    pub problems: Vec<String>,
    /// Two instances for one node, or more capacity than the policy's size.
    pub duplicates: Vec<String>,
    /// Instances no live record names, or that run for a forbidden domain.
    pub leaks: Vec<String>,
    /// The subset of `duplicates` that is never right, converged or not.
    pub always_wrong: Vec<String>,
}

impl Look {
    pub fn converged(&self) -> bool {
        self.problems.is_empty()
    }

    /// Nodes, groups and what is wrong, for a report.
    pub fn render(&self) -> String {
        let mut s = String::from("  node records (inspect nodes):\n");
        for n in &self.nodes {
            s.push_str(&format!(
                "    {} {:<8} {:<11} {:<13} iaas_id={:<7} {}{}\n",
                n.node_id,
                n.domain,
                n.state,
                n.health,
                n.iaas_id.as_deref().unwrap_or("-"),
                n.reason.as_deref().unwrap_or(""),
                n.reason_detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ));
        }
        for d in self.summaries.as_array().into_iter().flatten() {
            s.push_str(&format!(
                "  the controller's view of domain {}: engine_state {} desired {} running {} pending {} unhealthy {} terminating {}\n",
                d["domain"], d["engine_state"], d["desired"], d["running"], d["pending"], d["unhealthy"], d["terminating"]
            ));
        }
        s.push_str("  live process groups with the run's EPU_RUN:\n");
        for g in self.groups.values() {
            s.push_str(&format!(
                "    pgid {} node {:?} domain {:?} pids {:?}\n",
                g.pgid, g.node_ids, g.domains, g.pids
            ));
        }
        for (what, list) in [
            ("not converged", &self.problems),
            ("duplicates", &self.duplicates),
            ("leaks", &self.leaks),
        ] {
            for p in list {
                s.push_str(&format!("  {what}: {p}\n"));
            }
        }
        s
    }
}

/// Looks at the run once and judges it against `expect` and `extra`.
pub fn look(cli: &Cli, expect: &Expect, extra: Extra<'_>) -> Look {
    let mut problems = Vec::new();
    let nodes = nodes(cli).unwrap_or_else(|e| {
        problems.push(format!("cannot read the node records: {e}"));
        Vec::new()
    });
    let status = status(cli).unwrap_or_else(|e| {
        problems.push(format!("cannot read the status: {e}"));
        Value::Null
    });
    let marks = decision_marks(cli).unwrap_or_default();
    // The processes last, so that a group started after the records were read
    // (a launch in flight) is the one thing that may look unrecorded.
    let groups = run_groups(&cli.run);
    // Stamped when the last read is done, not when the look began: a CLI call may
    // wait (up to its --timeout) for a restarting service, and what it then shows
    // is what holds at the end, so a convergence time is an upper bound (by at
    // most one look), never a time before the state was there.
    let at = Instant::now();
    let mut l = Look {
        at,
        nodes,
        groups,
        marks,
        summaries: status["domains"].clone(),
        problems,
        duplicates: Vec::new(),
        leaks: Vec::new(),
        always_wrong: Vec::new(),
    };
    if l.problems.is_empty() {
        judge(&mut l, &status, expect);
        l.problems.extend(extra(&status, &l.nodes));
    }
    l
}

fn judge(l: &mut Look, status: &Value, expect: &Expect) {
    // The services: all up and ready.
    for s in status["services"].as_array().into_iter().flatten() {
        if s["ready"] != true {
            l.problems.push(format!(
                "service {} not ready (up {}, pid {})",
                s["service"], s["up"], s["pid"]
            ));
        }
    }
    // (a) each domain at its size: RUNNING, heartbeating, the worker alive, and the
    // controller seeing the same.
    for (domain, &n) in &expect.targets {
        let healthy: Vec<&Node> = l
            .nodes
            .iter()
            .filter(|x| &x.domain == domain && x.healthy())
            .collect();
        if healthy.len() != n {
            l.problems.push(format!(
                "domain {domain}: {} RUNNING and OK, want {n}",
                healthy.len()
            ));
        }
        for x in l
            .nodes
            .iter()
            .filter(|x| &x.domain == domain && x.state == "RUNNING")
        {
            let alive = x.pgid().is_some_and(|p| {
                pid_alive(p)
                    && l.groups
                        .get(&p)
                        .is_some_and(|g| g.node_ids.contains(&x.node_id))
            });
            if !alive {
                l.problems.push(format!(
                    "domain {domain}: RUNNING node {} (iaas_id {:?}, health {}) has no live worker",
                    x.node_id, x.iaas_id, x.health
                ));
            }
        }
        let summary = status["domains"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["domain"] == domain.as_str()));
        match summary {
            None => l
                .problems
                .push(format!("domain {domain}: not in the controller's status")),
            Some(d) => {
                let want = json!(n);
                if d["desired"] != want || d["running"] != want || d["pending"] != json!(0) {
                    l.problems.push(format!(
                        "domain {domain}: the controller shows desired {} running {} pending {} unhealthy {}, want {n}/{n}/0",
                        d["desired"], d["running"], d["pending"], d["unhealthy"]
                    ));
                }
            }
        }
        // More capacity than the policy asks for: an instance too many.
        let capacity: Vec<&Node> = l
            .nodes
            .iter()
            .filter(|x| &x.domain == domain && CAPACITY.contains(&x.state.as_str()))
            .collect();
        if capacity.len() > n {
            l.duplicates.push(format!(
                "domain {domain}: {} records hold capacity ({}), the policy's size is {n}",
                capacity.len(),
                capacity
                    .iter()
                    .map(|x| format!("{} {}", x.node_id, x.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    // (b) one live instance per live record.
    let live: BTreeMap<&str, &Node> = l
        .nodes
        .iter()
        .filter(|x| x.live())
        .map(|x| (x.node_id.as_str(), x))
        .collect();
    let mut per_node: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for g in l.groups.values() {
        if expect.forbidden.iter().any(|d| g.domains.contains(d)) {
            l.leaks.push(format!(
                "pgid {} runs for domain {:?}, which nothing may run for",
                g.pgid, g.domains
            ));
        }
        if g.node_ids.len() != 1 {
            l.leaks.push(format!(
                "pgid {} carries node ids {:?} (want exactly one)",
                g.pgid, g.node_ids
            ));
        }
        for id in &g.node_ids {
            per_node.entry(id.as_str()).or_default().push(g.pgid);
            match live.get(id.as_str()) {
                None => {
                    let state = l
                        .nodes
                        .iter()
                        .find(|x| &x.node_id == id)
                        .map_or("no record".to_string(), |x| format!("record {}", x.state));
                    l.leaks.push(format!(
                        "pgid {} (node {id}, pids {:?}) is alive but no live record names it ({state})",
                        g.pgid, g.pids
                    ));
                }
                Some(r) => match r.pgid() {
                    Some(p) if p != g.pgid => l.duplicates.push(format!(
                        "node {id}: a second instance, pgid {} (its record names {p})",
                        g.pgid
                    )),
                    Some(_) => {}
                    None => l.problems.push(format!(
                        "node {id} ({}): its instance pgid {} is alive, the record has no iaas_id yet",
                        r.state, g.pgid
                    )),
                },
            }
        }
    }
    for (id, pgids) in &per_node {
        if pgids.len() > 1 {
            let d = format!("node {id}: {} live process groups {pgids:?}", pgids.len());
            l.always_wrong.push(d.clone());
            l.duplicates.push(d);
        }
    }
    for r in live.values() {
        match r.pgid() {
            Some(p) if !l.groups.contains_key(&p) => l.problems.push(format!(
                "node {} is {} and names pgid {p}, which is not alive",
                r.node_id, r.state
            )),
            Some(_) => {}
            None => l.problems.push(format!(
                "node {} is {} with no instance yet",
                r.node_id, r.state
            )),
        }
        if expect.forbidden.contains(&r.domain) {
            l.problems.push(format!(
                "node {} of domain {} is {}",
                r.node_id, r.domain, r.state
            ));
        }
    }
}

/// The run converged and held.
#[derive(Debug, Default)]
pub struct Converged {
    /// From the fault to the first look of the window that held.
    pub secs: f64,
    /// Times it converged and came apart again before it held.
    pub flaps: u32,
    pub duplicates: Vec<String>,
    pub leaks: Vec<String>,
    /// The look that completed the window, rendered.
    pub last: String,
    /// Every node record seen in any look: id -> (domain, last state seen).
    pub seen: BTreeMap<String, (String, String)>,
}

/// The run did not converge (or did not hold) within the bound.
pub struct NotConverged {
    pub what: String,
    pub last: Option<Box<Look>>,
    pub flaps: u32,
    pub duplicates: Vec<String>,
    pub leaks: Vec<String>,
    pub seen: BTreeMap<String, (String, String)>,
}

fn note(list: &mut Vec<String>, items: &[String]) {
    for i in items {
        if list.len() < 12 && !list.contains(i) {
            list.push(i.clone());
        }
    }
}

/// Looks until the run has converged (by `since + bound`) and then stayed
/// converged for [`HOLD_MIN`] and [`HOLD_DECISIONS`] further decisions of each
/// domain in `expect.targets`. Every look of that window is checked for duplicates
/// and leaks; a second instance of one node counts whenever it is seen.
pub fn converge_and_hold(
    cli: &Cli,
    expect: &Expect,
    since: Instant,
    bound: Duration,
    extra: Extra<'_>,
) -> Result<Converged, NotConverged> {
    let deadline = since + bound;
    let mut window: Option<(Instant, BTreeMap<String, BTreeSet<String>>)> = None;
    let mut out = Converged::default();
    loop {
        let l = look(cli, expect, &mut *extra);
        for n in &l.nodes {
            out.seen
                .insert(n.node_id.clone(), (n.domain.clone(), n.state.clone()));
        }
        note(&mut out.duplicates, &l.always_wrong);
        if l.converged() {
            note(&mut out.duplicates, &l.duplicates);
            note(&mut out.leaks, &l.leaks);
            let (start, seen) = window.get_or_insert_with(|| (l.at, BTreeMap::new()));
            for (d, m) in &l.marks {
                seen.entry(d.clone()).or_default().insert(m.clone());
            }
            // The mark seen first was there before the window: it does not count.
            let decided = expect
                .targets
                .keys()
                .all(|d| seen.get(d).map_or(0, BTreeSet::len) > HOLD_DECISIONS);
            if decided && l.at.duration_since(*start) >= HOLD_MIN {
                out.secs = start.duration_since(since).as_secs_f64();
                out.last = l.render();
                return Ok(out);
            }
            if l.at.duration_since(*start) > HOLD_LIMIT {
                return Err(NotConverged {
                    what: format!(
                        "converged, but {HOLD_DECISIONS} further decisions were not seen within {} s (marks seen: {seen:?})",
                        HOLD_LIMIT.as_secs()
                    ),
                    last: Some(Box::new(l)),
                    flaps: out.flaps,
                    duplicates: out.duplicates,
                    leaks: out.leaks,
                    seen: out.seen,
                });
            }
        } else {
            if window.take().is_some() {
                out.flaps += 1;
            }
            if l.at > deadline {
                return Err(NotConverged {
                    what: format!(
                        "not converged {} s after the fault: {}",
                        bound.as_secs(),
                        l.problems.join("; ")
                    ),
                    last: Some(Box::new(l)),
                    flaps: out.flaps,
                    duplicates: out.duplicates,
                    leaks: out.leaks,
                    seen: out.seen,
                });
            }
        }
        std::thread::sleep(LOOK_PAUSE);
    }
}

/// Looks until the run has converged once (no hold), within `bound`.
pub fn wait_converged(cli: &Cli, expect: &Expect, bound: Duration) -> Result<Look, String> {
    let deadline = Instant::now() + bound;
    loop {
        let l = look(cli, expect, &mut |_, _| Vec::new());
        if l.converged() && l.duplicates.is_empty() && l.leaks.is_empty() {
            return Ok(l);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the run did not converge within {} s of its launch:\n{}",
                bound.as_secs(),
                l.render()
            ));
        }
        std::thread::sleep(LOOK_PAUSE);
    }
}

// ---------------------------------------------------------------------------------
// Teardown

/// The run's queues on the broker (`rabbitmqctl`).
pub fn run_queues(run: &str) -> Result<Vec<String>, String> {
    let o = run_with_deadline(
        Command::new("rabbitmqctl").args(["-q", "list_queues", "name"]),
        Duration::from_secs(60),
    )
    .map_err(|e| {
        format!("rabbitmqctl (install rabbitmq-server; bash scripts/test.sh does): {e}")
    })?;
    if !o.status.success() {
        return Err(format!(
            "rabbitmqctl list_queues exited {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let prefix = format!("epu.{run}.");
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect())
}

/// `killrun`, then invariant (c): nothing of the run is left. What is left is
/// returned (and leftover queues are deleted).
pub fn teardown(cli: &Cli) -> Vec<String> {
    let mut left = Vec::new();
    if let Err(e) = cli_ok(
        cli,
        &["killrun", "--run", &cli.run, "--timeout", "120"],
        Duration::from_secs(135),
    ) {
        left.push(format!("killrun failed: {e}"));
    }
    let workers = live_workers(&cli.run);
    if !workers.is_empty() {
        left.push(format!("worker processes alive after killrun: {workers:?}"));
    }
    let procs = cli.leftover_processes();
    if !procs.is_empty() {
        left.push(format!(
            "processes of the run alive after killrun: {procs:?}"
        ));
    }
    match run_queues(&cli.run) {
        Ok(q) if q.is_empty() => {}
        Ok(q) => {
            left.push(format!("queues left after killrun: {q:?} (deleted)"));
            for name in q {
                let _ = run_with_deadline(
                    Command::new("rabbitmqctl").args(["-q", "delete_queue", &name]),
                    Duration::from_secs(60),
                );
            }
        }
        Err(e) => left.push(format!("cannot list the run's queues: {e}")),
    }
    left
}

// ---------------------------------------------------------------------------------
// Evidence and the table

const KEY_EVENTS: [&str; 14] = [
    "failpoint_reached",
    "node_state",
    "launch_requested",
    "provision_sent",
    "decision",
    "node_terminate_requested",
    "zombie",
    "zombie_terminated",
    "controller_recovered",
    "service_started",
    "service_died",
    "bus_connected",
    "bus_disconnected",
    "store_failed",
];

/// The run's log lines since `since` that tell what happened: warnings, errors and
/// lifecycle events, the last `per_file` of each service's log.
pub fn evidence(cli: &Cli, since: chrono::DateTime<chrono::Utc>, per_file: usize) -> String {
    let dir = cli.home.path().join("runs").join(&cli.run).join("logs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let from = since - chrono::TimeDelta::seconds(1);
    let mut s = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let mut keep = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let at = v["timestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            if at.is_none_or(|t| t < from) {
                continue;
            }
            let level = v["level"].as_str().unwrap_or("");
            let event = v["event"].as_str().unwrap_or("");
            if level != "WARN" && level != "ERROR" && !KEY_EVENTS.contains(&event) {
                continue;
            }
            let mut fields = String::new();
            for k in [
                "service",
                "failpoint",
                "node_id",
                "state",
                "iaas_id",
                "reason",
                "reason_detail",
                "launch_id",
                "launched",
                "destroyed",
                "error",
            ] {
                match &v[k] {
                    Value::Null => {}
                    Value::String(x) if x.is_empty() => {}
                    Value::String(x) => fields.push_str(&format!(" {k}={x}")),
                    other => fields.push_str(&format!(" {k}={other}")),
                }
            }
            keep.push(format!(
                "    {} {level} {event} {}{fields}",
                v["timestamp"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("")
            ));
        }
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        s.push_str(&format!(
            "  == {} ({} relevant lines since the fault, last {per_file}):\n",
            name.unwrap_or_default(),
            keep.len()
        ));
        let skip = keep.len().saturating_sub(per_file);
        for k in &keep[skip..] {
            s.push_str(k);
            s.push('\n');
        }
    }
    s
}

/// The lines of the service log `<service>.jsonl` at or after `since` for which
/// `keep` holds, with their times.
pub fn log_lines(
    cli: &Cli,
    service: &str,
    since: chrono::DateTime<chrono::Utc>,
    keep: &dyn Fn(&Value) -> bool,
) -> Vec<(chrono::DateTime<chrono::Utc>, Value)> {
    let f = cli
        .home
        .path()
        .join("runs")
        .join(&cli.run)
        .join("logs")
        .join(format!("{service}.jsonl"));
    let text = std::fs::read_to_string(f).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| keep(v))
        .filter_map(|v| {
            let at = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?;
            let at = at.with_timezone(&chrono::Utc);
            (at >= since).then_some((at, v))
        })
        .collect()
}

/// The events named `event` in the service log `<service>.jsonl` of the run, at
/// or after `since`, with their times.
pub fn log_events(
    cli: &Cli,
    service: &str,
    event: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> Vec<(chrono::DateTime<chrono::Utc>, Value)> {
    log_lines(cli, service, since, &|v| v["event"] == event)
}

/// Copies the run's logs (services and workers) where they outlive the test:
/// `target/tmp/chaos/<run>/`.
pub fn save_logs(cli: &Cli) -> Option<PathBuf> {
    let to = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chaos")
        .join(&cli.run);
    let run_dir = cli.home.path().join("runs").join(&cli.run);
    for sub in ["logs", "workers"] {
        let from = run_dir.join(sub);
        let dest = to.join(sub);
        std::fs::create_dir_all(&dest).ok()?;
        for e in std::fs::read_dir(&from).into_iter().flatten().flatten() {
            if e.path().is_file() {
                let _ = std::fs::copy(e.path(), dest.join(e.file_name()));
            }
        }
    }
    Some(to)
}

/// What one trial found.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub kind: String,
    pub run: String,
    pub variant: String,
    pub converged: bool,
    /// Fault to convergence.
    pub secs: Option<f64>,
    /// For an outage: its end to convergence.
    pub secs_after: Option<f64>,
    pub flaps: u32,
    pub duplicates: Vec<String>,
    pub leaks: Vec<String>,
    pub teardown_left: Vec<String>,
    /// Why the trial failed (not converged, a setup step failed, a panic).
    pub failure: Option<String>,
    pub evidence: String,
    pub logs: Option<PathBuf>,
    pub wall_secs: f64,
    /// The last look, rendered (printed with `EPU_CHAOS_VERBOSE=1`).
    pub last_look: String,
    /// Nodes of the faulted domain launched after the fault, and how many the
    /// fault itself called for (a worker to replace, a scale-up).
    pub launched: usize,
    pub launches_wanted: usize,
    /// Workers running before the fault, other than its victim, that were replaced.
    pub collateral: Vec<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.converged
            && self.failure.is_none()
            && self.duplicates.is_empty()
            && self.leaks.is_empty()
            && self.teardown_left.is_empty()
    }

    /// One line for the progress log.
    pub fn line(&self) -> String {
        format!(
            "{:<5} {:<38} {:<21} {:<24} conv {} flaps {} launched {}/{} collateral {} dup {} leak {} left {} ({:.1} s)",
            if self.ok() { "ok" } else { "FAIL" },
            self.kind,
            self.run,
            self.variant,
            self.secs.map_or("-".into(), |s| format!("{s:.1}s")),
            self.flaps,
            self.launched,
            self.launches_wanted,
            self.collateral.len(),
            self.duplicates.len(),
            self.leaks.len(),
            self.teardown_left.len(),
            self.wall_secs
        )
    }

    /// The full account of a trial that failed.
    pub fn report(&self) -> String {
        let mut s = format!(
            "--- {} on run {} ({}) ---\n",
            self.kind, self.run, self.variant
        );
        if let Some(f) = &self.failure {
            s.push_str(&format!("  failure: {f}\n"));
        }
        for d in &self.duplicates {
            s.push_str(&format!("  duplicate: {d}\n"));
        }
        for d in &self.leaks {
            s.push_str(&format!("  leak: {d}\n"));
        }
        for d in &self.teardown_left {
            s.push_str(&format!("  left after killrun: {d}\n"));
        }
        if self.launched > self.launches_wanted {
            s.push_str(&format!(
                "  launched {} node(s) after the fault, {} called for\n",
                self.launched, self.launches_wanted
            ));
        }
        for d in &self.collateral {
            s.push_str(&format!("  collateral: {d}\n"));
        }
        if let Some(p) = &self.logs {
            s.push_str(&format!("  logs kept in {}\n", p.display()));
        }
        s.push_str(&self.evidence);
        s
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// The table: per fault kind, trials, converged, p50/p95/max convergence seconds,
/// trials with a duplicate, trials with a leak, trials that left something after
/// `killrun`.
pub fn table(outcomes: &[Outcome], kinds: &[&str]) -> String {
    let mut s = format!(
        "{:<38} {:>6} {:>9} {:>6} {:>6} {:>6} {:>10} {:>5} {:>4} {:>7} {:>10}\n",
        "fault",
        "trials",
        "converged",
        "p50 s",
        "p95 s",
        "max s",
        "duplicates",
        "leaks",
        "left",
        "extra-l",
        "collateral"
    );
    let mut all = Vec::new();
    for kind in kinds {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == *kind).collect();
        if of.is_empty() {
            continue;
        }
        let secs = sorted_secs(&of);
        all.extend(secs.iter().copied());
        s.push_str(&row(kind, &of, &secs));
    }
    all.sort_by(f64::total_cmp);
    let every: Vec<&Outcome> = outcomes.iter().collect();
    s.push_str(&row("all", &every, &all));
    s.push_str(
        "(duplicates, leaks, left: trials with one; extra-l: trials that launched more nodes \
         than the fault called for; collateral: trials in which a worker other than the \
         victim was replaced)\n",
    );
    s
}

fn sorted_secs(of: &[&Outcome]) -> Vec<f64> {
    let mut secs: Vec<f64> = of
        .iter()
        .filter(|o| o.converged)
        .filter_map(|o| o.secs)
        .collect();
    secs.sort_by(f64::total_cmp);
    secs
}

fn row(kind: &str, of: &[&Outcome], sorted_secs: &[f64]) -> String {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    let count = |f: &dyn Fn(&Outcome) -> bool| of.iter().filter(|o| f(o)).count();
    format!(
        "{:<38} {:>6} {:>9} {:>6} {:>6} {:>6} {:>10} {:>5} {:>4} {:>7} {:>10}\n",
        kind,
        of.len(),
        count(&|o| o.converged),
        fmt(percentile(sorted_secs, 50.0)),
        fmt(percentile(sorted_secs, 95.0)),
        fmt(sorted_secs.last().copied()),
        count(&|o| !o.duplicates.is_empty()),
        count(&|o| !o.leaks.is_empty()),
        count(&|o| !o.teardown_left.is_empty()),
        count(&|o| o.launched > o.launches_wanted),
        count(&|o| !o.collateral.is_empty()),
    )
}

/// Rewrites the run's provisioner config (`config/provisioner.yaml` in the run
/// directory, as `launch` wrote it) with `drivers.local.allowed_commands` =
/// `allowed`: what an operator changing the provisioner's policy does. It takes
/// effect when the provisioner restarts.
pub fn set_allowed_commands(cli: &Cli, allowed: &[&str]) -> Result<(), String> {
    let path = cli
        .home
        .path()
        .join("runs")
        .join(&cli.run)
        .join("config")
        .join("provisioner.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // `launch` writes the services' configs as JSON (which is YAML).
    let mut cfg: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not the JSON launch writes: {e}", path.display()))?;
    if !cfg["drivers"]["local"].is_object() {
        return Err(format!("{} has no drivers.local: {cfg}", path.display()));
    }
    cfg["drivers"]["local"]["allowed_commands"] = json!(allowed);
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| format!("config: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------
// add_domain over the bus

/// `add_domain` to the run's controller over AMQP, signed with the run's secret
/// (`epumgmt` has no command for it). Bounded: 30 s in all.
pub fn add_domain(cli: &Cli, policy: Value) -> Result<Value, String> {
    use epu_core::bus::amqp::AmqpBus;
    use epu_core::bus::{Bus, BusOptions};
    use epu_core::wire::{Envelope, Op, RunName, Service};
    let dir = cli.home.path().join("runs").join(&cli.run);
    let rec: Value = std::fs::read(dir.join("run.json"))
        .map_err(|e| format!("run.json: {e}"))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("run.json: {e}")))?;
    let url = rec["amqp_url"]
        .as_str()
        .ok_or_else(|| format!("run.json has no amqp_url: {rec}"))?
        .to_string();
    let secret = std::fs::read_to_string(dir.join("secret"))
        .map_err(|e| format!("the run's secret: {e}"))?;
    let run = RunName::new(&cli.run).map_err(|e| format!("run name: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let opts = BusOptions::new("chaos").with_secret(secret.trim().as_bytes());
            let bus = AmqpBus::connect(&url, run.clone(), opts)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let env = Envelope::new(&run, Op::AddDomain, "chaos", policy);
            let reply = bus
                .request(Service::Controller, &env, Duration::from_secs(10))
                .await
                .map_err(|e| format!("add_domain: {e:?}"));
            bus.close().await;
            reply
        })
        .await
        .map_err(|_| "add_domain: no answer within 30 s".to_string())?
    });
    rt.shutdown_background();
    result
}
