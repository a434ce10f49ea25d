//! The aggregator follows the provisioner's change feed (PROTOCOL.md, "The change
//! feed"), against the fake provisioner on the in-process bus: the first poll reads
//! the full listing, later polls fetch only changes (nothing when nothing changed),
//! a full listing drops what it does not name, and a failed poll keeps the revision.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use epu_core::bus::local::LocalBus;
use epu_core::bus::Server;
use epu_core::clock::SystemClock;
use epu_core::store::MemStore;
use epu_core::telemetry::Metrics;
use epu_core::testing::{test_options, test_run, wait_until};
use epu_core::wire::RunName;
use epu_model::messages::DescribeNodesRequest;
use epu_model::{Health, NodeState};
use epu_testkit::{heartbeat, node, record_controller, send_heartbeat, FakeProvisioner};
use sensor_aggregator::{Aggregator, AggregatorConfig, AggregatorDeps, DomainSensors};

const EVENTUALLY: Duration = Duration::from_secs(15);

/// An aggregator (polling every `poll_secs`) on `bus`, and the controller queue
/// served so its readings do not pile up.
struct Setup {
    agg: Aggregator,
    running: sensor_aggregator::RunningAggregator,
    metrics: Metrics,
    controller: Server,
}

impl Setup {
    async fn start(bus: &LocalBus, run: &RunName, poll_secs: f64) -> Setup {
        let (controller, _readings) = record_controller(bus)
            .await
            .expect("serve the controller queue");
        let mut cfg = AggregatorConfig::new(run.clone());
        cfg.nodes_poll_secs = poll_secs;
        cfg.bus.request_timeout_secs = 1;
        cfg.domains.push(DomainSensors::new("web"));
        let metrics = Metrics::new();
        let agg = Aggregator::new(
            cfg,
            AggregatorDeps {
                bus: Arc::new(bus.view(test_options("sensor-aggregator"))),
                store: Arc::new(MemStore::new()),
                clock: SystemClock::shared(),
                metrics: metrics.clone(),
                readiness: Default::default(),
            },
        )
        .expect("aggregator");
        let running = agg.start().await.expect("start");
        Setup {
            agg,
            running,
            metrics,
            controller,
        }
    }

