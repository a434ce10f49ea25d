//! The in-memory [`State`], the store commit, and the `instance_info` sender.
//!
//! The rule of [`Inner::commit`]: updates are applied to copies, the changed nodes (and
//! any extra items) are written in one flushed batch, and only then does memory change
//! and `instance_info` get queued. Nothing changes in memory if the write fails,
//! *because* memory and subscribers must never be told a change that a restart would not
//! find in the store (and the next poll recomputes the change from the unchanged record).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use epu_core::store::StoreError;
use epu_core::telemetry::events;
use epu_core::wire::{Envelope, Op, Service};
use epu_model::messages::{FailReason, NodeRecord, StateCounts};
use epu_model::NodeState;
use tokio::sync::mpsc;

use super::reconcile::Memory;
use super::{lock, Inner, SENDER};
use crate::error::ProvisionerError;
use crate::record::{
    apply, node_key, StoredLaunch, StoredNode, Update, META_COMPACTED, META_ENABLED, META_REVISION,
    TREE,
};

/// Everything the provisioner knows, behind `Inner::state`.
#[derive(Default)]
pub(super) struct State {
    pub(super) nodes: HashMap<String, StoredNode>,
    pub(super) launches: HashMap<String, StoredLaunch>,
    pub(super) enabled: bool,
    /// Launches whose IaaS call is being made (they may still produce instances).
    pub(super) in_flight: HashSet<String>,
    /// What the reconciler remembers between polls.
    pub(super) memory: Memory,
    /// Exits that came before the launch result recorded the instance.
    pub(super) early_exits: HashMap<String, (String, String)>,
    /// Node records by state, indexed by [`idx`].
    pub(super) counts: [i64; 11],
    /// `terminate_all` was asked and something of the run is still not terminal.
    pub(super) terminate_all_pending: bool,
    /// The change feed: the last revision given to a change of a record (stored
    /// as `meta/revision` in the batch of the change).
    pub(super) revision: u64,
    /// Node ids by the revision of their record's last change.
    pub(super) by_revision: BTreeMap<u64, String>,
    /// The highest revision of a pruned record: a caller whose `since` is below it
    /// may have missed how a pruned node ended, and is answered with everything.
    pub(super) compacted: u64,
}

impl State {
    /// Makes `n` memory's record of its node (its revision already given),
    /// keeping the counts by state and the revision index.
    pub(super) fn put_node(&mut self, n: StoredNode) {
        if let Some(old) = self.nodes.get(&n.record.node_id) {
            self.counts[idx(old.record.state)] -= 1;
            self.by_revision.remove(&old.record.revision);
        }
        self.counts[idx(n.record.state)] += 1;
        self.revision = self.revision.max(n.record.revision);
        self.by_revision
            .insert(n.record.revision, n.record.node_id.clone());
        self.nodes.insert(n.record.node_id.clone(), n);
    }

    /// Forgets a node (pruning), keeping the counts and the index.
    pub(super) fn remove_node(&mut self, id: &str) -> Option<StoredNode> {
        let n = self.nodes.remove(id)?;
        self.counts[idx(n.record.state)] -= 1;
        self.by_revision.remove(&n.record.revision);
        self.compacted = self.compacted.max(n.record.revision);
        self.memory.missing_since.remove(id);
        self.early_exits.remove(id);
        Some(n)
    }

    /// Gives each of `nodes` the next revision, in order; the store item that
    /// records the new head (for the same batch). Memory's head moves only when
    /// the nodes are put ([`State::put_node`]) after the batch is written.
    pub(super) fn stamp<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a mut StoredNode>,
    ) -> (String, Vec<u8>) {
        let mut next = self.revision;
        for n in nodes {
            next += 1;
            n.record.revision = next;
        }
        (META_REVISION.to_string(), next.to_string().into_bytes())
    }

    /// The records changed after `since` (every record when `from` is 0), oldest
    /// change first.
    pub(super) fn changed_after(&self, from: u64) -> impl Iterator<Item = &NodeRecord> {
        self.by_revision
            .range(from.saturating_add(1)..)
            .filter_map(|(_, id)| self.nodes.get(id).map(|n| &n.record))
    }

    /// How many nodes are not in a terminal state.
    pub(super) fn remaining(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| !n.record.state.is_terminal())
            .count()
    }
}

/// One `instance_info` to send.
pub(super) struct Outgoing {
    pub(super) to: Service,
    pub(super) record: NodeRecord,
}

/// The queue of `instance_info`: commits push, one sender task drains it in order.
pub(super) struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
}

