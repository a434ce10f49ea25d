//! The domain's pipeline against a recording bus, a store that can be made to fail,
//! a scripted engine and a manual clock: what is sent, stored and remembered.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::TimeZone;
use decision_engines::{ConfigError, Control, EngineError, EngineReport, LaunchSpec, State};
use epu_core::bus::{BusError, DeadLetter, Handler, Server};
use epu_core::clock::ManualClock;
use epu_core::store::MemStore;
use epu_core::wire::{Envelope, Headers, Op, Service};
use epu_model::messages::{ProvisionRequest, TerminateNodesRequest};
use epu_testkit::records::node;
use serde_json::json;

/// How long a test waits on a domain task's answer.
const T: Duration = Duration::from_secs(10);

use super::*;

// ---- test doubles -----------------------------------------------------------------

/// A [`MemStore`] whose writes, or reads, fail when told to.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: MemStore,
    fail_writes: AtomicBool,
    /// Reads of these trees fail.
    fail_reads: Mutex<Vec<&'static str>>,
}

fn broken(op: &'static str, tree: &str) -> StoreError {
    StoreError::Backend {
        op,
        tree: tree.to_string(),
        source: "disk full (test)".into(),
    }
}

impl FlakyStore {
    fn write(&self, op: &'static str, tree: &str) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(broken(op, tree));
        }
        Ok(())
    }

    fn read(&self, op: &'static str, tree: &str) -> Result<(), StoreError> {
        let failing = self
            .fail_reads
            .lock()
            .map(|t| t.contains(&tree))
            .unwrap_or(true);
        if failing {
            return Err(broken(op, tree));
        }
        Ok(())
    }

    fn launch_keys(&self) -> Vec<String> {
        self.inner
            .scan(LAUNCHES_TREE)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

impl Store for FlakyStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("get", tree)?;
        self.inner.get(tree, key)
    }
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write("put", tree)?;
        self.inner.put(tree, key, value)
    }
    fn write_batch(
        &self,
        tree: &str,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        self.write("write_batch", tree)?;
        self.inner.write_batch(tree, puts, deletes)
    }
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        self.write("delete", tree)?;
        self.inner.delete(tree, key)
    }
    fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read("scan", tree)?;
        self.inner.scan(tree)
    }
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read("scan", tree)?;
        self.inner.scan_prefix(tree, prefix)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.write("flush", "")
    }
}

/// One message the domain sent, with the launches stored at that moment.
#[derive(Clone, Debug)]
struct Sent {
    op: Op,
    /// `provision`: its launch id; `terminate_nodes`: empty.
    launch_id: String,
    node_ids: Vec<String>,
    stored_launches: Vec<String>,
}

/// A bus that records what is sent to the provisioner (and can refuse to send).
struct RecordingBus {
    run: RunName,
    store: Arc<FlakyStore>,
    sent: Mutex<Vec<Sent>>,
    fail_sends: AtomicBool,
}

