//! The provisioner's Prometheus metrics (registered in its own registry).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `epu_provisioner_nodes` | gauge: node records by state | `state` |
//! | `epu_provisioner_launches_total` | counter: launches by outcome (`ok`, `failed`, `rejected` while disabled, `refused`) | `driver`, `outcome` |
//! | `epu_provisioner_nodes_launched_total` | counter: instances launched | `driver` |
//! | `epu_provisioner_terminations_total` | counter: instances asked to terminate | `driver` |
//! | `epu_provisioner_zombies_terminated_total` | counter | `driver` |
//! | `epu_provisioner_iaas_call_seconds` | histogram of IaaS call latency | `driver`, `call` |
//! | `epu_provisioner_iaas_errors_total` | counter: IaaS errors by class | `driver`, `call`, `class` |
//! | `epu_provisioner_enabled` | gauge: 1 enabled, 0 disabled by `terminate_all` | |

use epu_core::telemetry::Metrics;
use epu_model::NodeState;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::driver::IaasErrorKind;

/// Handles to every metric.
#[derive(Clone)]
pub struct ProvisionerMetrics {
    pub nodes: IntGaugeVec,
    pub launches: IntCounterVec,
    pub nodes_launched: IntCounterVec,
    pub terminations: IntCounterVec,
    pub zombies: IntCounterVec,
    pub iaas_latency: HistogramVec,
    pub iaas_errors: IntCounterVec,
    pub enabled: IntGauge,
}

impl ProvisionerMetrics {
    /// Builds and registers every metric in `metrics`.
    pub fn register(metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let m = ProvisionerMetrics {
            nodes: IntGaugeVec::new(
                Opts::new("epu_provisioner_nodes", "node records by state"),
                &["state"],
            )?,
            launches: IntCounterVec::new(
                Opts::new(
                    "epu_provisioner_launches_total",
                    "launches (provision requests) by driver and outcome",
                ),
                &["driver", "outcome"],
            )?,
            nodes_launched: IntCounterVec::new(
                Opts::new(
                    "epu_provisioner_nodes_launched_total",
                    "instances launched at the IaaS",
                ),
                &["driver"],
            )?,
            terminations: IntCounterVec::new(
                Opts::new(
                    "epu_provisioner_terminations_total",
                    "instances the provisioner asked the IaaS to terminate",
                ),
                &["driver"],
            )?,
            zombies: IntCounterVec::new(
                Opts::new(
                    "epu_provisioner_zombies_terminated_total",
                    "instances of the run unknown to the store, terminated",
                ),
                &["driver"],
            )?,
            iaas_latency: HistogramVec::new(
                HistogramOpts::new(
                    "epu_provisioner_iaas_call_seconds",
                    "latency of IaaS calls (each try)",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["driver", "call"],
            )?,
            iaas_errors: IntCounterVec::new(
                Opts::new(
                    "epu_provisioner_iaas_errors_total",
                    "IaaS call errors by class (capacity, throttled, auth, bad_request, timeout, unavailable, …)",
                ),
                &["driver", "call", "class"],
            )?,
            enabled: IntGauge::new(
                "epu_provisioner_enabled",
                "1 when provisioning is enabled, 0 after terminate_all",
            )?,
        };
        let r = metrics.registry();
        r.register(Box::new(m.nodes.clone()))?;
        r.register(Box::new(m.launches.clone()))?;
        r.register(Box::new(m.nodes_launched.clone()))?;
        r.register(Box::new(m.terminations.clone()))?;
        r.register(Box::new(m.zombies.clone()))?;
        r.register(Box::new(m.iaas_latency.clone()))?;
        r.register(Box::new(m.iaas_errors.clone()))?;
        r.register(Box::new(m.enabled.clone()))?;
        for st in NodeState::ALL {
            m.nodes.with_label_values(&[st.as_str()]).set(0);
        }
        Ok(m)
    }

    pub fn iaas_error(&self, driver: &str, call: &str, kind: IaasErrorKind) {
        self.iaas_errors
            .with_label_values(&[driver, call, kind.label()])
            .inc();
    }

    /// Sets the state gauge from counts indexed like `NodeState::ALL`.
    pub fn set_node_counts(&self, counts: &[i64; 11]) {
        for (i, st) in NodeState::ALL.iter().enumerate() {
            self.nodes.with_label_values(&[st.as_str()]).set(counts[i]);
        }
    }
}
