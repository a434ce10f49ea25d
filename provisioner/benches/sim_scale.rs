//! Scale benchmark of the provisioner with the sim driver (prints numbers; not a test).
//!
//! ```sh
//! cargo bench -p provisioner --bench sim_scale --no-default-features
//! ```
//! (`--no-default-features` leaves the EC2 SDK out of the release build; the benchmark
//! does not need it.) `EPU_BENCH_NODES` (default 100000), `EPU_BENCH_DOMAINS` (default
//! 1000) and `EPU_BENCH_BATCH` (default nodes / domains: one launch per domain) change
//! the size; `EPU_BENCH_STORE=mem` uses the in-memory store instead of sled (to tell
//! sled's page cache from the provisioner's own memory).
//!
//! It provisions the nodes in launches of `batch`, round-robin over the domains,
//! through `Provisioner::provision` on an in-process bus whose controller queue is
//! drained by a counting consumer, over a sled store on disk, on the manual clock,
//! and reports:
//! * launch throughput: nodes/s from the first `provision` until every node is PENDING at
//!   the sim IaaS (write-ahead to the store, the IaaS call, REQUESTED and PENDING stored
//!   and published);
//! * boot throughput: one reconcile after the manual clock passes the boot time (every
//!   node PENDING → RUNNING);
//! * the store's bytes on disk and the process RSS (VmRSS) with every node record loaded;
//! * the change feed against the listings it replaces, each asked over the bus as a
//!   service would (`describe_nodes` / `dump_state` requests; bytes are the reply
//!   envelopes' JSON, time is request + decoding the typed reply, the RSS peak is
//!   VmHWM after resetting it through `/proc/self/clear_refs`, both sides of the bus
//!   being in this process):
//!   (a) a full resync (`since` 0, pages of 1,000) vs one unfiltered `dump_state` /
//!   `describe_nodes`; (b) a steady-state resync (`since` the head) vs the live
//!   listing the aggregator used to poll every 0.5 s; (c) the resync after 1% of the
//!   nodes change (one terminated per domain); (d) `prune_now` over 50,000 old terminal
//!   records, with the store's size and records before and after;
//! * terminate_nodes and terminate_all throughput.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epu_core::bus::local::LocalBus;
use epu_core::bus::{Bus, BusOptions, FnHandler, Incoming};
use epu_core::clock::ManualClock;
use epu_core::request::{self, Request};
use epu_core::store::{MemStore, SharedStore, SledStore};
use epu_core::wire::{Envelope, Op, ReplyBody, ReplyError, RunName, Service};
use epu_model::messages::{
    Deployable, DescribeNodesRequest, DumpStateRequest, NodeRecord, ProvisionRequest,
    SimDeployable, TerminateNodesRequest,
};
use epu_model::NodeState;
use provisioner::driver::sim::{SimDriver, SimSettings};
use provisioner::record::TREE;
use provisioner::{Drivers, Provisioner, ProvisionerConfig};
use serde_json::{json, Value};

