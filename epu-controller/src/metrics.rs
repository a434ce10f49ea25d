//! The controller's Prometheus metrics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct ControllerMetrics {
    pub decisions: IntCounterVec,
    pub launches: IntCounterVec,
    pub destroys: IntCounterVec,
    pub desired: IntGaugeVec,
    pub actual: IntGaugeVec,
    pub decision_seconds: HistogramVec,
    /// Store reads and writes that failed, by domain and what the domain was doing
    /// (`op`: `record_launch`, `launch_sent`, `forget_launch`, `launch_failures`,
    /// `read_launches`, `reconfigure`, `remove`). Each is also logged with
    /// `event = "store_failed"`.
    pub store_errors: IntCounterVec,
    /// Resyncs from the provisioner's change feed, by why and how they went.
    pub resyncs: IntCounterVec,
    /// Records a resync brought (changes the messages had not).
    pub resync_records: prometheus::IntCounter,
}

impl ControllerMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let de = ["domain", "engine"];
        let m = ControllerMetrics {
            decisions: IntCounterVec::new(
                Opts::new(
                    "epu_controller_decisions_total",
                    "decisions that asked for a change",
                ),
                &de,
            )?,
            launches: IntCounterVec::new(
                Opts::new(
                    "epu_controller_launches_total",
                    "instances the engines asked to launch",
                ),
                &de,
            )?,
            destroys: IntCounterVec::new(
                Opts::new(
                    "epu_controller_destroys_total",
                    "instances the engines asked to destroy",
                ),
                &de,
            )?,
            desired: IntGaugeVec::new(
                Opts::new(
                    "epu_domain_desired_size",
                    "instances the engine wants after its last decision",
                ),
                &["domain"],
            )?,
            actual: IntGaugeVec::new(
                Opts::new("epu_domain_running_size", "healthy RUNNING instances"),
                &["domain"],
            )?,
            decision_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "epu_controller_decision_seconds",
                    "time to decide and carry out one domain's decision",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
                ]),
                &["engine"],
            )?,
            store_errors: IntCounterVec::new(
                Opts::new(
                    "epu_controller_store_errors_total",
                    "controller store reads and writes that failed",
                ),
                &["domain", "op"],
            )?,
            resyncs: IntCounterVec::new(
                Opts::new(
                    "epu_controller_resyncs_total",
                    "resyncs from the provisioner's change feed (why: interval, gap, start; outcome: ok, failed)",
                ),
                &["why", "outcome"],
            )?,
            resync_records: prometheus::IntCounter::new(
                "epu_controller_resync_records_total",
                "node records the resyncs brought",
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.launches.clone()))?;
        registry.register(Box::new(m.destroys.clone()))?;
        registry.register(Box::new(m.desired.clone()))?;
        registry.register(Box::new(m.actual.clone()))?;
        registry.register(Box::new(m.decision_seconds.clone()))?;
        registry.register(Box::new(m.store_errors.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.resync_records.clone()))?;
        Ok(m)
    }
}
