//! Forgetting history: terminal records older than `record_retention_secs` are
//! deleted from the store and from memory, with the launches none of whose nodes
//! is left. The highest pruned revision is kept (`meta/compacted`), so a
//! subscriber whose `since` is older is answered with a full listing.
//!
//! [`prunable`] is pure (records, launches, what is in flight, the cutoff); the
//! caller deletes in one batch and changes memory only after it is written.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::state::State;
use super::Inner;
use crate::record::{launch_key, node_key, StoredLaunch, StoredNode, META_COMPACTED};

/// What one pruning deletes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Prune {
    pub nodes: Vec<String>,
    pub launches: Vec<String>,
}

/// The terminal records that entered their state before `cutoff`, and the
/// launches (not in flight) whose every node is pruned or gone, both sorted.
pub(super) fn prunable(
    nodes: &HashMap<String, StoredNode>,
    launches: &HashMap<String, StoredLaunch>,
    in_flight: &HashSet<String>,
    cutoff: DateTime<Utc>,
) -> Prune {
    let mut old: Vec<String> = nodes
        .values()
        .filter(|n| n.record.state.is_terminal())
        .filter(|n| n.record.since().is_some_and(|t| t < cutoff))
        .map(|n| n.record.node_id.clone())
        .collect();
    old.sort();
    let going: HashSet<&str> = old.iter().map(String::as_str).collect();
    let mut done: Vec<String> = launches
        .values()
        .filter(|l| !in_flight.contains(&l.launch_id))
        .filter(|l| {
            l.node_ids
                .iter()
                .all(|id| going.contains(id.as_str()) || !nodes.contains_key(id))
        })
        .map(|l| l.launch_id.clone())
        .collect();
    done.sort();
    Prune {
        nodes: old,
        launches: done,
    }
}

/// Deletes at most this many records per batch.
const CHUNK: usize = 4096;

impl Inner {
    /// Prunes what [`prunable`] selects at the clock's now; the number of records
    /// deleted. A failed write changes nothing (logged; tried again next time).
    pub(super) async fn prune_once(&self) -> usize {
        let retention = self.settings.retention;
        let mut st = self.state.lock().await;
        let cutoff = self.deps.clock.now() - retention;
        let plan = prunable(&st.nodes, &st.launches, &st.in_flight, cutoff);
        let mut pruned = 0;
        for (i, ids) in plan.nodes.chunks(CHUNK).enumerate() {
            let launches: &[String] = if i == 0 { &plan.launches } else { &[] };
            if !self.prune_batch(&mut st, ids, launches).await {
                return pruned;
            }
            pruned += ids.len();
        }
        if plan.nodes.is_empty() && !plan.launches.is_empty() {
            self.prune_batch(&mut st, &[], &plan.launches).await;
        }
        if pruned > 0 {
            tracing::info!(
                event = "records_pruned",
                nodes = pruned,
                launches = plan.launches.len(),
                compacted = st.compacted,
                "pruned terminal records older than record_retention_secs"
            );
        }
        pruned
    }

    async fn prune_batch(&self, st: &mut State, ids: &[String], launches: &[String]) -> bool {
        let compacted = ids
            .iter()
            .filter_map(|id| st.nodes.get(id).map(|n| n.record.revision))
            .fold(st.compacted, u64::max);
        let deletes: Vec<String> = ids
            .iter()
            .map(|id| node_key(id))
            .chain(launches.iter().map(|l| launch_key(l)))
            .collect();
        let puts = vec![(
            META_COMPACTED.to_string(),
            compacted.to_string().into_bytes(),
        )];
        let store = self.deps.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.write_batch(crate::record::TREE, &puts, &deletes)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(event = "store_failed", error = %e, "cannot prune old records; trying again later");
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "the pruning task failed; trying again later");
                return false;
            }
        }
        for id in ids {
            st.remove_node(id);
        }
        for l in launches {
            st.launches.remove(l);
        }
        st.compacted = compacted;
        self.deps.metrics.set_node_counts(&st.counts);
        true
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};
    use epu_model::messages::Deployable;
    use epu_model::NodeState;
    use epu_testkit::records::node;

    use super::*;
    use epu_core::wire::Service;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn stored(id: &str, launch: &str, state: NodeState, at: i64) -> StoredNode {
        StoredNode::for_controller(node("d", id).launch(launch).state(state).at(t(at)).build())
    }

    fn launch(id: &str, nodes: &[&str]) -> StoredLaunch {
        StoredLaunch {
            launch_id: id.into(),
            domain: "d".into(),
            token: "tok".into(),
            deployable: Deployable::Sim(Default::default()),
            node_ids: nodes.iter().map(|s| s.to_string()).collect(),
            vars: Default::default(),
            subscriber: Service::Controller,
            requested_at: t(0),
        }
    }

    #[test]
    fn only_old_terminal_records_and_their_finished_launches_go() {
        use NodeState::*;
        let cutoff = t(0) + TimeDelta::hours(2);
        let nodes: HashMap<String, StoredNode> = [
            // (id, launch, state, entered its state at)
            stored("old-failed", "l1", Failed, 10),
            stored("old-terminated", "l1", Terminated, 20),
            stored("new-terminated", "l2", Terminated, 7_300),
            stored("old-running", "l2", Running, 10),
            stored("old-rejected", "l3", Rejected, 0),
            stored("just-before", "l4", Terminated, 7_199),
            stored("at-cutoff", "l5", Terminated, 7_200),
        ]
        .into_iter()
        .map(|n| (n.record.node_id.clone(), n))
        .collect();
        let launches: HashMap<String, StoredLaunch> = [
            launch("l1", &["old-failed", "old-terminated"]),
            launch("l2", &["new-terminated", "old-running"]),
            launch("l3", &["old-rejected"]),
            launch("l4", &["just-before"]),
            launch("l5", &["at-cutoff"]),
            // Its nodes were pruned before; not in flight: goes too.
            launch("l6", &["gone"]),
            // In flight: it may still produce instances, kept.
            launch("l7", &["gone-too"]),
        ]
        .into_iter()
        .map(|l| (l.launch_id.clone(), l))
        .collect();
        let in_flight = HashSet::from(["l7".to_string()]);
        let p = prunable(&nodes, &launches, &in_flight, cutoff);
        assert_eq!(
            p.nodes,
            [
                "just-before",
                "old-failed",
                "old-rejected",
                "old-terminated"
            ]
        );
        assert_eq!(p.launches, ["l1", "l3", "l4", "l6"]);
    }

    #[test]
    fn nothing_to_prune_on_a_young_fleet() {
        let nodes: HashMap<String, StoredNode> = [stored("a", "l1", NodeState::Failed, 100)]
            .into_iter()
            .map(|n| (n.record.node_id.clone(), n))
            .collect();
        let launches = HashMap::from([("l1".to_string(), launch("l1", &["a"]))]);
        let p = prunable(&nodes, &launches, &HashSet::new(), t(50));
        assert_eq!(p, Prune::default());
    }
}