impl RecordingBus {
    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl Bus for RecordingBus {
    fn run(&self) -> &RunName {
        &self.run
    }

    async fn send(&self, _to: Service, envelope: &Envelope) -> Result<(), BusError> {
        if self.fail_sends.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        let (launch_id, node_ids) = match envelope.op {
            Op::Provision => {
                let r: ProvisionRequest = envelope
                    .parse_body()
                    .map_err(|e| BusError::Io(e.to_string()))?;
                (r.launch_id, r.node_ids)
            }
            Op::TerminateNodes => {
                let r: TerminateNodesRequest = envelope
                    .parse_body()
                    .map_err(|e| BusError::Io(e.to_string()))?;
                (String::new(), r.node_ids)
            }
            _ => (String::new(), vec![]),
        };
        let s = Sent {
            op: envelope.op,
            launch_id,
            node_ids,
            stored_launches: self.store.launch_keys(),
        };
        if let Ok(mut v) = self.sent.lock() {
            v.push(s);
        }
        Ok(())
    }

    async fn request(
        &self,
        _to: Service,
        envelope: &Envelope,
        _timeout: Duration,
    ) -> Result<Value, ReplyError> {
        match envelope.op {
            // An empty provisioner: its change feed lists nothing.
            Op::DescribeNodes => Ok(json!({
                "enabled": true,
                "nodes": [],
                "revision": 0,
                "next": 0,
                "more": false,
                "full": true,
            })),
            other => Err(ReplyError::internal(format!("test bus: no {other}"))),
        }
    }

    async fn publish_raw(&self, _: Service, _: Vec<u8>, _: Headers) -> Result<(), BusError> {
        Err(BusError::Unsupported("publish_raw"))
    }

    async fn serve(&self, _: Service, _: Arc<dyn Handler>) -> Result<Server, BusError> {
        Err(BusError::Unsupported("serve"))
    }

    async fn take_dead_letters(&self, _: usize) -> Result<Vec<DeadLetter>, BusError> {
        Ok(vec![])
    }
}

/// An engine that always answers the same intents, counts its calls and keeps the
/// config it was given.
struct Scripted {
    control: Control,
    calls: Arc<AtomicUsize>,
    conf: Arc<Mutex<EngineConfig>>,
}

impl DecisionEngine for Scripted {
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        if let Ok(mut c) = self.conf.lock() {
            *c = conf.clone();
        }
        Ok(())
    }
    fn decide(&mut self, _state: &State, control: &mut Control) -> Result<(), EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *control = self.control.clone();
        Ok(())
    }
    fn reconfigure(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        if let Ok(mut c) = self.conf.lock() {
            *c = c.merged(conf);
        }
        Ok(())
    }
    fn report(&self) -> EngineReport {
        EngineReport::pending()
    }
}

// ---- harness ----------------------------------------------------------------------

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0)
        .single()
        .expect("valid time")
}

fn record(id: &str, launch_id: &str, state: NodeState) -> NodeRecord {
    node("web", id)
        .launch(launch_id)
        .state(state)
        .at(t(0))
        .build()
}

fn policy(dry_run: bool, paused: bool) -> DomainPolicy {
    serde_json::from_value(json!({
        "name": "web",
        "engine": "scripted",
        "engine_conf": {"n": 3},
        "deployable": {"driver": "sim"},
        "dry_run": dry_run,
        "paused": paused,
    }))
    .expect("policy")
}

struct Harness {
    domain: Domain,
    store: Arc<FlakyStore>,
    bus: Arc<RecordingBus>,
    clock: ManualClock,
    calls: Arc<AtomicUsize>,
    conf: Arc<Mutex<EngineConfig>>,
}

impl Harness {
    fn new(policy: DomainPolicy, control: Control, known: Vec<NodeRecord>) -> Self {
        Self::over(Arc::new(FlakyStore::default()), policy, control, known).expect("domain starts")
    }

