//! What the provisioner knows of the nodes: `describe_nodes` with `live_only`
//! every `nodes_poll_secs`, plus by-id queries for nodes that left the live list or
//! heartbeat without being listed.

use std::sync::Arc;

use epu_core::request;
use epu_core::wire::ReplyError;
use epu_model::messages::{DescribeNodesReply, DescribeNodesRequest};
use tokio::sync::watch;

use crate::{lock, Inner, SENDER};

/// Node ids per by-id `describe_nodes` query.
const RESOLVE_CHUNK: usize = 500;

impl Inner {
    async fn describe_nodes(
        &self,
        req: &DescribeNodesRequest,
    ) -> Result<DescribeNodesReply, ReplyError> {
        request::call(self.bus.as_ref(), SENDER, req, self.request_timeout).await
    }

    async fn poll_nodes(&self, failing: &mut bool) {
        let live = DescribeNodesRequest {
            domain: None,
            node_ids: Vec::new(),
            live_only: true,
            ..Default::default()
        };
        let reply = match self.describe_nodes(&live).await {
            Ok(r) => r,
            Err(e) => {
                if *failing {
                    tracing::debug!(error = %e, "describe_nodes failed again");
                } else {
                    tracing::warn!(event = "provisioner_unavailable", error = %e, "cannot learn node states from the provisioner; retrying every poll");
                }
                *failing = true;
                return;
            }
        };
        if *failing {
            tracing::info!(
                event = "provisioner_available",
                "the provisioner answers again"
            );
        }
        *failing = false;
        let now = self.clock.now();
        let to_resolve = {
            let mut tracker = lock(&self.tracker);
            tracker.apply_records(&reply.nodes, true, now);
            tracker.to_resolve(now)
        };
        for chunk in to_resolve.chunks(RESOLVE_CHUNK) {
            let req = DescribeNodesRequest {
                domain: None,
                node_ids: chunk.to_vec(),
                live_only: false,
                ..Default::default()
            };
            match self.describe_nodes(&req).await {
                Ok(r) => lock(&self.tracker).apply_resolved(&r.nodes, chunk, now),
                Err(e) => {
                    tracing::debug!(error = %e, "describe_nodes by id failed");
                    break;
                }
            }
        }
        self.notify.notify_one();
    }

    pub(crate) async fn nodes_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.poll_nodes(&mut failing) => {}
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.nodes_poll) => {}
            }
        }
    }
}
