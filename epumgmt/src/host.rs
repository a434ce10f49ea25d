//! The standalone host: every service of a run in this one process, on the
//! in-process bus, reachable by `epumgmt` through `<run dir>/epu.sock`. Workers
//! are local processes. No broker is needed.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use decision_engines::Registry;
use epu_controller::{
    load_policies, Controller, ControllerConfig, ControllerDeps, ControllerSetup,
};
use epu_core::bus::local::LocalBus;
use epu_core::bus::socket::{SocketServer, SOCKET_FILE};
use epu_core::bus::{BusMetrics, BusOptions};
use epu_core::clock::SystemClock;
use epu_core::config::{LogFormat, TelemetryConfig};
use epu_core::store::SledStore;
use epu_core::telemetry::{init_tracing, spawn_http, Health, Metrics};
use epu_core::wire::RunName;
use sensor_aggregator::DomainSensors;
use serde_json::{json, Map, Value};

use crate::plan::LaunchPlan;
use crate::rundir::{write_private, RunRecord, RunState, ServiceRecord};

/// The aggregator's per-domain sensor settings, from the domains' policies as the
/// run `run` sees them (`{run}` and `{domain}` filled in): each policy's `health`
/// and `sensors` in the aggregator's own type, as its config file's `domains`.
pub fn sensor_domains(plan: &LaunchPlan, run: &str) -> anyhow::Result<Vec<Value>> {
    let registry = Registry::with_builtins();
    let policies = load_policies(&plan.domains, &registry, run)?;
    policies
        .values()
        .map(|p| {
            let d = DomainSensors::from_policy(p.name.clone(), p.health, &p.sensors);
            serde_json::to_value(d)
                .with_context(|| format!("encoding the sensor settings of domain {}", p.name))
        })
        .collect()
}

/// A service's config: the plan's section with the run's own settings laid over.
fn merged(section: &Map<String, Value>, fixed: Value) -> Value {
    let mut cfg = section.clone();
    if let Value::Object(f) = fixed {
        for (k, v) in f {
            cfg.entry(k).or_insert(v);
        }
    }
    Value::Object(cfg)
}

fn parse_config<T: serde::de::DeserializeOwned>(cfg: Value, what: &str) -> anyhow::Result<T> {
    serde_json::from_value(cfg).with_context(|| format!("the plan's [{what}] section is not valid"))
}

fn config_for<T: serde::de::DeserializeOwned>(
    section: &Map<String, Value>,
    fixed: Value,
    what: &str,
) -> anyhow::Result<T> {
    parse_config(merged(section, fixed), what)
}

fn open_store(dir: &Path, name: &str) -> anyhow::Result<Arc<SledStore>> {
    let p = dir.join("stores").join(name);
    Ok(Arc::new(
        SledStore::open(&p).with_context(|| format!("opening {}", p.display()))?,
    ))
}

