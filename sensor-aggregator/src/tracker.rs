//! The node table: every node the aggregator knows, by domain — what the provisioner
//! says about it, its latest heartbeat, and the health last judged. Synchronous and
//! clock-free (every method takes `now`); the aggregator holds it behind one mutex.
//!
//! The provisioner's records come from its change feed (PROTOCOL.md, "The change
//! feed"): [`FeedCursor::step`] decides, page by page, what a `describe_nodes`
//! reply means (a full listing begins or ends, or only changes), and the table
//! applies it ([`Tracker::begin_listing`], [`Tracker::apply_records`],
//! [`Tracker::end_listing`]). A node heard but not known to the provisioner is
//! asked about by id once ([`Tracker::to_resolve`]), since its record may be older
//! than the feed's position (a terminal record the table skipped or forgot).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use epu_model::messages::{DescribeNodesReply, Heartbeat, NodeHealth, NodeRecord, WorkerState};
use epu_model::{Health, NodeState};
use serde::{Deserialize, Serialize};

use crate::health::{judge, LastHeard, NodeFacts, Thresholds};

/// The store tree of last-heard records, keyed by node id.
pub const LAST_HEARD_TREE: &str = "sensor_last_heard";

/// A node that is gone (terminated, or never known to the provisioner) and silent
/// for this long is forgotten, in memory and in the store.
pub const FORGET_AFTER: TimeDelta = TimeDelta::minutes(10);

/// A node the provisioner does not know is asked about (once) while it was heard this
/// recently.
const RESOLVE_WINDOW: TimeDelta = TimeDelta::seconds(60);

/// A node's latest heartbeat as persisted (tree [`LAST_HEARD_TREE`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeardRecord {
    pub domain: String,
    /// When it was heard, on the aggregator's clock.
    pub at: DateTime<Utc>,
    pub state: WorkerState,
    #[serde(default)]
    pub jobs: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stderr_tail: Option<String>,
}

#[derive(Clone, Debug)]
struct Heard {
    at: DateTime<Utc>,
    state: WorkerState,
    jobs: u32,
    exit_code: Option<i32>,
    stderr_tail: Option<Box<str>>,
}

impl Heard {
    fn last(&self) -> LastHeard {
        LastHeard {
            at: self.at,
            state: self.state,
        }
    }
}

#[derive(Debug)]
struct NodeEntry {
    facts: Option<NodeFacts>,
    heard: Option<Heard>,
    health: Health,
    /// The last full listing that named it (or that was the latest when it was
    /// added): one that ends without naming it means the provisioner does not hold it.
    listing: u64,
    /// Its record cannot be older than the feed's position: the provisioner was
    /// asked about it by id, or a full listing that began after it was added did not
    /// name it. Only an unresolved node without facts is asked about by id.
    resolved: bool,
}

impl NodeEntry {
    fn new(listing: u64) -> Self {
        NodeEntry {
            facts: None,
            heard: None,
            health: Health::Unknown,
            listing,
            resolved: false,
        }
    }

    fn terminal(&self) -> bool {
        self.facts.is_some_and(|f| f.state.is_terminal())
    }

    /// Reported to the controller: known to the provisioner, and not gone (or a zombie).
    fn reportable(&self) -> bool {
        self.facts.is_some() && (!self.terminal() || self.health == Health::Zombie)
    }

    /// The jobs it holds that count toward the backlog.
    fn busy(&self) -> u32 {
        match &self.heard {
            Some(h) if self.health == Health::Ok && !self.terminal() => h.jobs,
            _ => 0,
        }
    }

    fn judge(&self, policy: &Thresholds, now: DateTime<Utc>) -> Health {
        judge(
            self.facts.as_ref(),
            self.heard.as_ref().map(Heard::last),
            policy,
            now,
        )
    }
}

#[derive(Debug, Default)]
struct DomainNodes {
    nodes: HashMap<Arc<str>, NodeEntry>,
    /// Something the controller should hear about changed since the last reading.
    changed: bool,
}

/// One domain's nodes as the controller gets them.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainReading {
    pub nodes: Vec<NodeHealth>,
    /// Jobs held by the domain's healthy nodes (the busy part of the backlog).
    pub busy: u64,
}