/// The change feed's page, as the controller reads it.
const PAGE: usize = 1000;
/// How long any one wait of the bench may take.
const DEADLINE: Duration = Duration::from_secs(300);
/// The issue's target for a steady-state resync.
const TARGET_RESYNC_PER_DOMAIN: f64 = 1024.0;
/// How often the aggregator polled the live listing before the feed.
const OLD_POLL_SECS: f64 = 0.5;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Gives the allocator's free memory back to the OS, so that VmRSS is what is live
/// and a peak after it is memory newly taken (glibc; elsewhere nothing).
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false where that is refused.
fn reset_hwm() -> bool {
    trim();
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Counts the bytes serialized into it.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// One request over the bus, measured.
struct Called<T> {
    reply: T,
    /// The reply envelope's JSON, as it crossed the bus.
    bytes: usize,
    /// Request, serving, the reply, decoding it into its type.
    time: Duration,
    /// VmHWM after the call minus VmRSS before it (0 where VmHWM cannot be reset).
    peak_kib: u64,
    /// VmHWM after the call.
    hwm_kib: u64,
}

/// The caller's side of a service: sends `req` to the provisioner and decodes the
/// answer as its type, as `request::call` does, counting the reply's bytes.
async fn call<R: Request>(bus: &dyn Bus, req: &R) -> anyhow::Result<Called<R::Reply>> {
    let env = request::envelope(bus, "bench", req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hwm = reset_hwm();
    let before = rss_kib();
    let t0 = Instant::now();
    let v = bus
        .request(R::TO, &env, DEADLINE)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", R::OP))?;
    let t_request = t0.elapsed();
    // The reply envelope is the one the provisioner sent: its JSON with `null` for
    // a body, plus the body's JSON.
    let shell = Envelope::new(bus.run(), Op::Reply, "provisioner", Value::Null);
    let body = ReplyBody::Result(v);
    let bytes = json_len(&shell) - "null".len() + json_len(&body);
    let v = body.into_result().map_err(|e| anyhow::anyhow!("{e}"))?;
    let t1 = Instant::now();
    let reply = request::decode_reply::<R>(v).map_err(|e| anyhow::anyhow!("{e}"))?;
    let time = t_request + t1.elapsed();
    let hwm_kib = status_kib("VmHWM:");
    let peak_kib = if hwm {
        hwm_kib.saturating_sub(before)
    } else {
        0
    };
    Ok(Called {
        reply,
        bytes,
        time,
        peak_kib,
        hwm_kib,
    })
}

/// A read of the change feed from `since` to its head, page by page (what the
/// controller's resync does).
struct Feed {
    records: Vec<NodeRecord>,
    bytes: usize,
    pages: usize,
    time: Duration,
    /// The largest RSS peak of one page.
    page_peak_kib: u64,
    /// The highest VmHWM of a page minus VmRSS at the start: the pages and the
    /// records they brought.
    peak_kib: u64,
    next: u64,
    full: bool,
    /// A page said `more` but its `next` did not move past the `since` it was
    /// asked with: following it would ask the same page for ever.
    stuck: Option<String>,
}

async fn read_feed(bus: &dyn Bus, since: u64, domain: Option<&str>) -> anyhow::Result<Feed> {
    let hwm = reset_hwm();
    let start = rss_kib();
    let mut f = Feed {
        records: Vec::new(),
        bytes: 0,
        pages: 0,
        time: Duration::ZERO,
        page_peak_kib: 0,
        peak_kib: 0,
        next: since,
        full: false,
        stuck: None,
    };
    loop {
        let req = DescribeNodesRequest {
            domain: domain.map(str::to_string),
            ..DescribeNodesRequest::changes(f.next, PAGE)
        };
        let c = call(bus, &req).await?;
        if f.pages == 0 {
            f.full = c.reply.full;
        }
        f.pages += 1;
        f.bytes += c.bytes;
        f.time += c.time;
        f.page_peak_kib = f.page_peak_kib.max(c.peak_kib);
        if hwm {
            f.peak_kib = f.peak_kib.max(c.hwm_kib.saturating_sub(start));
        }
        let asked = f.next;
        f.next = c.reply.next;
        f.records.extend(c.reply.nodes);
        if !c.reply.more {
            break;
        }
        if c.reply.next <= asked && f.pages > 1 {
            f.stuck = Some(format!(
                "STUCK: page {} asked since {asked} was answered full={} from the start again (next {}, more); stopped after it",
                f.pages, c.reply.full, c.reply.next
            ));
            break;
        }
    }
    Ok(f)
}

/// A feed read that did not finish, said so.
fn stuck(f: &Feed) -> String {
    f.stuck
        .as_deref()
        .map(|s| format!(" — {s}"))
        .unwrap_or_default()
}

/// The provisioner's own work for `req`, in-process: `select` and the clone of
/// the records, no JSON (the time of each call, summed over the feed's pages).
async fn in_process(prov: &Provisioner, paged: bool) -> (Duration, usize) {
    let mut total = Duration::ZERO;
    let mut n = 0;
    let mut since = 0;
    loop {
        let req = if paged {
            DescribeNodesRequest::changes(since, PAGE)
        } else {
            DescribeNodesRequest::default()
        };
        let t = Instant::now();
        let r = prov.describe_nodes(req).await;
        total += t.elapsed();
        n += 1;
        if !paged || !r.more || r.next <= since {
            return (total, n);
        }
        since = r.next;
    }
}

/// The RSS peaks of one listing's two sides, apart, as the bus does each: the
/// provisioner's (`select`, the records' clone, the reply as a JSON value, the
/// envelope's value, its bytes) and the caller's (the bytes, parsed to a value,
/// the envelope, the typed reply). KiB over VmRSS before each.
async fn sides(
    prov: &Provisioner,
    run: &RunName,
    req: DescribeNodesRequest,
) -> anyhow::Result<(u64, u64)> {
    reset_hwm();
    let before = rss_kib();
    let reply = prov.describe_nodes(req).await;
    let v = request::reply::<DescribeNodesRequest>(&reply).map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(reply);
    let env = Envelope::with_body(run, Op::Reply, "provisioner", &ReplyBody::Result(v))?;
    let bytes = env.to_bytes()?;
    drop(env);
    let provisioner_side = status_kib("VmHWM:").saturating_sub(before);
    reset_hwm();
    let before = rss_kib().saturating_sub(bytes.len() as u64 / 1024);
    let dest = epu_core::wire::Destination {
        run,
        service: None,
        secret: None,
    };
    let env = epu_core::wire::decode(&bytes, &Default::default(), dest)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(bytes);
    let body: ReplyBody = serde_json::from_value(env.body)?;
    let v = body.into_result().map_err(|e| anyhow::anyhow!("{e}"))?;
    let typed =
        request::decode_reply::<DescribeNodesRequest>(v).map_err(|e| anyhow::anyhow!("{e}"))?;
    let caller_side = status_kib("VmHWM:").saturating_sub(before);
    drop(typed);
    Ok((provisioner_side, caller_side))
}

async fn wait_for(prov: &Provisioner, state: NodeState, n: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let have = prov.counts().await.get(&state).copied().unwrap_or(0);
        if have >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("waited {DEADLINE:?} for {n} nodes {state}, have {have}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Node and launch records in the store, and node records in memory.
async fn records(store: &SharedStore, prov: &Provisioner) -> anyhow::Result<(usize, usize, i64)> {
    let s = store.clone();
    let (nodes, launches) = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((
            s.scan_prefix(TREE, "node/")?.len(),
            s.scan_prefix(TREE, "launch/")?.len(),
        ))
    })
    .await??;
    let memory = prov.counts().await.values().sum();
    Ok((nodes, launches, memory))
}

fn main() -> anyhow::Result<()> {
    let nodes = env_num("EPU_BENCH_NODES", 100_000);
    let domains = env_num("EPU_BENCH_DOMAINS", 1000).clamp(1, nodes.max(1));
    let batch = env_num("EPU_BENCH_BATCH", (nodes / domains).max(1)).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        let store_path = dir.path().join("store");
        let mem = std::env::var("EPU_BENCH_STORE").is_ok_and(|v| v == "mem");
        let store: SharedStore = if mem {
            Arc::new(MemStore::new())
        } else {
            Arc::new(SledStore::open(&store_path)?)
        };
        let run = RunName::new("bench")?;
        let bus = LocalBus::new(run.clone(), BusOptions::new("bench"));
        let client = bus.view(BusOptions::new("bench-client"));
        let received = Arc::new(AtomicU64::new(0));
        let r = received.clone();
        let consumer = bus
            .serve(
                Service::Controller,
                Arc::new(FnHandler(move |_m: Incoming| {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::Relaxed);
                        Ok::<Value, ReplyError>(json!({}))
                    }
                })),
            )
            .await?;
        let clock = ManualClock::default();
        let sim = Arc::new(SimDriver::new(
            clock.shared(),
            SimSettings { boot_secs: 60.0, failure_rate: 0.0, seed: 1 },
        ));
        let mut cfg = ProvisionerConfig::new(run.clone());
        cfg.poll_interval_secs = 3600.0;
        cfg.drivers.local.enabled = false;
        let retention = Duration::from_secs_f64(cfg.record_retention_secs);
        let prov = Provisioner::new(
            cfg,
            Arc::new(bus.view(BusOptions::new("provisioner"))),
            store.clone(),
            clock.shared(),
            Drivers::new().with(sim.clone()),
        )?;
        let running = prov.start().await?;
        let rss_before = rss_kib();

        let t0 = Instant::now();
        let mut launched = 0usize;
        let mut i = 0usize;
        while launched < nodes {
            let count = batch.min(nodes - launched);
            prov.provision(ProvisionRequest {
                launch_id: format!("launch-{i}"),
                domain: format!("d{}", i % domains),
                count: count as i64,
                node_ids: vec![],
                deployable: Deployable::Sim(SimDeployable::default()),
                vars: Default::default(),
                subscriber: None,
                check_only: false,
            })
            .await
            .map_err(|e| anyhow::anyhow!("provision: {e}"))?;
            launched += count;
            i += 1;
        }
        let t_accepted = t0.elapsed();
        wait_for(&prov, NodeState::Pending, nodes as i64).await?;
        let t_launch = t0.elapsed();

        clock.advance(Duration::from_secs(61));
        let t1 = Instant::now();
        prov.reconcile_now().await;
        wait_for(&prov, NodeState::Running, nodes as i64).await?;
        let t_boot = t1.elapsed();

        // Every state change reached the controller queue: REQUESTING, REQUESTED,
        // PENDING, RUNNING.
        let expected = 4 * nodes as u64;
        let t2 = Instant::now();
        while received.load(Ordering::Relaxed) < expected && t2.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered = received.load(Ordering::Relaxed);
        store.flush()?;
        let store_bytes = dir_bytes(&store_path);
        let rss_loaded = rss_kib();

        let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        let per_domain = |b: usize| b as f64 / domains as f64;
        println!("sim_scale: {nodes} nodes over {domains} domains in launches of {batch}, {} store, manual clock", if mem { "in-memory" } else { "sled" });
        println!("  provision accepted (stored)   {:>8.2} s  {:>10.0} nodes/s", t_accepted.as_secs_f64(), per_s(nodes, t_accepted));
        println!("  launched (all PENDING)        {:>8.2} s  {:>10.0} nodes/s", t_launch.as_secs_f64(), per_s(nodes, t_launch));
        println!("  booted (one reconcile→RUNNING){:>8.2} s  {:>10.0} nodes/s", t_boot.as_secs_f64(), per_s(nodes, t_boot));
        println!("  instance_info delivered       {delivered} of {expected}");
        println!("  store on disk                 {:>8.1} MiB ({store_bytes} bytes, {:.0} B/node)", store_bytes as f64 / 1048576.0, store_bytes as f64 / nodes as f64);
        println!("  RSS                           {:>8.1} MiB at {nodes} records (was {:.1} MiB before launching)", mib(rss_loaded), mib(rss_before));
        if !reset_hwm() {
            println!("  (VmHWM cannot be reset here: the RSS peaks below read 0)");
        }

        // (a) A full resync: the feed from 0 in pages, against one listing of everything.
        let full = read_feed(&client, 0, None).await?;
        let sizes: Vec<usize> = full.records.iter().map(json_len).collect();
        let rec_avg = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
        let rec_min = sizes.iter().min().copied().unwrap_or(0);
        let rec_max = sizes.iter().max().copied().unwrap_or(0);
        let head = full.next;
        // One node per domain for (c), 49 more per domain for (d).
        let mut by_domain: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in &full.records {
            by_domain.entry(r.domain.clone()).or_default().push(r.node_id.clone());
        }
        let full_records = full.records.len();
        let full_stuck = stuck(&full);
        drop(full.records);
        let dump = call(&client, &DumpStateRequest::default()).await?;
        let dump_nodes = dump.reply.nodes.len();
        let dump_launches = dump.reply.launches.len();
        drop(dump.reply);
        let list = call(&client, &DescribeNodesRequest::default()).await?;
        let list_nodes = list.reply.nodes.len();
        drop(list.reply);
        let live = call(&client, &DescribeNodesRequest { live_only: true, ..Default::default() }).await?;
        let live_nodes = live.reply.nodes.len();
        drop(live.reply);
        // Per domain: a domain's own listing, and its own feed from 0 (each scans
        // every record or the whole revision index to find its 1/domains).
        let dom_list = call(&client, &DescribeNodesRequest { domain: Some("d0".into()), ..Default::default() }).await?;
        let dom_feed = read_feed(&client, 0, Some("d0")).await?;
        let rss_after_listings = rss_kib();
        let (sel_pages, n_pages) = in_process(&prov, true).await;
        let (sel_full, _) = in_process(&prov, false).await;
        let (live_prov_kib, live_caller_kib) =
            sides(&prov, &run, DescribeNodesRequest { live_only: true, ..Default::default() }).await?;
        println!();
        println!("  NodeRecord JSON (a RUNNING sim node): avg {rec_avg:.0} B, min {rec_min} B, max {rec_max} B");
        println!("  (a) full resync, as the controller starts: describe_nodes since 0 in pages of {PAGE}");
        println!("      feed, {} pages, {full_records} records (full={}): {:>10} in {:>8.1} ms; RSS peak +{:.1} MiB with the records it brought (largest page alone +{:.1} MiB)",
            full.pages,
            full.full,
            human(full.bytes),
            ms(full.time),
            mib(full.peak_kib),
            mib(full.page_peak_kib)
        );
        if !full_stuck.is_empty() {
            println!("     {full_stuck}");
        }
        println!("      vs one dump_state, no filters ({dump_nodes} records, {dump_launches} launches): {:>10} in {:>8.1} ms; RSS peak +{:.1} MiB",
            human(dump.bytes), ms(dump.time), mib(dump.peak_kib));
        println!("      vs one describe_nodes, no filters ({list_nodes} records):            {:>10} in {:>8.1} ms; RSS peak +{:.1} MiB",
            human(list.bytes), ms(list.time), mib(list.peak_kib));
        println!("      one domain's own: listing {{domain}} {} records {} in {:.2} ms; feed {{domain, since 0}} {} records {} in {:.2} ms ({} page(s))",
            dom_list.reply.nodes.len(), human(dom_list.bytes), ms(dom_list.time), dom_feed.records.len(), human(dom_feed.bytes), ms(dom_feed.time), dom_feed.pages);
        println!("      the provisioner's part alone (in-process describe_nodes: select + cloning the records, no JSON): feed {n_pages} pages {:.1} ms, one listing {:.1} ms",
            ms(sel_pages), ms(sel_full));
        println!("      (RSS after the listings: {:.1} MiB)", mib(rss_after_listings));

        // (b) Steady state: nothing changed since the head.
        let steady = read_feed(&client, head, None).await?;
        let steady_dom = read_feed(&client, head, Some("d0")).await?;
        let poll_per_s = live.bytes as f64 / OLD_POLL_SECS;
        println!("  (b) steady state, nothing changed");
        println!("      feed since head (whole run, one page, {} records): {} in {:.2} ms = {:.1} B per domain per resync (target < {TARGET_RESYNC_PER_DOMAIN:.0} B: {})",
            steady.records.len(), human(steady.bytes), ms(steady.time), per_domain(steady.bytes),
            if per_domain(steady.bytes) < TARGET_RESYNC_PER_DOMAIN { "met" } else { "NOT met" });
        println!("      (one domain asking for itself {{domain, since head}}: {} in {:.2} ms)", human(steady_dom.bytes), ms(steady_dom.time));
        println!("      vs the full live listing, as the aggregator polled before (describe_nodes live_only, {live_nodes} records): {} in {:.1} ms per poll = {:.1} KiB per domain per poll, {:.1} MiB/s at one poll per {OLD_POLL_SECS} s; RSS peak +{:.1} MiB per poll",
            human(live.bytes), ms(live.time), per_domain(live.bytes) / 1024.0, poll_per_s / 1048576.0, mib(live.peak_kib));
        println!("      the live listing's RSS peak, side by side: provisioner +{:.1} MiB (records, reply value, envelope value, bytes), caller (aggregator) +{:.1} MiB (bytes, value, typed reply)",
            mib(live_prov_kib), mib(live_caller_kib));

        // (c) 1% of the nodes change: one per domain is terminated.
        let changed: Vec<String> = by_domain.values().filter_map(|ids| ids.first().cloned()).collect();
        let n_changed = changed.len();
        let tc = Instant::now();
        prov.terminate_nodes(TerminateNodesRequest { node_ids: changed, domain: None })
            .await
            .map_err(|e| anyhow::anyhow!("terminate_nodes: {e}"))?;
        wait_for(&prov, NodeState::Terminated, n_changed as i64).await?;
        let t_changed = tc.elapsed();
        let diff = read_feed(&client, head, None).await?;
        let live_after = call(&client, &DescribeNodesRequest { live_only: true, ..Default::default() }).await?;
        let live_after_nodes = live_after.reply.nodes.len();
        drop(live_after.reply);
        println!("  (c) after {n_changed} nodes ({:.1}%) were terminated (one per domain; {:.2} s to TERMINATED, revision {} → {})",
            100.0 * n_changed as f64 / nodes as f64, t_changed.as_secs_f64(), head, diff.next);
        println!("      feed since the old head: {} records in {} pages, {} in {:.1} ms = {:.1} B per domain (target < {TARGET_RESYNC_PER_DOMAIN:.0} B: {})",
            diff.records.len(), diff.pages, human(diff.bytes), ms(diff.time), per_domain(diff.bytes),
            if per_domain(diff.bytes) < TARGET_RESYNC_PER_DOMAIN { "met" } else { "NOT met" });
        println!("      vs the full live listing now ({live_after_nodes} records): {} in {:.1} ms", human(live_after.bytes), ms(live_after.time));
        let head = diff.next;
        drop(diff);

        // (d) Pruning: 49 more per domain terminated (50,000 with (c)'s), then the
        // clock passes the retention; the still RUNNING half stays.
        let more: Vec<String> = by_domain
            .values()
            .flat_map(|ids| ids.iter().skip(1).take((ids.len() / 2).saturating_sub(1)).cloned())
            .collect();
        let n_more = more.len();
        let tt = Instant::now();
        for chunk in more.chunks(PAGE) {
            prov.terminate_nodes(TerminateNodesRequest { node_ids: chunk.to_vec(), domain: None })
                .await
                .map_err(|e| anyhow::anyhow!("terminate_nodes: {e}"))?;
        }
        let terminal = (n_changed + n_more) as i64;
        wait_for(&prov, NodeState::Terminated, terminal).await?;
        let t_more = tt.elapsed();
        clock.advance(retention + Duration::from_secs(60));
        store.flush()?;
        let disk_before = dir_bytes(&store_path);
        let (store_nodes_before, store_launches_before, mem_before) = records(&store, &prov).await?;
        let rss_prune_before = rss_kib();
        let tp = Instant::now();
        let pruned = prov.prune_now().await;
        let t_prune = tp.elapsed();
        store.flush()?;
        let disk_after = dir_bytes(&store_path);
        let (store_nodes_after, store_launches_after, mem_after) = records(&store, &prov).await?;
        let rss_prune_after = rss_kib();
        let now_head = call(&client, &DescribeNodesRequest { node_ids: vec!["-".into()], ..Default::default() })
            .await?
            .reply
            .revision;
        let after_prune_steady = read_feed(&client, now_head, None).await?;
        let after_prune_old = read_feed(&client, head, None).await?;
        let after_prune_full = read_feed(&client, 0, None).await?;
        println!("  (d) pruning {terminal} terminal records older than the retention ({:.0} s); {} RUNNING kept", retention.as_secs_f64(), nodes as i64 - terminal);
        println!("      terminate_nodes of {n_more} more, in requests of {PAGE}: {:.2} s, {:.0} nodes/s", t_more.as_secs_f64(), per_s(n_more, t_more));
        println!("      prune_now: {pruned} records in {:.1} ms ({:.0} records/s)", ms(t_prune), per_s(pruned, t_prune));
        println!("      store records before → after: nodes {store_nodes_before} → {store_nodes_after}, launches {store_launches_before} → {store_launches_after}; in memory {mem_before} → {mem_after}");
        println!("      store on disk before → after: {:.1} → {:.1} MiB; RSS {:.1} → {:.1} MiB",
            disk_before as f64 / 1048576.0, disk_after as f64 / 1048576.0, mib(rss_prune_before), mib(rss_prune_after));
        println!("      after it, the feed: since the head ({now_head}): {} records, {}; since {head} (before what was pruned): full={}, {} pages, {} records, {}{}",
            after_prune_steady.records.len(), human(after_prune_steady.bytes), after_prune_old.full, after_prune_old.pages, after_prune_old.records.len(), human(after_prune_old.bytes), stuck(&after_prune_old));
        println!("      a full resync (since 0), as a controller starting now: {} pages, {} records of {mem_after}, {} in {:.1} ms{}",
            after_prune_full.pages, after_prune_full.records.len(), human(after_prune_full.bytes), ms(after_prune_full.time), stuck(&after_prune_full));
        drop((after_prune_old, after_prune_full));

        let left = nodes - terminal as usize;
        let t3 = Instant::now();
        prov.terminate_all().await.map_err(|e| anyhow::anyhow!("terminate_all: {e}"))?;
        wait_for(&prov, NodeState::Terminated, left as i64).await?;
        let t_term = t3.elapsed();
        println!("  terminate_all (the {left} still RUNNING →TERMINATED) {:>8.2} s  {:>10.0} nodes/s", t_term.as_secs_f64(), per_s(left, t_term));
        running.stop().await;
        consumer.stop().await;
        Ok::<(), anyhow::Error>(())
    })
}
