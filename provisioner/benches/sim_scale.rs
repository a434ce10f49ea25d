//! Scale benchmark of the provisioner with the sim driver (prints numbers; not a test).
//!
//! ```sh
//! cargo bench -p provisioner --bench sim_scale --no-default-features
//! ```
//! (`--no-default-features` leaves the EC2 SDK out of the release build; the benchmark
//! does not need it.) `EPU_BENCH_NODES` (default 100000) and `EPU_BENCH_BATCH` (default
//! 1000 nodes per launch) change the size; `EPU_BENCH_STORE=mem` uses the in-memory
//! store instead of sled (to tell sled's page cache from the provisioner's own memory).
//!
//! It provisions the nodes in launches of `batch` through `Provisioner::provision` on an
//! in-process bus whose controller queue is drained by a counting consumer, over a sled
//! store on disk, and reports:
//! * launch throughput: nodes/s from the first `provision` until every node is PENDING at
//!   the sim IaaS (write-ahead to the store, the IaaS call, REQUESTED and PENDING stored
//!   and published);
//! * boot throughput: one reconcile after the manual clock passes the boot time (every
//!   node PENDING → RUNNING);
//! * terminate_all throughput;
//! * the store's bytes on disk and the process RSS (VmRSS) with every node record loaded.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epu_core::bus::local::LocalBus;
use epu_core::bus::{Bus, BusOptions, FnHandler, Incoming};
use epu_core::clock::ManualClock;
use epu_core::store::{MemStore, SharedStore, SledStore};
use epu_core::wire::{ReplyError, RunName, Service};
use epu_model::messages::{Deployable, ProvisionRequest, SimDeployable};
use epu_model::NodeState;
use provisioner::driver::sim::{SimDriver, SimSettings};
use provisioner::{Drivers, Provisioner, ProvisionerConfig};
use serde_json::{json, Value};

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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn wait_for(prov: &Provisioner, state: NodeState, n: i64) {
    loop {
        if prov.counts().await.get(&state).copied().unwrap_or(0) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let nodes = env_num("EPU_BENCH_NODES", 100_000);
    let batch = env_num("EPU_BENCH_BATCH", 1000).max(1);
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
                domain: "bench".into(),
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
        wait_for(&prov, NodeState::Pending, nodes as i64).await;
        let t_launch = t0.elapsed();

        clock.advance(Duration::from_secs(61));
        let t1 = Instant::now();
        prov.reconcile_now().await;
        wait_for(&prov, NodeState::Running, nodes as i64).await;
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

        let t3 = Instant::now();
        prov.terminate_all().await.map_err(|e| anyhow::anyhow!("terminate_all: {e}"))?;
        wait_for(&prov, NodeState::Terminated, nodes as i64).await;
        let t_term = t3.elapsed();

        let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        println!("sim_scale: {nodes} nodes in launches of {batch}, {} store", if mem { "in-memory" } else { "sled" });
        println!("  provision accepted (stored)   {:>8.2} s  {:>10.0} nodes/s", t_accepted.as_secs_f64(), per_s(nodes, t_accepted));
        println!("  launched (all PENDING)        {:>8.2} s  {:>10.0} nodes/s", t_launch.as_secs_f64(), per_s(nodes, t_launch));
        println!("  booted (one reconcile→RUNNING){:>8.2} s  {:>10.0} nodes/s", t_boot.as_secs_f64(), per_s(nodes, t_boot));
        println!("  terminate_all (→TERMINATED)   {:>8.2} s  {:>10.0} nodes/s", t_term.as_secs_f64(), per_s(nodes, t_term));
        println!("  instance_info delivered       {delivered} of {expected}");
        println!("  store on disk                 {:>8.1} MiB ({store_bytes} bytes, {:.0} B/node)", store_bytes as f64 / 1048576.0, store_bytes as f64 / nodes as f64);
        println!("  RSS                           {:>8.1} MiB at {nodes} records (was {:.1} MiB before launching)", rss_loaded as f64 / 1024.0, rss_before as f64 / 1024.0);
        running.stop().await;
        consumer.stop().await;
        Ok::<(), anyhow::Error>(())
    })
}
