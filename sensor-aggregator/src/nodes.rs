//! What the provisioner knows of the nodes: its change feed (PROTOCOL.md, "The
//! change feed"), followed every `nodes_poll_secs`.
//!
//! Each poll asks `describe_nodes` for the changes after the last revision applied
//! ([`FeedCursor::next`]), [`PAGE`] records at a time, following `more` within the
//! poll. An unchanged fleet costs one request answered with no records. A `full`
//! answer (the first poll, a provisioner with a new store, or a cursor older than
//! what it pruned) is read to its last page, then every tracked node it did not
//! name loses its facts. A node heard that the provisioner has not told about is
//! asked about by id once ([`Tracker::to_resolve`](crate::tracker::Tracker::to_resolve)).
//! When the provisioner does not answer, the cursor stays and the next poll retries.

use std::sync::Arc;

use epu_core::request;
use epu_core::wire::ReplyError;
use epu_model::messages::{DescribeNodesReply, DescribeNodesRequest};
use tokio::sync::watch;

use crate::tracker::{FeedCursor, FeedError};
use crate::{lock, Inner, SENDER};

/// Records per page of the change feed.
pub(crate) const PAGE: usize = 1000;

/// Node ids per by-id `describe_nodes` query.
const RESOLVE_CHUNK: usize = 500;

/// Why a poll of the feed stopped short (its cursor keeps what was applied).
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("describe_nodes: {0}")]
    Provisioner(#[from] ReplyError),
    #[error(transparent)]
    Feed(#[from] FeedError),
}

impl PollError {
    fn event(&self) -> &'static str {
        match self {
            PollError::Provisioner(_) => "provisioner_unavailable",
            PollError::Feed(_) => "node_feed_invalid",
        }
    }
}

/// What one poll took from the feed.
#[derive(Debug, Default)]
struct Fetched {
    pages: usize,
    records: usize,
    /// Nodes a full listing ended without naming.
    dropped: usize,
}

/// The node poll's own state, kept across polls.
#[derive(Debug, Default)]
struct NodesPoll {
    cursor: FeedCursor,
    /// The last poll failed (logged once until it succeeds again).
    failing: bool,
}

impl Inner {
    async fn describe_nodes(
        &self,
        req: &DescribeNodesRequest,
    ) -> Result<DescribeNodesReply, ReplyError> {
        request::call(self.bus.as_ref(), SENDER, req, self.request_timeout).await
    }

    async fn poll_nodes(&self, poll: &mut NodesPoll) {
        let mut fetched = Fetched::default();
        let result = self.follow_feed(&mut poll.cursor, &mut fetched).await;
        let changed = fetched.records > 0 || fetched.dropped > 0;
        if let Err(e) = result {
            if poll.failing {
                tracing::debug!(error = %e, since = poll.cursor.next, "describe_nodes failed again");
            } else {
                tracing::warn!(
                    event = e.event(),
                    error = %e,
                    since = poll.cursor.next,
                    "cannot learn node states from the provisioner; retrying every poll"
                );
            }
            poll.failing = true;
            if changed {
                self.notify.notify_one();
            }
            return;
        }
        if poll.failing {
            tracing::info!(
                event = "provisioner_available",
                revision = poll.cursor.next,
                "the provisioner answers again"
            );
        }
        poll.failing = false;
        tracing::trace!(
            pages = fetched.pages,
            records = fetched.records,
            revision = poll.cursor.next,
            "node feed polled"
        );
        let resolved = self.resolve_unknown().await;
        if changed || resolved {
            self.notify.notify_one();
        }
    }

    /// Reads the feed from `cursor` to its head, applying page by page.
    async fn follow_feed(
        &self,
        cursor: &mut FeedCursor,
        fetched: &mut Fetched,
    ) -> Result<(), PollError> {
        loop {
            let since = cursor.next;
            let reply = self
                .describe_nodes(&if cursor.listing {
                    DescribeNodesRequest::listing_page(since, PAGE)
                } else {
                    DescribeNodesRequest::changes(since, PAGE)
                })
                .await?;
            let step = cursor.step(&reply)?;
            let now = self.clock.now();
            let (applied, dropped, tracked) = {
                let mut tracker = lock(&self.tracker);
                if step.begin_listing {
                    tracker.begin_listing();
                }
                let applied = tracker.apply_records(&reply.nodes, now);
                let dropped = if step.end_listing {
                    tracker.end_listing()
                } else {
                    0
                };
                (applied, dropped, tracker.len())
            };
            let was_synced = cursor.synced;
            *cursor = step.cursor;
            fetched.pages += 1;
            fetched.records += reply.nodes.len();
            fetched.dropped += dropped;
            self.metrics
                .node_records
                .inc_by(u64::try_from(reply.nodes.len()).unwrap_or(u64::MAX));
            self.metrics
                .node_feed_revision
                .set(i64::try_from(cursor.next).unwrap_or(i64::MAX));
            if step.resync {
                tracing::info!(
                    event = "node_feed_resync",
                    since,
                    revision = reply.revision,
                    "the provisioner lists every record again (it pruned past this aggregator's revision, or has a new store)"
                );
            }
            if step.end_listing {
                self.metrics.node_full_listings.inc();
                if !was_synced || step.resync || dropped > 0 {
                    tracing::info!(
                        event = "node_feed_listed",
                        revision = cursor.next,
                        tracked,
                        gone = dropped,
                        "read the provisioner's full node listing"
                    );
                }
            }
            tracing::debug!(
                since,
                next = cursor.next,
                records = reply.nodes.len(),
                applied,
                full = reply.full,
                more = reply.more,
                "node feed page"
            );
            if !step.more {
                return Ok(());
            }
        }
    }

    /// Asks by id about nodes heard that the provisioner has not told about (each
    /// once). Returns whether anything was answered.
    async fn resolve_unknown(&self) -> bool {
        let now = self.clock.now();
        let to_resolve = lock(&self.tracker).to_resolve(now);
        let mut answered = false;
        for chunk in to_resolve.chunks(RESOLVE_CHUNK) {
            let req = DescribeNodesRequest {
                node_ids: chunk.to_vec(),
                ..Default::default()
            };
            match self.describe_nodes(&req).await {
                Ok(r) => {
                    self.metrics
                        .node_records
                        .inc_by(u64::try_from(r.nodes.len()).unwrap_or(u64::MAX));
                    lock(&self.tracker).apply_resolved(&r.nodes, chunk, now);
                    answered = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, nodes = chunk.len(), "describe_nodes by id failed");
                    break;
                }
            }
        }
        answered
    }

    pub(crate) async fn nodes_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut poll = NodesPoll::default();
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.poll_nodes(&mut poll) => {}
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.nodes_poll) => {}
            }
        }
    }
}