/// The node table (see the module docs).
#[derive(Debug)]
pub struct Tracker {
    domains: HashMap<Arc<str>, DomainNodes>,
    index: HashMap<Arc<str>, Arc<str>>,
    policies: HashMap<String, Thresholds>,
    default_policy: Thresholds,
    dirty: HashSet<Arc<str>>,
    forgotten: Vec<Arc<str>>,
    /// The full listing being read, or the last one read.
    listing: u64,
}

fn log_change(domain: &str, node_id: &str, from: Health, to: Health) {
    tracing::info!(
        event = "node_health",
        domain = %domain,
        node_id = %node_id,
        health = %to,
        previous = %from,
        "node health changed"
    );
}

impl Tracker {
    pub fn new(default_policy: Thresholds) -> Self {
        Tracker {
            domains: HashMap::new(),
            index: HashMap::new(),
            policies: HashMap::new(),
            default_policy,
            dirty: HashSet::new(),
            forgotten: Vec::new(),
            listing: 0,
        }
    }

    /// Sets a domain's thresholds (judged with them from the next sweep on).
    pub fn set_policy(&mut self, domain: &str, policy: Thresholds) {
        self.policies.insert(domain.to_string(), policy);
    }

    pub fn remove_policy(&mut self, domain: &str) {
        self.policies.remove(domain);
    }

    pub fn policy(&self, domain: &str) -> Thresholds {
        self.policies
            .get(domain)
            .copied()
            .unwrap_or(self.default_policy)
    }

    /// How many nodes are tracked.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The domains that have nodes (or thresholds set).
    pub fn domains(&self) -> Vec<String> {
        self.domains.keys().map(|d| d.to_string()).collect()
    }

    /// The domains that have nodes now (known to the provisioner, heard, or both).
    pub fn domains_with_nodes(&self) -> Vec<String> {
        self.domains
            .iter()
            .filter(|(_, dn)| !dn.nodes.is_empty())
            .map(|(d, _)| d.to_string())
            .collect()
    }

    /// Finds the node (moving it when `domain` is authoritative and differs, or when
    /// the provisioner has not placed it yet), or inserts it. Returns its domain key.
    fn locate(&mut self, node_id: &str, domain: &str, authoritative: bool) -> (Arc<str>, Arc<str>) {
        if let Some((id, current)) = self.index.get_key_value(node_id) {
            let (id, current) = (id.clone(), current.clone());
            if &*current == domain {
                return (id, current);
            }
            let placed = self
                .domains
                .get(&current)
                .and_then(|d| d.nodes.get(&id))
                .is_some_and(|e| e.facts.is_some());
            if !authoritative && placed {
                return (id, current);
            }
            let entry = match self.domains.get_mut(&current) {
                Some(d) => {
                    d.changed = true;
                    d.nodes.remove(&id)
                }
                None => None,
            };
            let key = self.domain_key(domain);
            let dn = self.domains.entry(key.clone()).or_default();
            let listing = self.listing;
            dn.nodes
                .insert(id.clone(), entry.unwrap_or_else(|| NodeEntry::new(listing)));
            dn.changed = true;
            self.index.insert(id.clone(), key.clone());
            return (id, key);
        }
        let id: Arc<str> = Arc::from(node_id);
        let key = self.domain_key(domain);
        let listing = self.listing;
        let dn = self.domains.entry(key.clone()).or_default();
        dn.nodes.insert(id.clone(), NodeEntry::new(listing));
        self.index.insert(id.clone(), key.clone());
        (id, key)
    }

    fn domain_key(&self, domain: &str) -> Arc<str> {
        match self.domains.get_key_value(domain) {
            Some((k, _)) => k.clone(),
            None => Arc::from(domain),
        }
    }

