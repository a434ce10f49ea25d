//! The exit watcher for adopted workers: leaders that are not children of this
//! provisioner, polled in `/proc`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::groups::{is_alive, kill_remains, remains_note};
use super::{lock, DriverEvent, LocalDriver};

#[derive(Clone, Debug)]
pub(super) struct Watched {
    pub(super) node_id: String,
    pub(super) start_time: String,
    /// Our child: its exit comes from `wait`, not from polling.
    pub(super) child: bool,
}

impl LocalDriver {
    /// Starts the `/proc` poller for adopted workers (once).
    pub(super) fn ensure_watcher(&self) {
        if self.watcher_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let watched = self.watched.clone();
        let events = self.events.clone();
        let every = self.settings.poll_interval.max(Duration::from_millis(50));
        let run = self.run.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if events.is_closed() {
                    return;
                }
                let gone: Vec<(i32, Watched)> = {
                    let mut w = lock(&watched);
                    let dead: Vec<i32> = w
                        .iter()
                        .filter(|(pid, info)| {
                            !info.child && !is_alive(**pid, Some(&info.start_time))
                        })
                        .map(|(pid, _)| *pid)
                        .collect();
                    dead.into_iter()
                        .filter_map(|pid| w.remove(&pid).map(|info| (pid, info)))
                        .collect()
                };
                if gone.is_empty() {
                    continue;
                }
                let pgids: Vec<i32> = gone.iter().map(|(pid, _)| *pid).collect();
                let run = run.clone();
                let killed: HashMap<i32, usize> = tokio::task::spawn_blocking(move || {
                    kill_remains(&run, &pgids).into_iter().collect()
                })
                .await
                .unwrap_or_default();
                for (pid, info) in gone {
                    let note = remains_note(killed.get(&pid).copied().unwrap_or(0));
                    let _ = events.send(DriverEvent::Exited {
                        node_id: info.node_id,
                        iaas_id: pid.to_string(),
                        incarnation: Some(info.start_time),
                        detail: format!(
                            "exited (not a child of this provisioner: exit status unknown){note}"
                        ),
                    });
                }
            }
        });
    }

    pub(super) fn adopt_one(&self, pid: i32, node_id: &str, start_time: &str) {
        let mut w = lock(&self.watched);
        w.entry(pid).or_insert_with(|| Watched {
            node_id: node_id.to_string(),
            start_time: start_time.to_string(),
            child: false,
        });
    }
}
