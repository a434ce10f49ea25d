//! The aggregator's lifecycle: the one [`Service`] lifecycle of every epu
//! service. `start` restores the last-heard times, starts every task and serves
//! the `sensor-aggregator` queue, then raises readiness; the [`RunningAggregator`]
//! it returns owns those tasks, and `stop` lowers readiness, stops serving and
//! ends them (bounded).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epu_core::bus::Server;
use epu_core::service::{run_service, Running, Service};
use epu_core::telemetry::{events, Health};
use epu_core::wire::Service as BusService;
use tokio::task::JoinHandle;

use crate::handlers::AggregatorHandler;
use crate::{lock, Aggregator, AggregatorError, DomainSensors, SENDER};

/// How long stopping waits for the aggregator's tasks before aborting them.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// A started aggregator: it owns every task the aggregator spawned (the node poll,
/// reporting, persisting, the learner and the queue probes). Stop it with
/// [`RunningAggregator::stop`].
pub struct RunningAggregator {
    aggregator: Aggregator,
    server: Server,
    tasks: Vec<JoinHandle<()>>,
}

impl Aggregator {
    /// Reads the persisted last-heard times, starts polling the provisioner and the
    /// queues, reporting and persisting, and serves the `sensor-aggregator` queue;
    /// then raises readiness (the [`Service`] lifecycle). Returns once serving.
    pub async fn start(&self) -> Result<RunningAggregator, AggregatorError> {
        <Self as Service>::start(self).await
    }

    /// Starts, runs until `shutdown` completes, then stops.
    pub async fn run<S>(&self, shutdown: S) -> Result<(), AggregatorError>
    where
        S: Future<Output = ()> + Send,
    {
        run_service(self, shutdown).await
    }

    async fn serve_queue(&self) -> Result<RunningAggregator, AggregatorError> {
        let inner = &self.inner;
        {
            let mut started = lock(&inner.started);
            if started.is_some() {
                return Err(AggregatorError::AlreadyStarted);
            }
            *started = Some(Instant::now());
        }
        inner.restore().await?;
        let tasks = vec![
            tokio::spawn(inner.clone().nodes_loop(inner.stop.subscribe())),
            tokio::spawn(inner.clone().report_loop(inner.stop.subscribe())),
            tokio::spawn(inner.clone().persist_loop(inner.stop.subscribe())),
            tokio::spawn(inner.clone().learn_loop(inner.stop.subscribe())),
        ];
        let domains: Vec<DomainSensors> = lock(&inner.domains).values().cloned().collect();
        for d in domains {
            inner.start_probe(&d);
        }
        let server = inner
            .bus
            .serve(
                BusService::SensorAggregator,
                Arc::new(AggregatorHandler(inner.clone())),
            )
            .await;
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                // Not started after all: end what was started.
                let _ = inner.stop.send_replace(true);
                join_bounded(tasks, "sensor aggregator tasks").await;
                join_bounded(inner.take_probes(), "queue probes").await;
                return Err(e.into());
            }
        };
        tracing::info!(event = events::SERVICE_STARTED, service = SENDER, run = %inner.run, "sensor aggregator serving");
        Ok(RunningAggregator {
            aggregator: self.clone(),
            server,
            tasks,
        })
    }
}

impl RunningAggregator {
    pub fn aggregator(&self) -> &Aggregator {
        &self.aggregator
    }

    /// Lowers readiness, stops consuming, stops every task, and writes the
    /// last-heard times one last time.
    pub async fn stop(self) {
        <Self as Running>::stop(self).await
    }

    async fn stop_serving(self) {
        let inner = &self.aggregator.inner;
        tracing::info!(event = events::SERVICE_STOPPING, service = SENDER, run = %inner.run, "stopping");
        self.server.stop().await;
        let _ = inner.stop.send_replace(true);
        join_bounded(self.tasks, "sensor aggregator tasks").await;
        join_bounded(inner.take_probes(), "queue probes").await;
        inner.brokers.close().await;
    }

    /// Stops at once *without* the final write of last-heard times, as a crash would
    /// (for tests of restarts).
    pub async fn abort(self) {
        let inner = &self.aggregator.inner;
        inner.readiness.set_ready(false);
        for t in &self.tasks {
            t.abort();
        }
        self.server.stop().await;
        let _ = inner.stop.send_replace(true);
        join_bounded(self.tasks, "sensor aggregator tasks").await;
        join_bounded(inner.take_probes(), "queue probes").await;
        inner.brokers.close().await;
    }
}

/// Waits for `tasks` together for up to [`STOP_WITHIN`], then aborts the rest.
async fn join_bounded(tasks: Vec<JoinHandle<()>>, what: &str) {
    let deadline = tokio::time::Instant::now() + STOP_WITHIN;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!("{what} did not finish in {STOP_WITHIN:?}; stopping them");
            t.abort();
            let _ = t.await;
        }
    }
}

#[async_trait::async_trait]
impl Service for Aggregator {
    const NAME: &'static str = SENDER;
    type Running = RunningAggregator;
    type Error = AggregatorError;

    fn readiness(&self) -> &Health {
        &self.inner.readiness
    }

    async fn serve(&self) -> Result<RunningAggregator, AggregatorError> {
        self.serve_queue().await
    }
}

#[async_trait::async_trait]
impl Running for RunningAggregator {
    fn readiness(&self) -> &Health {
        &self.aggregator.inner.readiness
    }

    async fn halt(self) {
        self.stop_serving().await
    }
}