pub async fn run_standalone(rec: &mut RunRecord, plan: &LaunchPlan) -> anyhow::Result<()> {
    let dir = rec.run_dir.clone();
    let log_file = dir.join("logs").join("host.jsonl");
    init_tracing(&TelemetryConfig {
        log_format: LogFormat::Json,
        log_level: "info".into(),
        http_addr: None,
        log_file: Some(log_file.clone()),
    })?;
    let run = RunName::new(&rec.run).map_err(|e| anyhow::anyhow!("{e}"))?;
    let metrics = Metrics::new();
    let ready = Health::new();
    let (http, _http_task) = spawn_http(
        "127.0.0.1:0".parse()?,
        metrics.clone(),
        ready.clone(),
        std::future::pending::<()>(),
    )
    .await?;
    let secret = rec.secret()?;
    let bus_metrics = BusMetrics::register(metrics.registry())?;
    let opts = |sender: &str| {
        BusOptions::new(sender)
            .with_secret(secret.as_bytes())
            .with_metrics(bus_metrics.clone())
    };
    let bus = LocalBus::new(run.clone(), opts("host"));
    let socket = SocketServer::bind(&dir.join(SOCKET_FILE), bus.clone()).await?;
    let clock = SystemClock::shared();
    let fixed = json!({"run": run, "bus": {"transport": "local"}});

    // Provisioner, with local-process workers.
    let mut pfixed = fixed.clone();
    pfixed["store"] = json!({"path": dir.join("stores").join("provisioner")});
    pfixed["run_dir"] = json!(dir);
    let praw = merged(&plan.provisioner, pfixed);
    // Kept in the run directory, as in AMQP mode: `killrun` reads it to terminate
    // the run's instances by their tag when this host is gone.
    write_private(
        &crate::teardown::provisioner_config_path(&dir),
        serde_json::to_string_pretty(&praw)?.as_bytes(),
    )?;
    let pcfg: provisioner::ProvisionerConfig = parse_config(praw, "provisioner")?;
    let drivers = provisioner::drivers_from_config(&pcfg, clock.clone()).await?;
    let prov = provisioner::Provisioner::from_parts(
        pcfg,
        provisioner::ProvisionerDeps {
            bus: Arc::new(bus.view(opts("provisioner"))),
            store: open_store(&dir, "provisioner")?,
            clock: clock.clone(),
            drivers,
            metrics: metrics.clone(),
            readiness: Health::new(),
        },
    )?;
    let prov_running = prov.start().await?;

    // Sensor aggregator.
    let mut afixed = fixed.clone();
    afixed["store"] = json!({"path": dir.join("stores").join("sensor-aggregator")});
    if !plan.sensor_aggregator.contains_key("domains") {
        afixed["domains"] = Value::Array(sensor_domains(plan, run.as_str())?);
    }
    let acfg: sensor_aggregator::AggregatorConfig =
        config_for(&plan.sensor_aggregator, afixed, "sensor_aggregator")?;
    let aggregator = sensor_aggregator::Aggregator::new(
        acfg,
        sensor_aggregator::AggregatorDeps {
            bus: Arc::new(bus.view(opts("sensor-aggregator"))),
            store: open_store(&dir, "sensor-aggregator")?,
            clock: clock.clone(),
            metrics: metrics.clone(),
            readiness: Health::new(),
        },
    )?;
    let agg_running = aggregator.start().await?;

    // Controller.
    let mut cfixed = fixed.clone();
    cfixed["policies"] = json!(plan.domains);
    let ccfg: ControllerConfig = config_for(&plan.controller, cfixed, "controller")?;
    let registry = Registry::with_builtins();
    let policies = load_policies(&ccfg.policies, &registry, run.as_str())?;
    let controller = Controller::new(
        ControllerSetup {
            run: run.clone(),
            policies,
            timing: ccfg.timing.clone(),
        },
        ControllerDeps {
            bus: Arc::new(bus.view(opts("epu-controller"))),
            store: open_store(&dir, "controller")?,
            clock: clock.clone(),
            metrics: metrics.clone(),
            readiness: Health::new(),
            registry,
        },
    )?;
    let ctl_running = controller.start().await?;
    ready.set_ready(true);

    let pid = std::process::id();
    rec.services = crate::plan::SERVICES
        .iter()
        .map(|s| ServiceRecord {
            name: s.to_string(),
            pid: Some(pid),
            http_addr: Some(http.to_string()),
            log_file: log_file.clone(),
            restarts: 0,
        })
        .collect();
    rec.state = RunState::Up;
    rec.save()?;
    tracing::info!(event = "run_up", run = %run, "standalone host is up");

    epu_core::service::shutdown_signal().await;
    tracing::info!(event = "run_stopping", run = %run, "stopping the standalone host");
    rec.state = RunState::Stopping;
    rec.save()?;
    ready.set_ready(false);
    ctl_running.stop().await;
    agg_running.stop().await;
    prov_running.stop().await;
    socket.stop().await;
    rec.state = RunState::Stopped;
    rec.save()?;
    Ok(())
}