    /// Records a heartbeat heard at `now`. Returns true when the node's health, jobs
    /// or exit code changed (the controller should hear about it).
    ///
    /// The heard time is `now` on the aggregator's clock, never the worker's `at`: a
    /// worker whose clock is off must not look silent. So a heartbeat that waited in
    /// the queue (while the aggregator was restarting) counts from when it is taken
    /// off the queue: a node that died meanwhile is declared MISSING at most
    /// `missing_timeout` after the restart, not earlier.
    pub fn heartbeat(&mut self, hb: Heartbeat, now: DateTime<Utc>) -> bool {
        let (id, dkey) = self.locate(&hb.node_id, &hb.domain, false);
        let policy = self.policy(&dkey);
        let Some(dn) = self.domains.get_mut(&dkey) else {
            return false;
        };
        let Some(entry) = dn.nodes.get_mut(&id) else {
            return false;
        };
        let at = now;
        let before = (
            entry.health,
            entry.heard.as_ref().map(|h| (h.jobs, h.exit_code)),
        );
        entry.heard = Some(Heard {
            at,
            state: hb.state,
            jobs: hb.jobs,
            exit_code: hb.exit_code,
            stderr_tail: hb.stderr_tail.map(String::into_boxed_str),
        });
        let health = entry.judge(&policy, now);
        if health != entry.health && entry.facts.is_some() {
            log_change(&dkey, &id, entry.health, health);
        }
        entry.health = health;
        let after = (health, Some((hb.jobs, hb.exit_code)));
        let changed = before != after;
        if changed {
            dn.changed = true;
        }
        self.dirty.insert(id);
        changed
    }

    /// Takes node records from the provisioner (a page of its change feed, or the
    /// answer to a by-id query), in the order given: a later record of a node wins.
    /// A terminal record of a node not tracked is skipped (nothing to report: if it
    /// is heard later, it is asked about by id). Returns how many were applied.
    pub fn apply_records(&mut self, records: &[NodeRecord], now: DateTime<Utc>) -> usize {
        let mut applied = 0;
        for r in records {
            if r.state.is_terminal() && !self.index.contains_key(r.node_id.as_str()) {
                continue;
            }
            let facts = facts_of(r);
            let (id, dkey) = self.locate(&r.node_id, &r.domain, true);
            let policy = self.policy(&dkey);
            let listing = self.listing;
            let Some(dn) = self.domains.get_mut(&dkey) else {
                continue;
            };
            let Some(entry) = dn.nodes.get_mut(&id) else {
                continue;
            };
            applied += 1;
            entry.listing = listing;
            entry.resolved = true;
            if entry.facts != Some(facts) {
                let was_reportable = entry.reportable();
                entry.facts = Some(facts);
                let health = entry.judge(&policy, now);
                if health != entry.health {
                    log_change(&dkey, &id, entry.health, health);
                    entry.health = health;
                }
                if was_reportable || entry.reportable() {
                    dn.changed = true;
                }
            }
        }
        applied
    }

    /// A full listing begins: the records applied from now until
    /// [`end_listing`](Self::end_listing) are every record the provisioner holds.
    /// (A listing that begins again before it ended starts over.)
    pub fn begin_listing(&mut self) {
        self.listing += 1;
    }

    /// The full listing begun last has ended: a node it did not name loses its
    /// facts (it is gone: no longer reported, forgotten once quiet), and no node
    /// added before it began is asked about by id. Returns how many lost their facts.
    pub fn end_listing(&mut self) -> usize {
        let listing = self.listing;
        let mut dropped = 0;
        for (dkey, dn) in self.domains.iter_mut() {
            for (id, e) in dn.nodes.iter_mut() {
                if e.listing == listing {
                    continue;
                }
                e.resolved = true;
                if e.facts.is_none() {
                    continue;
                }
                let was_reportable = e.reportable();
                e.facts = None;
                dropped += 1;
                if was_reportable {
                    dn.changed = true;
                }
                tracing::debug!(
                    event = "node_gone",
                    domain = %dkey,
                    node_id = %id,
                    "the provisioner no longer holds this node"
                );
            }
        }
        dropped
    }

