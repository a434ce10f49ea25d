//! The aggregator's Prometheus metrics (registered in the service's registry).

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts};

/// Every metric the aggregator exports.
#[derive(Clone)]
pub struct AggregatorMetrics {
    /// Heartbeats received and recorded (rate: `rate(epu_sensor_heartbeats_total[1m])`).
    pub heartbeats: IntCounter,
    /// Heartbeats whose body was not a valid heartbeat.
    pub heartbeats_invalid: IntCounter,
    /// Ready messages in the domain's queue (passive declare).
    pub queue_ready: IntGaugeVec,
    /// 1 when the domain's queue was measured, 0 when missing or unreachable.
    pub queue_up: IntGaugeVec,
    /// The domain's backlog: ready + jobs held by healthy workers.
    pub backlog: IntGaugeVec,
    /// Reported nodes by domain and health.
    pub nodes: IntGaugeVec,
    /// Nodes tracked in memory (reported or not).
    pub tracked: IntGauge,
    /// `sensor_info` messages sent to the controller.
    pub sensor_info_sent: IntCounter,
    /// Node records received from the provisioner (feed pages and by-id answers):
    /// flat while the fleet does not change.
    pub node_records: IntCounter,
    /// The provisioner revision applied up to (where the next poll of its feed starts).
    pub node_feed_revision: IntGauge,
    /// Full node listings read to their end (the first sync, and every resync).
    pub node_full_listings: IntCounter,
}

impl AggregatorMetrics {
    fn build() -> Result<Self, prometheus::Error> {
        Ok(AggregatorMetrics {
            heartbeats: IntCounter::new("epu_sensor_heartbeats_total", "heartbeats received")?,
            heartbeats_invalid: IntCounter::new(
                "epu_sensor_heartbeats_invalid_total",
                "heartbeats whose body is not a heartbeat",
            )?,
            queue_ready: IntGaugeVec::new(
                Opts::new(
                    "epu_sensor_queue_ready",
                    "ready messages in the domain's work queue",
                ),
                &["domain"],
            )?,
            queue_up: IntGaugeVec::new(
                Opts::new(
                    "epu_sensor_queue_up",
                    "1 when the domain's work queue was measured, 0 when missing or unreachable",
                ),
                &["domain"],
            )?,
            backlog: IntGaugeVec::new(
                Opts::new(
                    "epu_sensor_backlog",
                    "the domain's backlog: ready messages plus jobs held by healthy workers",
                ),
                &["domain"],
            )?,
            nodes: IntGaugeVec::new(
                Opts::new("epu_sensor_nodes", "reported nodes by domain and health"),
                &["domain", "health"],
            )?,
            tracked: IntGauge::new("epu_sensor_tracked_nodes", "nodes tracked in memory")?,
            sensor_info_sent: IntCounter::new(
                "epu_sensor_info_sent_total",
                "sensor_info messages sent to the controller",
            )?,
            node_records: IntCounter::new(
                "epu_sensor_node_records_total",
                "node records received from the provisioner",
            )?,
            node_feed_revision: IntGauge::new(
                "epu_sensor_node_feed_revision",
                "the provisioner revision applied up to (where the next poll of its change feed starts)",
            )?,
            node_full_listings: IntCounter::new(
                "epu_sensor_node_full_listings_total",
                "full node listings read from the provisioner (first sync and resyncs)",
            )?,
        })
    }

    /// Builds the metrics and registers them in `registry`.
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        registry.register(Box::new(m.heartbeats.clone()))?;
        registry.register(Box::new(m.heartbeats_invalid.clone()))?;
        registry.register(Box::new(m.queue_ready.clone()))?;
        registry.register(Box::new(m.queue_up.clone()))?;
        registry.register(Box::new(m.backlog.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.tracked.clone()))?;
        registry.register(Box::new(m.sensor_info_sent.clone()))?;
        registry.register(Box::new(m.node_records.clone()))?;
        registry.register(Box::new(m.node_feed_revision.clone()))?;
        registry.register(Box::new(m.node_full_listings.clone()))?;
        Ok(m)
    }
}