impl Outbox {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Outbox {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Queues a report (dropped only once the sender task is gone, at shutdown).
    pub(super) fn send(&self, to: Service, record: NodeRecord) {
        let _ = self.tx.send(Outgoing { to, record });
    }

    /// The receiving end, once (for the sender task).
    pub(super) fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Outgoing>> {
        lock(&self.rx).take()
    }
}

/// The index of `s` in [`State::counts`].
pub(super) fn idx(s: NodeState) -> usize {
    s as usize
}

/// A fail reason as its wire string ("" for none).
pub(super) fn reason_str(r: Option<FailReason>) -> String {
    r.and_then(|r| serde_json::to_value(r).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The `node_state` lifecycle event.
pub(super) fn log_state(rec: &NodeRecord) {
    tracing::info!(
        event = events::NODE_STATE,
        node_id = %rec.node_id,
        domain = %rec.domain,
        launch_id = %rec.launch_id,
        driver = %rec.driver,
        iaas_id = rec.iaas_id.as_deref().unwrap_or(""),
        state = %rec.state,
        reason = %reason_str(rec.reason),
        reason_detail = rec.reason_detail.as_deref().unwrap_or(""),
        "node state"
    );
}

/// Node counts by state name, leaving out states with none.
pub(super) fn state_counts(counts: &[i64; 11]) -> StateCounts {
    NodeState::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n != 0)
        .map(|(st, n)| (*st, *n))
        .collect()
}

impl Inner {
    /// Writes `items` to the provisioner's tree in one atomic, flushed batch.
    pub(super) async fn store_batch(
        &self,
        items: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ProvisionerError> {
        if items.is_empty() {
            return Ok(());
        }
        let store = self.deps.store.clone();
        tokio::task::spawn_blocking(move || store.put_batch(TREE, &items))
            .await
            .map_err(|e| ProvisionerError::Task(e.to_string()))??;
        Ok(())
    }

    /// Loads the records, launches and enabled flag from the store into memory.
    pub(super) async fn load(&self) -> Result<(), ProvisionerError> {
        let store = self.deps.store.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            use epu_core::store::StoreExt;
            let nodes = store.scan_prefix_json::<StoredNode>(TREE, "node/")?;
            let launches = store.scan_prefix_json::<StoredLaunch>(TREE, "launch/")?;
            let enabled = store.get_json::<bool>(TREE, META_ENABLED)?;
            let revision = store.get_json::<u64>(TREE, META_REVISION)?;
            let compacted = store.get_json::<u64>(TREE, META_COMPACTED)?;
            Ok::<_, StoreError>((nodes, launches, enabled, revision, compacted))
        })
        .await
        .map_err(|e| ProvisionerError::Task(e.to_string()))??;
        let (nodes, launches, enabled, revision, compacted) = loaded;
        let mut st = self.state.lock().await;
        st.enabled = enabled.unwrap_or(true);
        st.revision = revision.unwrap_or(0);
        st.compacted = compacted.unwrap_or(0);
        let mut unstamped = Vec::new();
        for (_, n) in nodes {
            if n.record.revision == 0 {
                unstamped.push(n);
            } else {
                st.put_node(n);
            }
        }
        // Records of a store written before revisions existed get theirs in memory;
        // each is stored with it at its next change.
        let _ = st.stamp(unstamped.iter_mut());
        for n in unstamped {
            st.put_node(n);
        }
        for (_, l) in launches {
            st.launches.insert(l.launch_id.clone(), l);
        }
        self.deps.metrics.set_node_counts(&st.counts);
        self.deps.metrics.enabled.set(i64::from(st.enabled));
        tracing::info!(
            nodes = st.nodes.len(),
            launches = st.launches.len(),
            enabled = st.enabled,
            "loaded the provisioner's records"
        );
        Ok(())
    }

    /// Applies `updates` (and writes `extra` items) in one flushed batch, then queues an
    /// `instance_info` for every node that changed. Nothing changes in memory if the
    /// write fails.
    pub(super) async fn commit(
        &self,
        st: &mut State,
        updates: Vec<Update>,
        extra: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ProvisionerError> {
        let now = self.deps.clock.now();
        let mut working: HashMap<String, StoredNode> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        // Every change, for the log: (node, record after it, its state changed).
        // Every change, in order: (where it goes, the record after it, its state
        // changed). Each takes the next revision, so the feed has no holes.
        let mut applied: Vec<(Service, NodeRecord, bool)> = Vec::new();
        let mut head = st.revision;
        for u in &updates {
            if !working.contains_key(&u.node_id) {
                let Some(n) = st.nodes.get(&u.node_id) else {
                    tracing::debug!(node_id = %u.node_id, "update for an unknown node dropped");
                    continue;
                };
                working.insert(u.node_id.clone(), n.clone());
                order.push(u.node_id.clone());
            }
            let Some(cur) = working.get_mut(&u.node_id) else {
                continue;
            };
            let a = apply(cur, u, now);
            if a.any() {
                head += 1;
                cur.record.revision = head;
                applied.push((cur.subscriber, cur.record.clone(), a.state));
            } else if let Some(s) = u.state {
                tracing::debug!(node_id = %u.node_id, state = %s, current = %cur.record.state, "duplicate or out-of-order state dropped");
            }
        }
        if applied.is_empty() && extra.is_empty() {
            return Ok(());
        }
        order.retain(|id| {
            working
                .get(id)
                .is_some_and(|n| n.record.revision > st.revision)
        });
        let mut items = extra;
        if head > st.revision {
            items.push((META_REVISION.to_string(), head.to_string().into_bytes()));
        }
        for id in &order {
            if let Some(n) = working.get(id) {
                let bytes = serde_json::to_vec(n).map_err(|source| StoreError::Encode {
                    tree: TREE.to_string(),
                    key: node_key(id),
                    source,
                })?;
                items.push((node_key(id), bytes));
            }
        }
        self.store_batch(items).await?;
        for id in order {
            if let Some(n) = working.remove(&id) {
                if n.record.state.is_terminal() {
                    st.memory.missing_since.remove(&id);
                    st.early_exits.remove(&id);
                }
                st.put_node(n);
            }
        }
        self.deps.metrics.set_node_counts(&st.counts);
        // Every change is published, facts too, each with its own revision: a
        // subscriber that sees one skipped knows it missed something and resyncs.
        for (to, record, state_changed) in applied {
            if state_changed {
                log_state(&record);
            }
            self.outbox.send(to, record);
        }
        if st.terminate_all_pending && st.remaining() == 0 {
            st.terminate_all_pending = false;
            tracing::info!(event = events::TERMINATE_ALL_DONE, run = %self.settings.run, "terminate_all: nothing of the run is left");
        }
        Ok(())
    }

    /// Commits in chunks (a poll of 100,000 nodes must not hold them all twice over in
    /// memory) and logs a failed write; the poll reports the world again next time.
    pub(super) async fn commit_logged(&self, st: &mut State, mut updates: Vec<Update>) {
        const CHUNK: usize = 4096;
        while !updates.is_empty() {
            let rest = updates.split_off(updates.len().min(CHUNK));
            if let Err(e) = self.commit(st, updates, Vec::new()).await {
                tracing::error!(error = %e, "cannot store node updates; they are retried at the next poll");
            }
            updates = rest;
        }
    }

    /// The sender task: publishes queued `instance_info` in order; at stop, drains what
    /// is queued (for up to 5 s) and returns.
    pub(super) async fn send_loop(&self, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
        let mut stopping = self.life.stopping.subscribe();
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(m) => self.publish(m).await,
                    None => return,
                },
                _ = stopping.changed() => {
                    // Drain what is queued, then stop.
                    let drain = async {
                        while let Ok(m) = rx.try_recv() {
                            self.publish(m).await;
                        }
                    };
                    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
                        tracing::warn!("gave up sending queued instance_info at shutdown");
                    }
                    return;
                }
            }
        }
    }

    async fn publish(&self, m: Outgoing) {
        let run = &self.settings.run;
        let env = match Envelope::with_body(run, Op::InstanceInfo, SENDER, &m.record) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode instance_info");
                return;
            }
        };
        if let Err(e) = self.deps.bus.send(m.to, &env).await {
            tracing::warn!(
                node_id = %m.record.node_id,
                state = %m.record.state,
                to = %m.to,
                error = %e,
                "cannot send instance_info; the subscriber can catch up with describe_nodes"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use chrono::{DateTime, TimeZone, Utc};
    use epu_core::bus::local::LocalBus;
    use epu_core::bus::BusOptions;
    use epu_core::clock::ManualClock;
    use epu_core::store::{MemStore, Store, StoreExt};
    use epu_core::wire::RunName;

    use super::*;
    use crate::config::ProvisionerConfig;
    use crate::driver::Drivers;
    use crate::service::Provisioner;

    /// A [`MemStore`] whose writes fail while `down` is set; counts the batches asked.
    #[derive(Debug, Default)]
    struct FlakyStore {
        mem: MemStore,
        down: AtomicBool,
        batches: AtomicUsize,
    }

    impl Store for FlakyStore {
        fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.mem.get(tree, key)
        }
        fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.mem.put(tree, key, value)
        }
        fn write_batch(
            &self,
            tree: &str,
            puts: &[(String, Vec<u8>)],
            deletes: &[String],
        ) -> Result<(), StoreError> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Backend {
                    op: "write_batch",
                    tree: tree.to_string(),
                    source: "disk full".into(),
                });
            }
            self.mem.write_batch(tree, puts, deletes)
        }
        fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
            self.mem.delete(tree, key)
        }
        fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.mem.scan(tree)
        }
        fn scan_prefix(
            &self,
            tree: &str,
            prefix: &str,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.mem.scan_prefix(tree, prefix)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.mem.flush()
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    /// An unstarted provisioner over `store` (no drivers), its clock at `t(0)`.
    fn inner(store: Arc<FlakyStore>) -> Arc<Inner> {
        let run = RunName::new("state-test").expect("run name");
        let bus = LocalBus::new(run.clone(), BusOptions::new("host"));
        let view: Arc<dyn epu_core::bus::Bus> = Arc::new(bus.view(BusOptions::new("provisioner")));
        let clock = ManualClock::new(t(0));
        Provisioner::new(
            ProvisionerConfig::new(run),
            view,
            store,
            clock.shared(),
            Drivers::new(),
        )
        .expect("provisioner")
        .inner
    }

    fn running(id: &str) -> StoredNode {
        let mut rec = epu_testkit::records::node("d", id)
            .run("state-test")
            .launch("l1")
            .iaas("i-1")
            .revision(1)
            .build();
        rec.state_times.clear();
        StoredNode::for_controller(rec)
    }

    /// A state holding one RUNNING node `n1`, missing since `t(0)`, with an early exit.
    fn one_running() -> State {
        let mut st = State::default();
        st.put_node(running("n1"));
        st.memory.missing_since.insert("n1".into(), t(0));
        st.early_exits
            .insert("n1".into(), ("i-1".into(), "exit code 1".into()));
        st
    }

    fn queued(inner: &Inner) -> Vec<(Service, NodeState)> {
        let mut rx = inner.outbox.take_receiver().expect("receiver");
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push((m.to, m.record.state));
        }
        out
    }

    fn queued_revisions(inner: &Inner) -> Vec<(String, u64)> {
        let mut rx = inner.outbox.take_receiver().expect("receiver");
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push((m.record.node_id, m.record.revision));
        }
        out
    }

    #[tokio::test]
    async fn every_changed_record_takes_the_next_revision_stored_in_the_same_batch() {
        let store = Arc::new(FlakyStore::default());
        let inner = inner(store.clone());
        let mut st = one_running();
        let mut n2 = running("n2");
        let _ = st.stamp([&mut n2]);
        st.put_node(n2);
        assert_eq!(st.revision, 2);
        // A failed write gives out no revision.
        store.down.store(true, Ordering::SeqCst);
        let ups = vec![Update::state("n1", NodeState::Terminating)];
        assert!(inner.commit(&mut st, ups, Vec::new()).await.is_err());
        assert_eq!(st.revision, 2);
        store.down.store(false, Ordering::SeqCst);
        // Each change takes the next revision, in order; a record keeps its last.
        // Dropped updates (backwards, unknown) take none.
        let ups = vec![
            Update::state("n2", NodeState::Terminating),
            Update::state("n1", NodeState::Terminating),
            Update::state("n2", NodeState::Terminated),
            Update::state("n1", NodeState::Pending),
            Update::state("nobody", NodeState::Failed),
        ];
        inner
            .commit(&mut st, ups, Vec::new())
            .await
            .expect("commit");
        assert_eq!(st.revision, 5);
        assert_eq!(st.nodes["n2"].record.revision, 5);
        assert_eq!(st.nodes["n2"].record.state, NodeState::Terminated);
        assert_eq!(st.nodes["n1"].record.revision, 4);
        let head: Option<u64> = store.mem.get_json(TREE, META_REVISION).expect("get");
        assert_eq!(head, Some(5));
        let stored: Option<StoredNode> = store.mem.get_json(TREE, &node_key("n2")).expect("get");
        assert_eq!(stored.map(|n| n.record.revision), Some(5));
        // One report per change: no hole in the revisions a subscriber sees.
        assert_eq!(
            queued_revisions(&inner),
            [
                ("n2".to_string(), 3),
                ("n1".to_string(), 4),
                ("n2".to_string(), 5)
            ]
        );
        // The feed from a revision: only what changed after it, oldest first.
        let ids = |from| {
            st.changed_after(from)
                .map(|r| r.node_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0), ["n1", "n2"]);
        assert_eq!(ids(4), ["n2"]);
        assert!(ids(5).is_empty());
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing_in_memory_and_publishes_nothing() {
        let store = Arc::new(FlakyStore::default());
        store.down.store(true, Ordering::SeqCst);
        let inner = inner(store.clone());
        let mut st = one_running();
        let ups = vec![Update::failed("n1", FailReason::NodeDisappeared, "gone")];
        let r = inner.commit(&mut st, ups, Vec::new()).await;
        assert!(matches!(r, Err(ProvisionerError::Store(_))), "{r:?}");
        assert_eq!(st.nodes["n1"], running("n1"));
        assert_eq!(st.counts[idx(NodeState::Running)], 1);
        assert_eq!(st.counts[idx(NodeState::Failed)], 0);
        assert!(st.memory.missing_since.contains_key("n1"));
        assert!(st.early_exits.contains_key("n1"));
        assert!(queued(&inner).is_empty());
        assert_eq!(store.mem.scan(TREE).expect("scan"), Vec::new());
    }

    #[tokio::test]
    async fn a_stored_change_updates_memory_and_is_queued() {
        let store = Arc::new(FlakyStore::default());
        let inner = inner(store.clone());
        let mut st = one_running();
        let ups = vec![Update::failed("n1", FailReason::NodeDisappeared, "gone")];
        inner
            .commit(&mut st, ups, Vec::new())
            .await
            .expect("commit");
        let rec = &st.nodes["n1"].record;
        assert_eq!(rec.state, NodeState::Failed);
        assert_eq!(
            rec.state_times.get(&NodeState::Failed),
            Some(&t(0)),
            "the clock's now"
        );
        assert_eq!(st.counts[idx(NodeState::Running)], 0);
        assert_eq!(st.counts[idx(NodeState::Failed)], 1);
        // A terminal node is no longer missing and has no exit to wait for.
        assert!(st.memory.missing_since.is_empty());
        assert!(st.early_exits.is_empty());
        let stored: Option<StoredNode> = store.mem.get_json(TREE, &node_key("n1")).expect("get");
        assert_eq!(stored.as_ref(), st.nodes.get("n1"));
        assert_eq!(queued(&inner), [(Service::Controller, NodeState::Failed)]);
    }

    #[tokio::test]
    async fn facts_are_stored_and_published_with_their_revision() {
        let store = Arc::new(FlakyStore::default());
        let inner = inner(store.clone());
        let mut st = one_running();
        let ups = vec![Update {
            node_id: "n1".into(),
            addresses: Some(vec!["10.0.0.1".into()]),
            ..Update::default()
        }];
        inner
            .commit(&mut st, ups, Vec::new())
            .await
            .expect("commit");
        assert_eq!(st.nodes["n1"].record.addresses, ["10.0.0.1"]);
        let stored: Option<StoredNode> = store.mem.get_json(TREE, &node_key("n1")).expect("get");
        assert_eq!(
            stored.map(|n| n.record.addresses),
            Some(vec!["10.0.0.1".to_string()])
        );
        assert_eq!(queued_revisions(&inner), [("n1".to_string(), 2)]);
    }

    #[tokio::test]
    async fn nothing_new_writes_nothing() {
        let store = Arc::new(FlakyStore::default());
        store.down.store(true, Ordering::SeqCst);
        let inner = inner(store.clone());
        let mut st = one_running();
        let ups = vec![
            // Out of order, duplicate, and unknown: all dropped.
            Update::state("n1", NodeState::Pending),
            Update::state("n1", NodeState::Running),
            Update::state("nobody", NodeState::Failed),
        ];
        inner
            .commit(&mut st, ups, Vec::new())
            .await
            .expect("nothing to write, so the store is not asked");
        assert_eq!(store.batches.load(Ordering::SeqCst), 0);
        assert_eq!(st.nodes["n1"], running("n1"));
    }

    #[tokio::test]
    async fn enable_keeps_the_flag_when_it_cannot_be_stored() {
        let store = Arc::new(FlakyStore::default());
        store.down.store(true, Ordering::SeqCst);
        let inner = inner(store.clone());
        assert!(inner.enable().await.is_err());
        assert!(!inner.state.lock().await.enabled);
        store.down.store(false, Ordering::SeqCst);
        inner.enable().await.expect("enable");
        assert!(inner.state.lock().await.enabled);
        let flag: Option<bool> = store.mem.get_json(TREE, META_ENABLED).expect("get");
        assert_eq!(flag, Some(true));
    }
}