    /// The node ids to ask the provisioner about by id: nodes heard recently that it
    /// has not told about and that were not asked about yet.
    pub fn to_resolve(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        for dn in self.domains.values() {
            for (id, e) in &dn.nodes {
                let ask = !e.resolved
                    && e.facts.is_none()
                    && e.heard
                        .as_ref()
                        .is_some_and(|h| now - h.at <= RESOLVE_WINDOW);
                if ask {
                    out.push(id.to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// Takes the answer to a by-id query for `asked`. A node the provisioner does not
    /// know loses its facts (and is no longer reported); none is asked about again
    /// (a later change of its record comes with the feed).
    pub fn apply_resolved(&mut self, records: &[NodeRecord], asked: &[String], now: DateTime<Utc>) {
        self.apply_records(records, now);
        let answered: HashSet<&str> = records.iter().map(|r| r.node_id.as_str()).collect();
        for id in asked {
            if answered.contains(id.as_str()) {
                continue;
            }
            let Some(dkey) = self.index.get(id.as_str()).cloned() else {
                continue;
            };
            if let Some(dn) = self.domains.get_mut(&dkey) {
                if let Some(e) = dn.nodes.get_mut(id.as_str()) {
                    e.resolved = true;
                    let was_reportable = e.reportable();
                    if e.facts.take().is_some() && was_reportable {
                        dn.changed = true;
                    }
                }
            }
        }
    }

    /// Re-judges every node at `now`, logging health changes, and forgets nodes that
    /// are long gone. Returns how many nodes changed health.
    pub fn sweep(&mut self, now: DateTime<Utc>) -> usize {
        let mut changes = 0;
        let mut forget: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        for (dkey, dn) in self.domains.iter_mut() {
            let policy = self
                .policies
                .get(&**dkey)
                .copied()
                .unwrap_or(self.default_policy);
            for (id, e) in dn.nodes.iter_mut() {
                let health = e.judge(&policy, now);
                if health != e.health {
                    if e.facts.is_some() {
                        log_change(dkey, id, e.health, health);
                    }
                    let was = e.reportable();
                    e.health = health;
                    if was || e.reportable() {
                        dn.changed = true;
                    }
                    changes += 1;
                }
                let quiet = e.heard.as_ref().is_none_or(|h| now - h.at > FORGET_AFTER);
                let gone = match &e.facts {
                    Some(f) if f.state.is_terminal() => {
                        f.terminal_since.is_none_or(|t| now - t > FORGET_AFTER)
                    }
                    Some(_) => false,
                    None => true,
                };
                if quiet && gone {
                    forget.push((dkey.clone(), id.clone()));
                }
            }
        }
        for (dkey, id) in forget {
            if let Some(dn) = self.domains.get_mut(&dkey) {
                if let Some(e) = dn.nodes.remove(&id) {
                    if e.reportable() {
                        dn.changed = true;
                    }
                    if e.heard.is_some() {
                        self.forgotten.push(id.clone());
                    }
                }
            }
            self.index.remove(&id);
            self.dirty.remove(&id);
        }
        self.domains
            .retain(|d, dn| !dn.nodes.is_empty() || self.policies.contains_key(&**d));
        changes
    }

    /// Whether `domain` changed since the last call, clearing the flag.
    pub fn take_changed(&mut self, domain: &str) -> bool {
        match self.domains.get_mut(domain) {
            Some(dn) => std::mem::take(&mut dn.changed),
            None => false,
        }
    }

    /// The domain's reportable nodes (sorted by id) and its busy count.
    pub fn reading(&self, domain: &str) -> DomainReading {
        let Some(dn) = self.domains.get(domain) else {
            return DomainReading {
                nodes: Vec::new(),
                busy: 0,
            };
        };
        let mut nodes = Vec::new();
        let mut busy = 0u64;
        for (id, e) in &dn.nodes {
            busy += u64::from(e.busy());
            if !e.reportable() {
                continue;
            }
            let heard = e.heard.as_ref();
            nodes.push(NodeHealth {
                node_id: id.to_string(),
                health: e.health,
                jobs: heard.map(|h| h.jobs),
                last_heard: heard.map(|h| h.at),
                exit_code: heard.and_then(|h| h.exit_code),
                stderr_tail: heard.and_then(|h| h.stderr_tail.as_deref().map(str::to_string)),
            });
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        DomainReading { nodes, busy }
    }

    /// Node counts by domain and health (reportable nodes only), for metrics.
    pub fn counts(&self) -> BTreeMap<(String, Health), u64> {
        let mut out = BTreeMap::new();
        for (d, dn) in &self.domains {
            for h in Health::ALL {
                out.insert((d.to_string(), h), 0);
            }
            for e in dn.nodes.values() {
                if e.reportable() {
                    *out.entry((d.to_string(), e.health)).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// Last-heard records changed since the last call, ready for `put_batch`, and the
    /// ids of forgotten nodes to delete from the store.
    pub fn take_dirty(&mut self) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
        let mut items = Vec::with_capacity(self.dirty.len());
        for id in self.dirty.drain() {
            let Some(dkey) = self.index.get(&id) else {
                continue;
            };
            let Some(h) = self
                .domains
                .get(dkey)
                .and_then(|dn| dn.nodes.get(&id))
                .and_then(|e| e.heard.as_ref())
            else {
                continue;
            };
            let rec = HeardRecord {
                domain: dkey.to_string(),
                at: h.at,
                state: h.state,
                jobs: h.jobs,
                exit_code: h.exit_code,
                stderr_tail: h.stderr_tail.as_deref().map(str::to_string),
            };
            if let Ok(bytes) = serde_json::to_vec(&rec) {
                items.push((id.to_string(), bytes));
            }
        }
        let forgotten = self.forgotten.drain(..).map(|id| id.to_string()).collect();
        (items, forgotten)
    }

    /// Marks nodes to be persisted again (after a failed write).
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if let Some((k, _)) = self.index.get_key_value(id.as_str()) {
                self.dirty.insert(k.clone());
            }
        }
    }

    /// Loads persisted last-heard records (at start, before any heartbeat).
    pub fn restore(&mut self, records: Vec<(String, HeardRecord)>) {
        for (node_id, r) in records {
            let (id, dkey) = self.locate(&node_id, &r.domain, false);
            if let Some(e) = self
                .domains
                .get_mut(&dkey)
                .and_then(|d| d.nodes.get_mut(&id))
            {
                e.heard = Some(Heard {
                    at: r.at,
                    state: r.state,
                    jobs: r.jobs,
                    exit_code: r.exit_code,
                    stderr_tail: r.stderr_tail.map(String::into_boxed_str),
                });
            }
        }
    }
}

/// The facts the judge needs from a node record.
pub fn facts_of(r: &NodeRecord) -> NodeFacts {
    let terminal_since = if r.state.is_terminal() {
        r.state_times
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, t)| *t)
            .min()
            .or(r.since())
    } else {
        None
    };
    NodeFacts {
        state: r.state,
        running_since: r.state_times.get(&NodeState::Running).copied(),
        terminal_since,
    }
}

/// Where the aggregator stands in the provisioner's change feed: pure, advanced one
/// `describe_nodes` page at a time by [`FeedCursor::step`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedCursor {
    /// Every change up to this revision is applied: the next page is asked
    /// `since` it (0: nothing yet, which the provisioner answers with a full listing).
    pub next: u64,
    /// A full listing is being read: its pages so far are applied, a later one ends it.
    pub listing: bool,
    /// A full listing was read to its end at least once.
    pub synced: bool,
}

/// What one page of the feed means; [`FeedCursor::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedStep {
    /// The cursor once the page is applied.
    pub cursor: FeedCursor,
    /// The page begins a full listing: [`Tracker::begin_listing`] before its records.
    pub begin_listing: bool,
    /// The page ends a full listing: [`Tracker::end_listing`] after its records.
    pub end_listing: bool,
    /// A full listing although the cursor was past 0: the provisioner pruned
    /// records newer than the cursor, or it has a new store.
    pub resync: bool,
    /// Another page follows: ask again, now, `since` the new cursor.
    pub more: bool,
}

/// A `describe_nodes` page the feed cannot follow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// `more`, yet asking `since` the page's `next` would not get further.
    #[error(
        "the provisioner says more records follow, but its page does not advance \
         (asked since {since}, next {next}, {records} records)"
    )]
    Stalled {
        since: u64,
        next: u64,
        records: usize,
    },
}