    /// A counter or gauge of the aggregator's metrics (0 when absent).
    fn metric(&self, name: &str) -> u64 {
        let text = self.metrics.encode().unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    fn records(&self) -> u64 {
        self.metric("epu_sensor_node_records_total")
    }

    fn listings(&self) -> u64 {
        self.metric("epu_sensor_node_full_listings_total")
    }

    /// The ids the aggregator reports for "web", sorted.
    fn reported(&self) -> Vec<String> {
        self.agg
            .reading("web")
            .nodes
            .into_iter()
            .map(|n| n.node_id)
            .collect()
    }

    async fn stop(self) {
        self.running.stop().await;
        self.controller.stop().await;
    }
}

async fn fake(bus: &LocalBus, run: &RunName, ids: &[&str]) -> FakeProvisioner {
    FakeProvisioner::builder()
        .nodes(ids.iter().map(|id| node("web", id).run(run).build()))
        .publish(false)
        .serve(Arc::new(bus.clone()))
        .await
        .expect("serve the fake provisioner")
}

fn describes(prov: &FakeProvisioner) -> usize {
    prov.requests_of::<DescribeNodesRequest>()
}

/// (a) After the first full listing, every poll is one `describe_nodes` answered
/// with no records.
#[tokio::test]
async fn steady_state_polls_fetch_no_records() {
    let run = test_run("sa-feed-steady");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake(&bus, &run, &["a", "b", "c"]).await;
    let s = Setup::start(&bus, &run, 0.05).await;
    assert!(
        wait_until(EVENTUALLY, || s.listings() == 1 && s.reported().len() == 3).await,
        "the first poll reads the full listing: {:?}",
        s.reported()
    );
    assert_eq!(s.records(), 3);
    assert_eq!(s.metric("epu_sensor_node_feed_revision"), 3);
    let asked = describes(&prov);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let polls = describes(&prov) - asked;
    assert!(polls >= 4, "it keeps polling: {polls} requests in 600 ms");
    assert_eq!(
        s.records(),
        3,
        "{polls} steady-state polls fetched no record"
    );
    assert_eq!(s.listings(), 1, "and listed everything only once");
    assert_eq!(s.reported(), ["a", "b", "c"]);
    s.stop().await;
    prov.stop().await;
}

/// (b) A change nobody published (a lost `instance_info`) is seen by the next poll,
/// as one record of the feed; a node heard before the provisioner records it is
/// reported once its record appears.
#[tokio::test]
async fn a_quiet_change_is_seen_within_one_poll() {
    let run = test_run("sa-feed-quiet");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake(&bus, &run, &["a", "b"]).await;
    let s = Setup::start(&bus, &run, 0.25).await;
    assert!(wait_until(EVENTUALLY, || s.reported() == ["a", "b"]).await);
    let records = s.records();

    let asked = describes(&prov);
    prov.set_state_quietly("b", NodeState::Terminated)
        .expect("b exists");
    assert!(
        wait_until(EVENTUALLY, || s.reported() == ["a"]).await,
        "the terminated node is no longer reported: {:?}",
        s.reported()
    );
    let polls = describes(&prov) - asked;
    assert!(
        polls <= 2,
        "seen by the first poll after the change (one may have been in flight): {polls} requests"
    );
    assert_eq!(s.records(), records + 1, "one record: the change");
    assert_eq!(s.listings(), 1, "no relisting");

    // Heard before the provisioner has a record: tracked, not reported; then the
    // record appears (quietly) and the feed brings it.
    send_heartbeat(&bus, &heartbeat("late", "web", 1, Utc::now()))
        .await
        .expect("send a heartbeat");
    assert!(wait_until(EVENTUALLY, || s.agg.tracked_nodes() == 3).await);
    assert_eq!(s.reported(), ["a"]);
    prov.put(node("web", "late").run(&run).build());
    assert!(wait_until(EVENTUALLY, || s.reported() == ["a", "late"]).await);
    let late = s.agg.reading("web");
    let late = late
        .nodes
        .iter()
        .find(|n| n.node_id == "late")
        .expect("late");
    assert_eq!((late.health, late.jobs), (Health::Ok, Some(1)));
    s.stop().await;
    prov.stop().await;
}

/// (c) A provisioner with a new store answers the aggregator's revision with a full
/// listing; the nodes it does not name are gone: no longer reported, then forgotten.
#[tokio::test]
async fn a_full_listing_drops_nodes_it_does_not_name() {
    let run = test_run("sa-feed-full");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake(&bus, &run, &["a", "b", "c"]).await;
    let s = Setup::start(&bus, &run, 0.05).await;
    assert!(wait_until(EVENTUALLY, || s.reported() == ["a", "b", "c"]).await);
    prov.stop().await;

    // Revision 1 < the aggregator's 3: a new store, so a full listing.
    let prov = fake(&bus, &run, &["a"]).await;
    assert!(
        wait_until(EVENTUALLY, || s.reported() == ["a"]).await,
        "b and c are gone: {:?}",
        s.reported()
    );
    assert_eq!(s.listings(), 2);
    assert_eq!(s.agg.tracked_nodes(), 1, "never heard: forgotten at once");
    assert_eq!(s.metric("epu_sensor_node_feed_revision"), 1);
    s.stop().await;
    prov.stop().await;
}

/// A provisioner that does not answer leaves the revision where it was: once it
/// answers again (the same store), the next poll asks from there and gets nothing.
#[tokio::test]
async fn an_unanswered_poll_keeps_the_revision() {
    let run = test_run("sa-feed-down");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let prov = fake(&bus, &run, &["a", "b", "c"]).await;
    prov.set_state_quietly("b", NodeState::Terminated)
        .expect("b exists");
    let s = Setup::start(&bus, &run, 0.05).await;
    assert!(wait_until(EVENTUALLY, || s.reported() == ["a", "c"]).await);
    let records = s.records();
    prov.stop().await;
    // request_timeout 1 s: at least one poll fails meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The same history (revision 4), as a restarted provisioner on its own store.
    let prov = fake(&bus, &run, &["a", "b", "c"]).await;
    prov.set_state_quietly("b", NodeState::Terminated)
        .expect("b exists");
    let asked = describes(&prov);
    assert!(wait_until(EVENTUALLY, || describes(&prov) >= asked + 4).await);
    assert_eq!(
        s.listings(),
        1,
        "asked from the kept revision, not relisted"
    );
    assert_eq!(s.records(), records, "nothing changed since");
    assert_eq!(s.reported(), ["a", "c"]);
    s.stop().await;
    prov.stop().await;
}

/// (d) More records than a page: the first poll follows `more` until all are
/// applied, and so does a poll after many changes.
#[tokio::test]
async fn more_records_than_a_page_are_all_applied() {
    const NODES: usize = 2_500;
    let run = test_run("sa-feed-pages");
    let bus = LocalBus::new(run.clone(), test_options("host"));
    let ids: Vec<String> = (0..NODES).map(|i| format!("n{i:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let prov = fake(&bus, &run, &refs).await;
    let s = Setup::start(&bus, &run, 0.2).await;
    assert!(
        wait_until(EVENTUALLY, || s.reported().len() == NODES).await,
        "all {NODES} applied: {}",
        s.reported().len()
    );
    assert_eq!(s.listings(), 1);
    assert_eq!(s.records(), NODES as u64, "each record once");
    assert!(describes(&prov) >= 3, "pages of 1000");

    // 1,200 changes between two polls: two pages in one poll.
    for id in &ids[..1_200] {
        prov.set_state_quietly(id, NodeState::Terminated)
            .expect("exists");
    }
    assert!(
        wait_until(EVENTUALLY, || s.reported().len() == NODES - 1_200).await,
        "{} reported",
        s.reported().len()
    );
    assert_eq!(s.records(), (NODES + 1_200) as u64);
    assert_eq!(s.listings(), 1);
    assert_eq!(s.reported().first().map(String::as_str), Some("n01200"));
    s.stop().await;
    prov.stop().await;
}
