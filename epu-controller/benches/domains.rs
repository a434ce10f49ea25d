//! 1,000 domains in one controller: how fast does an event become a `provision`?
//!
//! `cargo bench -p epu-controller --bench domains`. In-process bus, a stand-in
//! provisioner that records when each `provision` arrives and reports each new
//! node RUNNING with the next revision, in constant time per request (the
//! testkit's `FakeProvisioner` searches every node and provision it holds on
//! each `provision`, which made the rounds slower with every round: the bench
//! measured the fake). Prints the
//! event-to-provision latency (p50/p99) for one failure at a time, and the wall
//! time of a decision round across all domains (a failure in every domain at once
//! until every domain has asked for its replacement) over `EPU_BENCH_ROUNDS`
//! rounds (default 20): p50 and max beside the 50 ms target, each domain's time
//! within a round, and the time spent inside `Domain::decide` (its histogram).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decision_engines::Registry;
use epu_controller::{Controller, ControllerDeps, ControllerSetup, DomainPolicy, Timing};
use epu_core::bus::local::LocalBus;
use epu_core::bus::Bus;
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::{Health, Metrics};
use epu_core::testing::{test_options, test_run};
use epu_core::wire::{Envelope, Op, RunName, Service};
use epu_model::messages::NodeRecord;
use epu_model::NodeState;
use epu_testkit::node;
use serde_json::json;

use lean::LeanProvisioner as FakeProvisioner;

/// A provisioner that answers what the controller asks in constant time.
mod lean {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Instant;

    use epu_core::bus::{Bus, FnHandler, Incoming, Server};
    use epu_core::request::{self, Request};
    use epu_core::wire::{Envelope, Op, ReplyError, Service};
    use epu_model::messages::{
        DescribeNodesReply, DescribeNodesRequest, DumpStateReply, DumpStateRequest, EnableReply,
        EnableRequest, ProvisionReply, ProvisionRequest, TerminateNodesReply,
        TerminateNodesRequest,
    };
    use epu_model::NodeState;
    use epu_testkit::node;
    use serde_json::Value;

    /// One `provision` as it arrived.
    #[derive(Clone, Debug)]
    pub struct Provisioned {
        pub at: Instant,
        pub domain: String,
    }

    #[derive(Default)]
    struct State {
        arrived: Vec<Provisioned>,
        launches: HashSet<String>,
        /// Each domain's newest node.
        newest: HashMap<String, String>,
        revision: u64,
    }

    struct Inner {
        bus: Arc<dyn Bus>,
        state: Mutex<State>,
    }

    pub struct LeanProvisioner {
        inner: Arc<Inner>,
        server: Server,
    }

    fn answer<R: Request>(r: &R::Reply) -> Result<Value, ReplyError> {
        request::reply::<R>(r)
    }

    impl Inner {
        fn lock(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        async fn handle(&self, msg: Incoming) -> Result<Value, ReplyError> {
            let env = msg.envelope;
            let run = self.bus.run().clone();
            match env.op {
                Op::Provision => {
                    let req: ProvisionRequest = request::body(&env)?;
                    let at = Instant::now();
                    let mut created = Vec::new();
                    if !req.check_only {
                        let mut g = self.lock();
                        if g.launches.insert(req.launch_id.clone()) {
                            let ids: Vec<String> = if req.node_ids.is_empty() {
                                (0..req.count.max(0))
                                    .map(|i| format!("{}-{i}", req.launch_id))
                                    .collect()
                            } else {
                                req.node_ids.clone()
                            };
                            for id in &ids {
                                g.revision += 1;
                                created.push(
                                    node(&req.domain, id)
                                        .run(&run)
                                        .launch(&req.launch_id)
                                        .driver("sim")
                                        .iaas(&format!("i-{id}"))
                                        .state(NodeState::Running)
                                        .revision(g.revision)
                                        .build(),
                                );
                            }
                            if let Some(first) = ids.first() {
                                g.newest.insert(req.domain.clone(), first.clone());
                                g.arrived.push(Provisioned {
                                    at,
                                    domain: req.domain.clone(),
                                });
                            }
                        }
                    }
                    for r in &created {
                        let e = Envelope::with_body(&run, Op::InstanceInfo, "provisioner", r)
                            .map_err(|e| ReplyError::internal(e.to_string()))?;
                        self.bus
                            .send(Service::Controller, &e)
                            .await
                            .map_err(|e| ReplyError::internal(e.to_string()))?;
                    }
                    answer::<ProvisionRequest>(&ProvisionReply {
                        launch_id: req.launch_id,
                        nodes: created,
                    })
                }
                Op::TerminateNodes => {
                    let req: TerminateNodesRequest = request::body(&env)?;
                    answer::<TerminateNodesRequest>(&TerminateNodesReply {
                        terminating: req.node_ids,
                        unknown: Vec::new(),
                    })
                }
                Op::DescribeNodes => {
                    let req: DescribeNodesRequest = request::body(&env)?;
                    let revision = self.lock().revision;
                    let since = req.since.unwrap_or(0);
                    // Every change was published; a resync brings nothing new.
                    answer::<DescribeNodesRequest>(&DescribeNodesReply {
                        enabled: true,
                        nodes: Vec::new(),
                        revision,
                        next: revision,
                        more: false,
                        full: since == 0 || since > revision,
                    })
                }
                Op::DumpState => {
                    let _: DumpStateRequest = request::body(&env)?;
                    let revision = self.lock().revision;
                    answer::<DumpStateRequest>(&DumpStateReply {
                        run: run.to_string(),
                        enabled: true,
                        drivers: vec!["sim".into()],
                        counts: Default::default(),
                        launches: Vec::new(),
                        nodes: Vec::new(),
                        revision,
                    })
                }
                Op::Enable => answer::<EnableRequest>(&EnableReply { enabled: true }),
                op => Err(ReplyError::bad_request(format!(
                    "the bench's provisioner does not serve {op}"
                ))),
            }
        }
    }