impl FeedCursor {
    /// The cursor's move for `reply`, the answer to `changes(self.next, limit)`.
    /// Nothing is changed on an error (the same page is asked again next poll).
    pub fn step(self, reply: &DescribeNodesReply) -> Result<FeedStep, FeedError> {
        let stalled = reply.more
            && (reply.nodes.is_empty()
                || reply.next == 0
                || (!reply.full && reply.next <= self.next));
        if stalled {
            return Err(FeedError::Stalled {
                since: self.next,
                next: reply.next,
                records: reply.nodes.len(),
            });
        }
        let listing = self.listing || reply.full;
        let end_listing = listing && !reply.more;
        Ok(FeedStep {
            cursor: FeedCursor {
                next: reply.next,
                listing: listing && reply.more,
                synced: self.synced || end_listing,
            },
            begin_listing: reply.full,
            end_listing,
            resync: reply.full && self.next > 0,
            more: reply.more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("time")
    }

    fn hb(node: &str, domain: &str, jobs: u32, at: i64) -> Heartbeat {
        Heartbeat {
            node_id: node.into(),
            domain: domain.into(),
            state: WorkerState::Ok,
            jobs,
            exit_code: None,
            stderr_tail: None,
            at: t(at),
        }
    }

    fn record(
        node: &str,
        domain: &str,
        state: NodeState,
        times: &[(NodeState, i64)],
    ) -> NodeRecord {
        let mut rec = epu_testkit::records::node(domain, node)
            .run("r")
            .launch("l")
            .driver("local")
            .state(state)
            .build();
        rec.state_times = times.iter().map(|(s, at)| (*s, t(*at))).collect();
        rec
    }

    fn tracker() -> Tracker {
        Tracker::new(Thresholds::default())
    }

    #[test]
    fn heartbeats_count_busy_and_flag_changes() {
        let mut tr = tracker();
        assert!(tr.heartbeat(hb("a", "d", 1, 0), t(0)));
        assert!(
            !tr.heartbeat(hb("a", "d", 1, 1), t(1)),
            "same health and jobs"
        );
        assert!(tr.heartbeat(hb("a", "d", 2, 2), t(2)), "jobs changed");
        tr.heartbeat(hb("b", "d", 3, 2), t(2));
        let r = tr.reading("d");
        assert_eq!(r.busy, 5);
        assert!(
            r.nodes.is_empty(),
            "not reported until the provisioner knows them"
        );
        tr.apply_records(
            &[record(
                "a",
                "d",
                NodeState::Running,
                &[(NodeState::Running, 0)],
            )],
            t(2),
        );
        let r = tr.reading("d");
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].health, Health::Ok);
        assert_eq!(r.nodes[0].jobs, Some(2));
        // Silent past missing_timeout (15 s): MISSING, and its jobs no longer count.
        assert_eq!(tr.sweep(t(20)), 2);
        let r = tr.reading("d");
        assert_eq!(r.nodes[0].health, Health::Missing);
        assert_eq!(r.busy, 0);
    }