    fn over(
        store: Arc<FlakyStore>,
        policy: DomainPolicy,
        control: Control,
        known: Vec<NodeRecord>,
    ) -> Result<Self, DomainError> {
        let run = RunName::new("test-run").expect("run name");
        let bus = Arc::new(RecordingBus {
            run: run.clone(),
            store: store.clone(),
            sent: Mutex::new(vec![]),
            fail_sends: AtomicBool::new(false),
        });
        let clock = ManualClock::new(t(100));
        let metrics =
            ControllerMetrics::new(&prometheus::Registry::new()).expect("metrics register");
        let shared = Arc::new(Shared {
            run,
            sender: "epu-controller".into(),
            bus: bus.clone(),
            store: store.clone(),
            clock: clock.shared(),
            metrics,
            tick: Duration::from_secs(3600),
            debounce: Duration::from_millis(1),
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let conf = Arc::new(Mutex::new(EngineConfig::new()));
        let mut engine = Scripted {
            control,
            calls: calls.clone(),
            conf: conf.clone(),
        };
        let initial = EngineConfig::from_json(Value::Object(policy.engine_conf.clone()))
            .expect("engine conf");
        engine.initialize(&initial).expect("initialize");
        let domain = Domain::new(shared, policy, Box::new(engine), known)?;
        Ok(Harness {
            domain,
            store,
            bus,
            clock,
            calls,
            conf,
        })
    }

    fn store_errors(&self, op: &str) -> u64 {
        self.domain
            .shared
            .metrics
            .store_errors
            .with_label_values(&["web", op])
            .get()
    }

    fn states(&self) -> BTreeMap<String, NodeState> {
        self.domain
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), v.record.state))
            .collect()
    }

    fn placeholders(&self) -> usize {
        self.domain
            .nodes
            .values()
            .filter(|v| v.record.state == NodeState::Requesting)
            .count()
    }

    fn engine_conf(&self) -> EngineConfig {
        self.conf.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Stores a launch as if decided before a restart and never acknowledged.
fn stored_launch(store: &FlakyStore, launch_id: &str, node_ids: &[&str]) {
    let p = PendingLaunch {
        launch_id: launch_id.into(),
        domain: "web".into(),
        node_ids: node_ids.iter().map(|s| s.to_string()).collect(),
        vars: BTreeMap::new(),
        created: t(0),
        last_sent: None,
    };
    store
        .put_json(LAUNCHES_TREE, &launch_key("web", launch_id), &p)
        .expect("store launch");
}

/// An engine's intents: launch `n` (shared with the pipeline's tables).
pub(super) fn launch(n: u32) -> Control {
    let mut c = Control::new();
    c.launch(n, LaunchSpec::default());
    c.reason(format!("launch {n}"));
    c
}

/// An engine's intents: destroy `ids`.
pub(super) fn destroy(ids: &[&str]) -> Control {
    let mut c = Control::new();
    c.destroy(ids.iter().map(|s| s.to_string()).collect());
    c.reason("destroy");
    c
}

fn both(n: u32, ids: &[&str]) -> Control {
    let mut c = launch(n);
    c.destroy(ids.iter().map(|s| s.to_string()).collect());
    c
}

// ---- the table --------------------------------------------------------------------

struct Case {
    name: &'static str,
    dry_run: bool,
    paused: bool,
    /// Nodes the provisioner reported.
    known: Vec<(&'static str, NodeState)>,
    /// Launches stored before the domain started (launch id, node ids).
    stored: Vec<(&'static str, Vec<&'static str>)>,
    control: Control,
    fail_writes: bool,
    fail_sends: bool,
    want: Want,
}

struct Want {
    engine_calls: usize,
    /// (op, number of node ids) of each message sent, in order.
    sent: Vec<(Op, usize)>,
    /// Launches in the store afterwards.
    stored_launches: usize,
    /// REQUESTING nodes in memory afterwards.
    placeholders: usize,
    /// The decision remembered, as its `launched` list's length; `None`: none remembered.
    logged_launched: Option<usize>,
    /// Nodes in TERMINATING afterwards.
    terminating: Vec<&'static str>,
    /// `epu_controller_store_errors_total{op="record_launch"}`.
    record_launch_errors: u64,
}

impl Default for Want {
    fn default() -> Self {
        Want {
            engine_calls: 1,
            sent: vec![],
            stored_launches: 0,
            placeholders: 0,
            logged_launched: None,
            terminating: vec![],
            record_launch_errors: 0,
        }
    }
}

fn case(name: &'static str, control: Control, want: Want) -> Case {
    Case {
        name,
        dry_run: false,
        paused: false,
        known: vec![("a", NodeState::Running)],
        stored: vec![],
        control,
        fail_writes: false,
        fail_sends: false,
        want,
    }
}

#[tokio::test]
async fn decide_table() {
    use NodeState::Terminating;
    let cases = vec![
        case(
            "nothing asked: nothing sent, no decision remembered",
            Control::new(),
            Want::default(),
        ),
        Case {
            dry_run: true,
            ..case(
                "dry run: nothing sent or stored, decision remembered",
                both(2, &["a"]),
                Want {
                    logged_launched: Some(1),
                    ..Want::default()
                },
            )
        },
        Case {
            paused: true,
            ..case(
                "paused: the engine is not asked, nothing sent or remembered",
                launch(2),
                Want {
                    engine_calls: 0,
                    ..Want::default()
                },
            )
        },
        case(
            "launch: stored before provision is sent, shown as REQUESTING",
            launch(2),
            Want {
                sent: vec![(Op::Provision, 2)],
                stored_launches: 1,
                placeholders: 2,
                logged_launched: Some(2),
                ..Want::default()
            },
        ),
        case(
            "destroy of a node: terminate_nodes, marked TERMINATING",
            destroy(&["a"]),
            Want {
                sent: vec![(Op::TerminateNodes, 1)],
                logged_launched: Some(0),
                terminating: vec!["a"],
                ..Want::default()
            },
        ),
        case(
            "destroy and launch: launches first, then terminate_nodes",
            both(1, &["a"]),
            Want {
                sent: vec![(Op::Provision, 1), (Op::TerminateNodes, 1)],
                stored_launches: 1,
                placeholders: 1,
                logged_launched: Some(1),
                terminating: vec!["a"],
                ..Want::default()
            },
        ),
        Case {
            stored: vec![("l-old", vec!["p"])],
            ..case(
                // The placeholder is taken out of its stored launch (deleted: it had
                // no other node), so it is never resent; marked TERMINATING; its id
                // sent with the domain, for the provisioner's tombstone.
                "destroy of a not-yet-sent placeholder: cancelled in the store, then terminate_nodes",
                destroy(&["p"]),
                Want {
                    sent: vec![(Op::TerminateNodes, 1)],
                    stored_launches: 0,
                    logged_launched: Some(0),
                    terminating: vec!["p"],
                    ..Want::default()
                },
            )
        },
        Case {
            fail_writes: true,
            ..case(
                "store write fails: no provision sent, memory unchanged, error counted",
                launch(2),
                Want {
                    logged_launched: Some(0),
                    record_launch_errors: 1,
                    ..Want::default()
                },
            )
        },
        Case {
            fail_sends: true,
            ..case(
                "provision not sent: the launch stays stored and shown",
                launch(1),
                Want {
                    stored_launches: 1,
                    placeholders: 1,
                    logged_launched: Some(1),
                    ..Want::default()
                },
            )
        },
        Case {
            fail_sends: true,
            ..case(
                "terminate_nodes not sent: the TERMINATING mark is undone",
                destroy(&["a"]),
                Want {
                    logged_launched: Some(0),
                    ..Want::default()
                },
            )
        },
    ];
    for c in cases {
        let name = c.name;
        let known = c
            .known
            .iter()
            .map(|(id, s)| record(id, "l-known", *s))
            .collect();
        let store = Arc::new(FlakyStore::default());
        for (l, ids) in &c.stored {
            stored_launch(&store, l, ids);
        }
        let mut h = Harness::over(store, policy(c.dry_run, c.paused), c.control, known)
            .expect("domain starts");
        let before = h.states();
        h.store.fail_writes.store(c.fail_writes, Ordering::SeqCst);
        h.bus.fail_sends.store(c.fail_sends, Ordering::SeqCst);

        h.domain.decide().await;

        let w = &c.want;
        assert_eq!(
            h.calls.load(Ordering::SeqCst),
            w.engine_calls,
            "{name}: engine calls"
        );
        let sent = h.bus.sent();
        let ops: Vec<(Op, usize)> = sent.iter().map(|s| (s.op, s.node_ids.len())).collect();
        assert_eq!(ops, w.sent, "{name}: sent");
        for s in sent.iter().filter(|s| s.op == Op::Provision) {
            assert!(
                s.stored_launches.contains(&launch_key("web", &s.launch_id)),
                "{name}: {} was sent before it was stored",
                s.launch_id
            );
        }
        assert_eq!(
            h.store.launch_keys().len(),
            w.stored_launches,
            "{name}: stored launches"
        );
        assert_eq!(h.placeholders(), w.placeholders, "{name}: placeholders");
        let terminating: Vec<String> = h
            .states()
            .into_iter()
            .filter(|(_, s)| *s == Terminating)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(terminating, w.terminating, "{name}: terminating");
        assert_eq!(
            h.domain.decisions.back().map(|d| d.launched.len()),
            w.logged_launched,
            "{name}: decision remembered"
        );
        assert_eq!(
            h.store_errors("record_launch"),
            w.record_launch_errors,
            "{name}: store errors"
        );
        if c.fail_writes || c.dry_run || c.paused {
            assert_eq!(h.states(), before, "{name}: memory unchanged");
        }
    }
}

// ---- store errors outside the table ------------------------------------------------

#[tokio::test]
async fn a_store_that_cannot_be_read_stops_the_domain_from_starting() {
    for (tree, what) in [
        (FAILURES_TREE, "launch failures"),
        (LAUNCHES_TREE, "pending launches"),
    ] {
        let store = Arc::new(FlakyStore::default());
        if let Ok(mut t) = store.fail_reads.lock() {
            t.push(tree);
        }
        match Harness::over(store, policy(false, false), Control::new(), vec![]) {
            Ok(_) => panic!("{tree}: the domain started over an unreadable store"),
            Err(e) => {
                let DomainError::Recover { what: got, .. } = &e;
                assert_eq!(*got, what);
                let msg = e.to_string();
                assert!(
                    msg.contains("\"web\"") && msg.contains("check the disk"),
                    "{msg}"
                );
            }
        }
    }
}

#[tokio::test]
async fn controller_start_fails_when_a_domain_cannot_be_read_back() {
    let store = Arc::new(FlakyStore::default());
    let stored: DomainPolicy = serde_json::from_value(json!({
        "name": "web",
        "engine": "npreserving",
        "engine_conf": {"preserve_n": 1},
        "deployable": {"driver": "sim"},
    }))
    .expect("policy");
    store
        .put_json(DOMAINS_TREE, "web", &stored)
        .expect("store policy");
    if let Ok(mut t) = store.fail_reads.lock() {
        t.push(LAUNCHES_TREE);
    }
    let run = RunName::new("test-run").expect("run name");
    let bus = Arc::new(RecordingBus {
        run: run.clone(),
        store: store.clone(),
        sent: Mutex::new(vec![]),
        fail_sends: AtomicBool::new(false),
    });
    let controller = crate::Controller::new(
        crate::ControllerSetup {
            run,
            policies: BTreeMap::new(),
            timing: crate::Timing::default(),
        },
        crate::ControllerDeps {
            bus: bus.clone(),
            store,
            clock: ManualClock::new(t(0)).shared(),
            metrics: epu_core::telemetry::Metrics::new(),
            readiness: epu_core::telemetry::Health::new(),
            registry: decision_engines::Registry::with_builtins(),
        },
    )
    .expect("built");
    let start = controller.start();
    let started = tokio::time::timeout(Duration::from_secs(10), start)
        .await
        .expect("start answers within 10 s (does the test bus answer dump_state?)");
    match started {
        Ok(_) => panic!("the controller started over an unreadable store"),
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, crate::ControllerError::Domain(_)), "{msg}");
            assert!(
                msg.contains("pending launches") && msg.contains("check the disk"),
                "{msg}"
            );
        }
    }
    assert!(bus.sent().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_node_update_is_applied_but_the_failure_count_only_if_stored() {
    let mut h = Harness::new(policy(false, false), Control::new(), vec![]);
    h.store.fail_writes.store(true, Ordering::SeqCst);
    assert!(h.domain.apply_node(record("a", "l-1", NodeState::Failed)));
    assert_eq!(
        h.domain.failures,
        LaunchFailures::default(),
        "count unchanged"
    );
    assert_eq!(
        h.states().get("a"),
        Some(&NodeState::Failed),
        "the update applies"
    );
    assert_eq!(h.store_errors("launch_failures"), 1);

    h.store.fail_writes.store(false, Ordering::SeqCst);
    assert!(h.domain.apply_node(record("b", "l-2", NodeState::Failed)));
    assert_eq!(h.domain.failures.consecutive, 1);
    let stored: Option<LaunchFailures> = h
        .store
        .get_json(FAILURES_TREE, "web")
        .expect("read failures");
    assert_eq!(stored, Some(h.domain.failures), "memory and store agree");
}

#[tokio::test]
async fn an_acknowledged_launch_is_forgotten_unless_the_store_refuses() {
    let mut h = Harness::new(policy(false, false), launch(1), vec![]);
    h.domain.decide().await;
    let sent = h.bus.sent();
    let p = sent.first().expect("provision sent");
    let (launch_id, node) = (p.launch_id.clone(), p.node_ids[0].clone());

    h.store.fail_writes.store(true, Ordering::SeqCst);
    assert!(h
        .domain
        .apply_node(record(&node, &launch_id, NodeState::Pending)));
    assert_eq!(
        h.store.launch_keys().len(),
        1,
        "still stored: it will be resent"
    );
    assert_eq!(h.store_errors("forget_launch"), 1);

    h.store.fail_writes.store(false, Ordering::SeqCst);
    assert!(h
        .domain
        .apply_node(record(&node, &launch_id, NodeState::Started)));
    assert!(
        h.store.launch_keys().is_empty(),
        "forgotten once acknowledged"
    );
}

#[tokio::test]
async fn stale_launches_are_resent_and_an_unreadable_store_skips_the_round() {
    let store = Arc::new(FlakyStore::default());
    stored_launch(&store, "l-old", &["p"]);
    let mut h = Harness::over(store, policy(false, false), Control::new(), vec![]).expect("starts");
    assert_eq!(
        h.placeholders(),
        1,
        "a stored launch is shown as REQUESTING"
    );

    h.domain.resend_stale_launches().await;
    assert_eq!(h.bus.sent().len(), 1, "never sent: sent");
    h.domain.resend_stale_launches().await;
    assert_eq!(h.bus.sent().len(), 1, "just sent: not again");
    h.clock.advance(Duration::from_secs(15));
    h.domain.resend_stale_launches().await;
    assert_eq!(h.bus.sent().len(), 2, "stale: sent again");

    h.clock.advance(Duration::from_secs(15));
    if let Ok(mut t) = h.store.fail_reads.lock() {
        t.push(LAUNCHES_TREE);
    }
    h.domain.resend_stale_launches().await;
    assert_eq!(h.bus.sent().len(), 2, "unreadable: nothing resent");
    assert_eq!(h.store_errors("read_launches"), 1);
}

#[tokio::test]
async fn a_refused_reconfigure_changes_nothing() {
    let mut h = Harness::new(policy(false, false), Control::new(), vec![]);
    let before_policy = json!(h.domain.policy);
    let before_engine = h.engine_conf();
    h.store.fail_writes.store(true, Ordering::SeqCst);
    let req: ReconfigureRequest = serde_json::from_value(json!({
        "domain": "web",
        "engine_conf": {"n": 5, "m": 1},
        "dry_run": true,
    }))
    .expect("request");
    let r = h.domain.reconfigure(req.clone());
    let err = r.expect_err("the store refused");
    assert!(err.to_string().contains("keeps its old config"), "{err}");
    assert_eq!(json!(h.domain.policy), before_policy, "policy unchanged");
    assert_eq!(h.engine_conf(), before_engine, "engine put back");
    assert_eq!(h.store_errors("reconfigure"), 1);

    h.store.fail_writes.store(false, Ordering::SeqCst);
    h.domain.reconfigure(req).expect("accepted");
    assert!(h.domain.policy.dry_run);
    assert_eq!(h.domain.policy.engine_conf.get("n"), Some(&json!(5)));
    let stored: Option<DomainPolicy> = h.store.get_json(DOMAINS_TREE, "web").expect("read");
    assert_eq!(stored.map(|p| json!(p)), Some(json!(h.domain.policy)));
}

#[tokio::test]
async fn a_removal_the_store_refuses_keeps_the_domain_running() {
    let h = Harness::new(
        policy(false, true),
        Control::new(),
        vec![record("a", "l-1", NodeState::Running)],
    );
    h.store
        .put_json(DOMAINS_TREE, "web", &h.domain.policy)
        .expect("store policy");
    let (store, bus) = (h.store.clone(), h.bus.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let handle = h.domain.spawn_in(&mut tasks);

    store.fail_writes.store(true, Ordering::SeqCst);
    let r = handle
        .ask(T, DomainMsg::Remove)
        .await
        .expect("the domain answers");
    let err = r.expect_err("the store refused");
    assert!(err.to_string().contains("keeps running"), "{err}");
    assert!(bus.sent().is_empty(), "nothing terminated");
    let summary = handle
        .ask(T, DomainMsg::Summary)
        .await
        .expect("still serving");
    assert_eq!(summary.domain, "web");

    store.fail_writes.store(false, Ordering::SeqCst);
    let out = handle
        .ask(T, DomainMsg::Remove)
        .await
        .expect("the domain answers")
        .expect("removed");
    assert_eq!(out.terminating, vec!["a".to_string()]);
    let ops: Vec<Op> = bus.sent().iter().map(|s| s.op).collect();
    assert_eq!(ops, vec![Op::TerminateNodes]);
    assert!(store.get(DOMAINS_TREE, "web").expect("read").is_none());
    // Removed, but still terminating: the removal is recorded until the
    // provisioner confirms, and the domain no longer decides.
    assert!(store.get(REMOVING_TREE, "web").expect("read").is_some());
    handle
        .ask(T, DomainMsg::Summary)
        .await
        .expect("still terminating its node");
    let done = node("web", "a")
        .launch("l-1")
        .state(NodeState::Terminated)
        .at(t(1))
        .revision(7)
        .build();
    handle.send(DomainMsg::Node(Box::new(done)));
    epu_testkit::wait::eventually(T, "the task ends once its node is terminal", || async {
        handle.tx.is_closed()
    })
    .await;
    assert!(store.get(REMOVING_TREE, "web").expect("read").is_none());
}

#[tokio::test]
async fn a_description_never_carries_a_broker_password() {
    let mut p = policy(false, false);
    p.sensors.queue = Some("jobs".into());
    p.sensors.broker_url = Some("amqp://worker:s3cret@broker:5672/%2f".into());
    let h = Harness::new(p, Control::new(), vec![]);
    let described = h.domain.describe();
    let text = serde_json::to_string(&described).expect("encode");
    assert!(!text.contains("s3cret"), "{text}");
    assert_eq!(
        described.sensors.broker_url.as_deref(),
        Some("amqp://worker:***@broker:5672/%2f")
    );
    assert_eq!(described.policy["sensors"]["queue"], "jobs");
    assert_eq!(
        h.domain.policy.sensors.broker_url.as_deref(),
        Some("amqp://worker:s3cret@broker:5672/%2f"),
        "the controller itself keeps the real URL"
    );
}

#[test]
fn newer_news_table() {
    use NodeState::*;
    let rec = |state, revision| node("web", "a").state(state).revision(revision).build();
    // (held, arriving, applied?)
    let cases = [
        (
            "placeholder, then the feed's first word",
            rec(Requesting, 0),
            rec(Requesting, 4),
            true,
        ),
        (
            "a later revision with the same state (facts)",
            rec(Running, 4),
            rec(Running, 5),
            true,
        ),
        ("an older revision", rec(Running, 5), rec(Running, 4), false),
        ("a repeat", rec(Running, 5), rec(Running, 5), false),
        (
            "never backwards, whatever the revision",
            rec(Terminating, 5),
            rec(Running, 6),
            false,
        ),
        (
            "the local TERMINATING mark, then the provisioner's",
            rec(Terminating, 5),
            rec(Terminating, 7),
            true,
        ),
        (
            "no revision: a later state",
            rec(Pending, 0),
            rec(Running, 0),
            true,
        ),
        (
            "no revision: the same state",
            rec(Running, 3),
            rec(Running, 0),
            false,
        ),
    ];
    for (what, held, next, want) in cases {
        assert_eq!(newer(&held, &next), want, "{what}");
    }
}

#[test]
fn what_counts_toward_backoff_table() {
    let now = t(10_000);
    let none = LaunchFailures::default();
    let last = LaunchFailures {
        consecutive: 2,
        last_at: Some(t(9_000)),
    };
    // (failures so far, first seen, changed at, counts?)
    let cases = [
        ("a fresh failure", none, false, t(9_990), true),
        ("first seen and recent", none, true, t(9_500), true),
        (
            "first seen and an hour old: history",
            none,
            true,
            t(6_400),
            false,
        ),
        (
            "not after the last counted failure: counted already",
            last,
            true,
            t(9_000),
            false,
        ),
        ("after the last counted one", last, false, t(9_100), true),
        ("before the last counted one", last, false, t(8_000), false),
    ];
    for (what, failures, first_seen, at, want) in cases {
        assert_eq!(
            counts_toward_backoff(&failures, first_seen, at, now),
            want,
            "{what}"
        );
    }
}

#[test]
fn the_feed_cursor_moves_only_without_holes() {
    use crate::hosted::Feed;
    let mut f = Feed::default();
    // (revision arriving, a gap?, applied after)
    let steps = [
        (1, false, 1),
        (2, false, 2),
        (2, false, 2),
        (0, false, 2),
        (4, true, 2),
        (5, true, 2),
        // The late one fills the hole: 4 and 5 were remembered.
        (3, false, 5),
        (7, true, 5),
    ];
    for (rev, gap, applied) in steps {
        assert_eq!(f.observe(rev), gap, "revision {rev}");
        assert_eq!(f.applied, applied, "after revision {rev}");
    }
    assert!(f.has_gap(), "6 is still missing");
    f.resynced(6, false);
    assert_eq!(f.applied, 7, "the resync filled 6; 7 had come");
    assert!(!f.has_gap());
    f.resynced(9, false);
    assert_eq!(f.applied, 9);
    f.resynced(7, false);
    assert_eq!(f.applied, 9, "a diff never moves back");
    assert!(f.observe(12));
    f.resynced(2, true);
    assert_eq!(
        f.applied, 2,
        "a full listing of a provisioner with a new store does"
    );
    assert!(!f.has_gap(), "and forgets what came ahead of the old store");
}

#[tokio::test]
async fn a_domain_that_does_not_answer_is_unavailable_not_a_hang() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let handle = DomainHandle { tx };
    let err = handle
        .ask(Duration::from_millis(100), DomainMsg::Summary)
        .await
        .expect_err("nobody answers");
    assert_eq!(err.code, epu_core::wire::ErrorCode::Unavailable, "{err}");
    assert!(err.message.contains("did not answer"), "{err}");
}

#[tokio::test]
async fn a_cancelled_unsent_launch_is_never_resent_and_its_terminate_is_repeated_until_confirmed() {
    let store = Arc::new(FlakyStore::default());
    stored_launch(&store, "l-two", &["p", "q"]);
    let mut h = Harness::over(store, policy(false, false), Control::new(), vec![]).expect("starts");
    // The broker is down: the terminate cannot be sent.
    h.bus.fail_sends.store(true, Ordering::SeqCst);
    h.domain.destroy(&["p".to_string()]).await;
    let left: Option<PendingLaunch> = h
        .store
        .get_json(LAUNCHES_TREE, &launch_key("web", "l-two"))
        .expect("read");
    assert_eq!(
        left.map(|p| p.node_ids),
        Some(vec!["q".to_string()]),
        "p is out of its launch: a resend launches q only"
    );
    assert_eq!(
        h.states()["p"],
        NodeState::Terminating,
        "kept: it has no launch to fall back to"
    );
    h.bus.fail_sends.store(false, Ordering::SeqCst);
    h.domain.resend_stale_launches().await;
    let provisions: Vec<Vec<String>> = h
        .bus
        .sent()
        .iter()
        .filter(|s| s.op == Op::Provision)
        .map(|s| s.node_ids.clone())
        .collect();
    assert_eq!(provisions, [["q".to_string()]]);
    // The tick asks again once the mark is 30 s old, and every 30 s after.
    let terminates = |h: &Harness| {
        h.bus
            .sent()
            .iter()
            .filter(|s| s.op == Op::TerminateNodes)
            .count()
    };
    h.domain.resend_stale_terminations().await;
    assert_eq!(terminates(&h), 0, "not yet due");
    h.clock.advance(Duration::from_secs(31));
    h.domain.resend_stale_terminations().await;
    assert_eq!(terminates(&h), 1);
    let sent = h.bus.sent();
    let asked = sent
        .iter()
        .find(|s| s.op == Op::TerminateNodes)
        .map(|s| s.node_ids.clone());
    assert_eq!(asked, Some(vec!["p".to_string()]));
    h.domain.resend_stale_terminations().await;
    assert_eq!(terminates(&h), 1, "just sent");
    // The provisioner's tombstone confirms it: no more asking.
    let grave = node("web", "p")
        .state(NodeState::Terminated)
        .at(t(131))
        .revision(3)
        .build();
    assert!(h.domain.apply_node(grave));
    h.clock.advance(Duration::from_secs(60));
    h.domain.resend_stale_terminations().await;
    assert_eq!(terminates(&h), 1, "confirmed terminal");
}