    impl LeanProvisioner {
        pub async fn serve(bus: Arc<dyn Bus>) -> Result<Self, epu_core::bus::BusError> {
            let inner = Arc::new(Inner {
                bus: bus.clone(),
                state: Mutex::new(State::default()),
            });
            let h = inner.clone();
            let server = bus
                .serve(
                    Service::Provisioner,
                    Arc::new(FnHandler(move |m: Incoming| {
                        let h = h.clone();
                        async move { h.handle(m).await }
                    })),
                )
                .await?;
            Ok(LeanProvisioner { inner, server })
        }

        pub fn provision_count(&self) -> usize {
            self.inner.lock().arrived.len()
        }

        /// The `provision`s received after the first `skip`.
        pub fn provisions_from(&self, skip: usize) -> Vec<Provisioned> {
            self.inner
                .lock()
                .arrived
                .get(skip..)
                .map(<[Provisioned]>::to_vec)
                .unwrap_or_default()
        }

        /// Each domain's newest node.
        pub fn newest(&self) -> HashMap<String, String> {
            self.inner.lock().newest.clone()
        }

        pub async fn stop(self) {
            self.server.stop().await;
        }
    }
}

const DOMAINS: usize = 1000;
/// The target for a decision round across every domain.
const TARGET_ROUND: Duration = Duration::from_millis(50);
/// How long any one wait of the bench may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Waits (up to `DEADLINE`) until `prov` has received `want` provisions.
async fn wait_provisions(prov: &FakeProvisioner, want: usize) {
    let deadline = Instant::now() + DEADLINE;
    while prov.provision_count() < want {
        if Instant::now() >= deadline {
            panic!(
                "waited {DEADLINE:?} for {want} provisions, got {}",
                prov.provision_count()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A failure of each domain's most recent node, as the provisioner would report it.
fn failures(prov: &FakeProvisioner, run: &RunName) -> HashMap<String, NodeRecord> {
    prov.newest()
        .into_iter()
        .map(|(domain, id)| {
            let failed = node(&domain, &id)
                .run(run)
                .launch("x")
                .state(NodeState::Failed)
                .build();
            (domain, failed)
        })
        .collect()
}

/// The decisions made and the seconds spent in them so far, from the
/// `epu_controller_decision_seconds` histogram (every engine).
fn decide_totals(metrics: &Metrics) -> (u64, f64) {
    let text = metrics.encode().expect("encode metrics");
    let (mut count, mut sum) = (0u64, 0.0f64);
    for line in text.lines() {
        let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if line.starts_with("epu_controller_decision_seconds_count") {
            count += value().unwrap_or(0.0) as u64;
        } else if line.starts_with("epu_controller_decision_seconds_sum") {
            sum += value().unwrap_or(0.0);
        }
    }
    (count, sum)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let run = test_run("bench");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = FakeProvisioner::serve(Arc::new(bus.view(test_options("provisioner"))))
        .await
        .expect("serve the fake provisioner");
    let metrics = Metrics::new();
    let mut policies = BTreeMap::new();
    for i in 0..DOMAINS {
        let p: DomainPolicy = serde_json::from_value(json!({
            "name": format!("d{i}"), "engine": "npreserving",
            "engine_conf": {"preserve_n": 1}, "deployable": {"driver": "sim"},
        }))
        .expect("policy");
        policies.insert(p.name.clone(), p);
    }
    let server = Controller::new(
        ControllerSetup {
            run: run.clone(),
            policies,
            timing: Timing {
                decision_interval_secs: 30.0,
                debounce_ms: 0,
                request_timeout_secs: 10.0,
                ..Default::default()
            },
        },
        ControllerDeps {
            bus: Arc::new(bus.view(test_options("epu-controller"))),
            store: Arc::new(MemStore::new()),
            clock: SystemClock::shared(),
            metrics: metrics.clone(),
            readiness: Health::new(),
            registry: Registry::with_builtins(),
        },
    )
    .expect("controller")
    .start()
    .await
    .expect("controller");
    wait_provisions(&prov, DOMAINS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One event at a time: a node fails; time until that domain's provision arrives.
    let mut latencies = Vec::with_capacity(DOMAINS);
    let mut failed = failures(&prov, &run);
    for i in 0..DOMAINS {
        let domain = format!("d{i}");
        let f = failed.remove(&domain).expect("a node of every domain");
        let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", &f).expect("enc");
        let before = prov.provision_count();
        let t0 = Instant::now();
        bus.send(Service::Controller, &e).await.expect("send");
        let deadline = t0 + DEADLINE;
        loop {
            if prov.provision_count() > before {
                if let Some(p) = prov
                    .provisions_from(before)
                    .into_iter()
                    .find(|p| p.domain == domain)
                {
                    latencies.push(p.at.duration_since(t0));
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!("waited {DEADLINE:?} for the replacement provision of {domain}");
            }
            tokio::task::yield_now().await;
        }
    }
    latencies.sort();

    // Rounds: every domain loses its node at once; the round ends when every domain
    // has decided and asked for its replacement.
    let rounds = std::env::var("EPU_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize)
        .max(1);
    let mut round_times = Vec::with_capacity(rounds);
    let mut send_times = Vec::with_capacity(rounds);
    let mut in_round = Vec::with_capacity(rounds * DOMAINS);
    let mut decide_sums = Vec::with_capacity(rounds);
    let mut decide_counts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let failed = failures(&prov, &run);
        let (count0, sum0) = decide_totals(&metrics);
        let before = prov.provision_count();
        let t0 = Instant::now();
        for f in failed.values() {
            let e = Envelope::with_body(&run, Op::InstanceInfo, "bench", f).expect("enc");
            bus.send(Service::Controller, &e).await.expect("send");
        }
        send_times.push(t0.elapsed());
        wait_provisions(&prov, before + DOMAINS).await;
        let mut firsts: HashMap<String, Duration> = HashMap::new();
        for p in prov.provisions_from(before) {
            firsts.entry(p.domain).or_insert(p.at.duration_since(t0));
        }
        round_times.push(firsts.values().copied().max().unwrap_or_default());
        in_round.extend(firsts.into_values());
        let (count1, sum1) = decide_totals(&metrics);
        decide_counts.push(count1.saturating_sub(count0));
        decide_sums.push(Duration::from_secs_f64((sum1 - sum0).max(0.0)));
        // Let the round's store writes and metrics settle before the next.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first_round = round_times[0];
    let in_order: Vec<String> = round_times
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    let per_round_decisions: Vec<String> = decide_counts.iter().map(u64::to_string).collect();
    round_times.sort();
    send_times.sort();
    in_round.sort();
    decide_sums.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = percentile(&round_times, 0.50);
    let max = round_times.last().copied().unwrap_or_default();
    let verdict = |d: Duration| if d < TARGET_ROUND { "met" } else { "NOT met" };
    println!(
        "controller with {DOMAINS} domains (npreserving, in-process bus, {} cores)",
        cores()
    );
    println!(
        "event-to-provision latency, one failure at a time: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!(
        "decision round across all {DOMAINS} domains (a failure in every domain at once, until every domain's replacement provision), {rounds} rounds:"
    );
    println!(
        "  round: p50 {:.1} ms, max {:.1} ms (first {:.1} ms) vs target < {:.0} ms: p50 {}, max {}",
        ms(p50),
        ms(max),
        ms(first_round),
        ms(TARGET_ROUND),
        verdict(p50),
        verdict(max)
    );
    println!(
        "  of which sending the {DOMAINS} instance_info: p50 {:.1} ms, max {:.1} ms",
        ms(percentile(&send_times, 0.50)),
        ms(send_times.last().copied().unwrap_or_default())
    );
    println!(
        "  each domain, event sent to its provision within a round: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&in_round, 0.50)),
        ms(percentile(&in_round, 0.99)),
        ms(in_round.last().copied().unwrap_or_default())
    );
    println!("  rounds in order (ms): {}", in_order.join(" "));
    println!(
        "  decisions per round (the failure's, and the new node's report): {}",
        per_round_decisions.join(" ")
    );
    let decided: u64 = decide_counts.iter().sum();
    let spent: Duration = decide_sums.iter().sum();
    println!(
        "  wall time inside Domain::decide (epu_controller_decision_seconds; the domains' tasks interleave, so the sum exceeds the round) per round: p50 {:.1} ms summed over the domains ({} decisions in all rounds, {:.1} µs each on average)",
        ms(percentile(&decide_sums, 0.50)),
        decided,
        spent.as_secs_f64() * 1e6 / decided.max(1) as f64
    );
    server.stop().await;
    prov.stop().await;
}