    #[test]
    fn the_provisioner_places_nodes() {
        let mut tr = tracker();
        tr.heartbeat(hb("a", "wrong", 0, 0), t(0));
        tr.apply_records(
            &[record(
                "a",
                "right",
                NodeState::Running,
                &[(NodeState::Running, 0)],
            )],
            t(0),
        );
        assert_eq!(tr.reading("right").nodes.len(), 1);
        assert!(tr.reading("wrong").nodes.is_empty());
        // A heartbeat naming another domain does not move a placed node.
        tr.heartbeat(hb("a", "wrong", 0, 1), t(1));
        assert_eq!(tr.reading("right").nodes.len(), 1);
        // Silent for 30 s: MISSING. Heard again (whatever the worker's clock says): OK.
        tr.sweep(t(31));
        assert_eq!(tr.reading("right").nodes[0].health, Health::Missing);
        tr.heartbeat(hb("a", "right", 0, -500), t(31));
        assert_eq!(tr.reading("right").nodes[0].health, Health::Ok);
        assert_eq!(tr.reading("right").nodes[0].last_heard, Some(t(31)));
    }

    #[test]
    fn feed_changes_end_nodes_and_strangers_are_asked_once() {
        let mut tr = tracker();
        let run = [(NodeState::Running, 0)];
        assert_eq!(
            tr.apply_records(&[record("a", "d", NodeState::Running, &run)], t(0)),
            1
        );
        tr.heartbeat(hb("a", "d", 0, 1), t(1));
        tr.heartbeat(hb("stranger", "d", 0, 1), t(1));
        // "a" is known; the stranger's record may be older than the feed: ask once.
        assert_eq!(tr.to_resolve(t(2)), vec!["stranger".to_string()]);
        // The feed's next page says "a" was terminated.
        let gone = record(
            "a",
            "d",
            NodeState::Terminated,
            &[(NodeState::Running, 0), (NodeState::Terminated, 2)],
        );
        tr.apply_records(&[gone], t(2));
        assert!(
            tr.reading("d").nodes.is_empty(),
            "terminated nodes are not reported"
        );
        // The provisioner does not know the stranger: not asked about again.
        tr.apply_resolved(&[], &["stranger".into()], t(2));
        assert!(tr.to_resolve(t(3)).is_empty());
        // Heard 11 s after it was terminated (zombie grace 10 s): ZOMBIE, reported.
        tr.heartbeat(hb("a", "d", 0, 13), t(13));
        let r = tr.reading("d");
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].health, Health::Zombie);
        // Long quiet: forgotten, and deleted from the store.
        tr.take_dirty();
        tr.sweep(t(13) + FORGET_AFTER + TimeDelta::seconds(1));
        assert!(tr.is_empty());
        let (_, forgotten) = tr.take_dirty();
        assert_eq!(forgotten.len(), 2);
    }

    #[test]
    fn a_terminal_record_of_an_untracked_node_is_skipped_until_it_is_heard() {
        let mut tr = tracker();
        let ended = [(NodeState::Running, 0), (NodeState::Terminated, 1)];
        let gone = record("z", "d", NodeState::Terminated, &ended);
        assert_eq!(tr.apply_records(std::slice::from_ref(&gone), t(1)), 0);
        assert!(tr.is_empty(), "nothing to report: not tracked");
        // Heard 12 s after: asked about by id (its record is behind the feed), a ZOMBIE.
        tr.heartbeat(hb("z", "d", 0, 13), t(13));
        assert_eq!(tr.to_resolve(t(13)), vec!["z".to_string()]);
        tr.apply_resolved(&[gone], &["z".into()], t(13));
        assert!(tr.to_resolve(t(13)).is_empty());
        let r = tr.reading("d");
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].health, Health::Zombie);
    }

    /// A full listing ends by dropping the tracked nodes it did not name; a node
    /// heard before it began is settled by it, one heard during it is asked by id.
    #[test]
    fn a_full_listing_drops_what_it_does_not_name() {
        let run = [(NodeState::Running, 0)];
        let rec = |id: &str| record(id, "d", NodeState::Running, &run);
        let ids = |tr: &Tracker| -> Vec<String> {
            tr.reading("d")
                .nodes
                .into_iter()
                .map(|n| n.node_id)
                .collect()
        };
        let mut tr = tracker();
        tr.heartbeat(hb("early", "d", 0, 0), t(0));
        // The first listing, in two pages: a, b, c.
        tr.begin_listing();
        tr.apply_records(&[rec("a"), rec("b")], t(1));
        tr.heartbeat(hb("during", "d", 0, 1), t(1));
        tr.apply_records(&[rec("c")], t(1));
        assert_eq!(tr.end_listing(), 0);
        assert_eq!(ids(&tr), ["a", "b", "c"]);
        assert_eq!(
            tr.to_resolve(t(2)),
            vec!["during".to_string()],
            "'early' was settled by the listing, 'during' may have been skipped by it"
        );
        tr.apply_resolved(&[], &["during".into()], t(2));
        // Changes: d appears.
        tr.apply_records(&[rec("d")], t(3));
        assert!(tr.take_changed("d"));
        // A resync (a provisioner with a new store) names a and d only.
        tr.begin_listing();
        tr.apply_records(&[rec("d")], t(4));
        assert_eq!(
            ids(&tr).len(),
            4,
            "nothing is dropped before the listing ends"
        );
        tr.apply_records(&[rec("a")], t(4));
        assert_eq!(tr.end_listing(), 2);
        assert_eq!(ids(&tr), ["a", "d"]);
        assert!(
            tr.take_changed("d"),
            "the controller hears b and c are gone"
        );
        assert!(
            tr.to_resolve(t(4)).is_empty(),
            "b and c are not asked about"
        );
        // Once quiet, b and c (never heard) are forgotten; the heard ones stay.
        tr.sweep(t(5));
        assert_eq!(tr.len(), 4);
        // A listing begun again before it ended starts over: only what it names stays.
        tr.begin_listing();
        tr.apply_records(&[rec("a"), rec("d")], t(6));
        tr.begin_listing();
        tr.apply_records(&[rec("d")], t(6));
        assert_eq!(tr.end_listing(), 1);
        assert_eq!(ids(&tr), ["d"]);
    }

    fn page(nodes: usize, next: u64, more: bool, full: bool) -> DescribeNodesReply {
        let run = [(NodeState::Running, 0)];
        DescribeNodesReply {
            enabled: true,
            nodes: (0..nodes)
                .map(|i| record(&format!("n{i}"), "d", NodeState::Running, &run))
                .collect(),
            revision: next.max(90),
            next,
            more,
            full,
        }
    }

    #[test]
    fn feed_cursor_steps() {
        let at = |next: u64, listing: bool, synced: bool| FeedCursor {
            next,
            listing,
            synced,
        };
        let step = |cursor: FeedCursor, begin: bool, end: bool, resync: bool, more: bool| {
            Ok(FeedStep {
                cursor,
                begin_listing: begin,
                end_listing: end,
                resync,
                more,
            })
        };
        #[rustfmt::skip]
        let table: Vec<(&str, FeedCursor, DescribeNodesReply, Result<FeedStep, FeedError>)> = vec![
            ("first poll, one page",
             at(0, false, false), page(3, 3, false, true),
             step(at(3, false, true), true, true, false, false)),
            ("first poll, first of several pages",
             at(0, false, false), page(2, 2, true, true),
             step(at(2, true, false), true, false, false, true)),
            ("a middle page of the listing",
             at(2, true, false), page(2, 4, true, false),
             step(at(4, true, false), false, false, false, true)),
            ("the listing's last page",
             at(4, true, false), page(1, 90, false, false),
             step(at(90, false, true), false, true, false, false)),
            ("steady state: nothing changed",
             at(90, false, true), page(0, 90, false, false),
             step(at(90, false, true), false, false, false, false)),
            ("changes",
             at(90, false, true), page(2, 92, false, false),
             step(at(92, false, true), false, false, false, false)),
            ("an empty provisioner: full, nothing",
             at(0, false, true), page(0, 0, false, true),
             step(at(0, false, true), true, true, false, false)),
            ("a new store (since past its head): a resync",
             at(92, false, true), page(1, 5, false, true),
             step(at(5, false, true), true, true, true, false)),
            ("pruned past the cursor mid-listing: the listing starts over",
             at(4, true, false), page(2, 2, true, true),
             step(at(2, true, false), true, false, true, true)),
            ("more, but no records",
             at(90, false, true), page(0, 95, true, false),
             Err(FeedError::Stalled { since: 90, next: 95, records: 0 })),
            ("more, but next does not advance",
             at(90, false, true), page(2, 90, true, false),
             Err(FeedError::Stalled { since: 90, next: 90, records: 2 })),
            ("more from a full listing, but next is 0 (it would list again)",
             at(0, false, false), page(2, 0, true, true),
             Err(FeedError::Stalled { since: 0, next: 0, records: 2 })),
        ];
        for (what, cursor, reply, want) in table {
            assert_eq!(cursor.step(&reply), want, "{what}");
        }
    }

    #[test]
    fn persistence_round_trip() {
        let mut tr = tracker();
        tr.heartbeat(hb("a", "d", 2, 5), t(5));
        let (items, _) = tr.take_dirty();
        assert_eq!(items.len(), 1);
        let rec: HeardRecord = serde_json::from_slice(&items[0].1).expect("json");
        assert_eq!(rec.at, t(5));
        assert_eq!(rec.jobs, 2);
        assert!(tr.take_dirty().0.is_empty(), "only changes are written");
        let mut fresh = tracker();
        fresh.restore(vec![(items[0].0.clone(), rec)]);
        fresh.apply_records(
            &[record(
                "a",
                "d",
                NodeState::Running,
                &[(NodeState::Running, 0)],
            )],
            t(6),
        );
        fresh.sweep(t(6));
        assert_eq!(fresh.reading("d").nodes[0].health, Health::Ok);
        fresh.sweep(t(21));
        assert_eq!(fresh.reading("d").nodes[0].health, Health::Missing);
    }
}
