//! Last-heard times across restarts: read back at start, written in one batch
//! every `persist_interval_ms` (and once more when stopping).

use std::sync::Arc;

use epu_core::store::StoreError;
use tokio::sync::watch;

use crate::tracker::{HeardRecord, LAST_HEARD_TREE};
use crate::{lock, AggregatorError, Inner};

impl Inner {
    pub(crate) async fn restore(&self) -> Result<(), AggregatorError> {
        let store = self.store.clone();
        let raw = tokio::task::spawn_blocking(move || store.scan(LAST_HEARD_TREE))
            .await
            .map_err(|e| StoreError::Backend {
                op: "scan",
                tree: LAST_HEARD_TREE.to_string(),
                source: Box::new(std::io::Error::other(e.to_string())),
            })??;
        let mut records = Vec::with_capacity(raw.len());
        for (key, bytes) in raw {
            match serde_json::from_slice::<HeardRecord>(&bytes) {
                Ok(r) => records.push((key, r)),
                Err(e) => {
                    tracing::warn!(node_id = %key, error = %e, "skipping an unreadable last-heard record")
                }
            }
        }
        let n = records.len();
        lock(&self.tracker).restore(records);
        tracing::info!(
            event = "last_heard_restored",
            nodes = n,
            "restored last-heard times"
        );
        Ok(())
    }

    async fn persist(&self) {
        let (items, forgotten) = lock(&self.tracker).take_dirty();
        if !items.is_empty() {
            let ids: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
            let store = self.store.clone();
            let n = items.len();
            let result =
                tokio::task::spawn_blocking(move || store.put_batch(LAST_HEARD_TREE, &items)).await;
            match result {
                Ok(Ok(())) => tracing::trace!(nodes = n, "last-heard times written"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, nodes = n, "cannot write last-heard times; retrying at the next write");
                    lock(&self.tracker).mark_dirty(ids);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the last-heard write task failed");
                    lock(&self.tracker).mark_dirty(ids);
                }
            }
        }
        if !forgotten.is_empty() {
            let store = self.store.clone();
            let result = tokio::task::spawn_blocking(move || {
                for id in &forgotten {
                    store.delete(LAST_HEARD_TREE, id)?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::warn!("cannot delete the last-heard records of forgotten nodes; they are skipped at the next start");
            }
        }
    }

    pub(crate) async fn persist_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = stop.changed() => true,
                _ = tokio::time::sleep(self.persist_interval) => false,
            };
            self.persist().await;
            if stopping {
                break;
            }
        }
    }
}
