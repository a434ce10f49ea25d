//! Teardown from the run directory alone: terminate, at the IaaS itself, every
//! instance that carries the run's tag — with no service of the run alive.
//!
//! The run directory holds what this needs: the provisioner's config
//! (`config/provisioner.yaml`: which drivers, the EC2 region, endpoint and
//! credentials settings) and the run's name and directory, which are the run tag.
//! Local workers are found by their environment (`EPU_RUN`, `EPU_RUN_DIR`), one
//! process group per worker; EC2 instances by their `epu:run` tag. The sim
//! driver's instances are virtual and die with the provisioner.
//!
//! Nothing is trusted that a dead service wrote: the IaaS is asked, the
//! instances are terminated, and the IaaS is asked again until it lists none
//! alive or the deadline passes. Whatever is still listed is returned.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use epu_core::wire::RunName;
use provisioner::driver::local::{kill_run_groups, scan_groups, WorkerGroup};
use provisioner::driver::{IaasDriver, InstanceRef, ListedInstance};
use provisioner::ProvisionerConfig;
use serde_json::{json, Value};

use crate::deadline::waiting_for;
use crate::rundir::RunRecord;

/// Where the provisioner's config of a run is kept (both transports).
pub fn provisioner_config_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("config").join("provisioner.yaml")
}

/// The provisioner's config of a run, as its supervisor wrote it.
pub fn provisioner_config(rec: &RunRecord) -> anyhow::Result<ProvisionerConfig> {
    let p = provisioner_config_path(&rec.run_dir);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("cannot read the run's provisioner config {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a provisioner config", p.display()))
}

/// What the IaaS still lists of the run, and what was done about it.
#[derive(Debug, Default)]
pub struct TagTeardown {
    /// Local worker groups signalled.
    pub local_groups: usize,
    /// EC2 instances asked to terminate.
    pub ec2_terminated: usize,
    /// What is still there (or could not be checked), one JSON object each.
    pub left: Vec<Value>,
}

fn group_json(g: &WorkerGroup) -> Value {
    json!({
        "iaas": "local",
        "pgid": g.pgid,
        "node_id": g.node_id,
        "leader_alive": g.leader_alive,
        "pids": g.pids,
    })
}

/// The run's instances at each IaaS, without terminating anything (what `launch`
/// checks before it reuses a run name). An IaaS that cannot be asked is listed as
/// an error: unknown is not empty.
pub async fn live_instances(rec: &RunRecord, limit: Duration) -> Vec<Value> {
    let mut out: Vec<Value> = scan_groups(&rec.run, Some(&rec.run_dir))
        .iter()
        .map(group_json)
        .collect();
    let Ok(cfg) = provisioner_config(rec) else {
        return out;
    };
    if cfg.drivers.ec2.is_none() {
        return out;
    }
    match ec2_list(rec, &cfg, limit).await {
        Ok(listed) => out.extend(listed.iter().filter(|i| i.is_alive()).map(ec2_json)),
        Err(e) => out.push(ec2_error(&e)),
    }
    out
}

/// EC2 could not be asked: unknown, which is not empty.
fn ec2_error(e: &str) -> Value {
    json!({
        "iaas": "ec2",
        "error": format!(
            "{e}; epumgmt needs the AWS environment (region, endpoint, credentials) the run was launched with"
        ),
    })
}

fn ec2_json(i: &ListedInstance) -> Value {
    json!({
        "iaas": "ec2",
        "instance_id": i.iaas_id,
        "node_id": i.node_id,
        "state": i.state.as_str(),
    })
}

async fn ec2_driver(
    cfg: &ProvisionerConfig,
    limit: Duration,
) -> Result<provisioner::driver::ec2::Ec2Driver, String> {
    let Some(ec2) = &cfg.drivers.ec2 else {
        return Err("the run has no EC2 driver".into());
    };
    waiting_for("the EC2 client to load its configuration");
    match tokio::time::timeout(
        limit,
        provisioner::driver::ec2::Ec2Driver::from_config(ec2, &cfg.bus),
    )
    .await
    {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(format!("cannot set up the EC2 client: {e}")),
        Err(_) => Err(format!(
            "the EC2 client's configuration did not load within {limit:?}"
        )),
    }
}

async fn ec2_list(
    rec: &RunRecord,
    cfg: &ProvisionerConfig,
    limit: Duration,
) -> Result<Vec<ListedInstance>, String> {
    let driver = ec2_driver(cfg, limit).await?;
    let run = RunName::new(&rec.run).map_err(|e| e.to_string())?;
    list_once(&driver, &run, limit).await
}

async fn list_once(
    driver: &provisioner::driver::ec2::Ec2Driver,
    run: &RunName,
    limit: Duration,
) -> Result<Vec<ListedInstance>, String> {
    waiting_for(format!("EC2 to list the instances tagged epu:run={run}"));
    match tokio::time::timeout(limit, driver.list(run)).await {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(e)) => Err(format!("cannot list the run's EC2 instances: {e}")),
        Err(_) => Err(format!(
            "EC2 did not list the run's instances within {limit:?}"
        )),
    }
}

/// Terminates everything of the run at each IaaS by its tag, waits until the IaaS
/// lists nothing alive (or `deadline`), and returns what is left.
pub async fn terminate_by_tag(rec: &RunRecord, deadline: Instant, grace: Duration) -> TagTeardown {
    let mut out = TagTeardown::default();
    let remaining = || deadline.saturating_duration_since(Instant::now());

    // Local workers: every process group whose members carry the run.
    let groups = scan_groups(&rec.run, Some(&rec.run_dir));
    out.local_groups = groups.len();
    if !groups.is_empty() {
        waiting_for(format!(
            "{} local worker process group(s) of run {} to exit",
            groups.len(),
            rec.run
        ));
        let left = kill_run_groups(&rec.run, Some(&rec.run_dir), grace, remaining()).await;
        out.left.extend(left.iter().map(group_json));
    }

    // EC2: every instance tagged with the run.
    let cfg = match provisioner_config(rec) {
        Ok(c) => Some(c),
        Err(e) => {
            // Without the config there is no way to know whether an EC2 driver was on;
            // a run that never wrote it never started its provisioner.
            tracing::debug!(error = %e, "no provisioner config; only local workers checked");
            None
        }
    };
    if let Some(cfg) = cfg.filter(|c| c.drivers.ec2.is_some()) {
        match ec2_terminate_all(rec, &cfg, deadline).await {
            Ok((asked, left)) => {
                out.ec2_terminated = asked;
                out.left.extend(left.iter().map(ec2_json));
            }
            Err(e) => out.left.push(ec2_error(&e)),
        }
    }
    out
}

/// One EC2 call's limit within the teardown.
const EC2_CALL: Duration = Duration::from_secs(30);

async fn ec2_terminate_all(
    rec: &RunRecord,
    cfg: &ProvisionerConfig,
    deadline: Instant,
) -> Result<(usize, Vec<ListedInstance>), String> {
    let call = || EC2_CALL.min(deadline.saturating_duration_since(Instant::now()));
    let driver = ec2_driver(cfg, call()).await?;
    let run = RunName::new(&rec.run).map_err(|e| e.to_string())?;
    let mut asked: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        let alive: Vec<ListedInstance> = match list_once(&driver, &run, call()).await {
            Ok(l) => l.into_iter().filter(|i| i.is_alive()).collect(),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                eprintln!("killrun {}: {e}; retrying", rec.run);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if alive.is_empty() {
            return Ok((asked.len(), alive));
        }
        if Instant::now() >= deadline {
            return Ok((asked.len(), alive));
        }
        // Ask again every 10 s for the ones that are still there.
        let due: Vec<InstanceRef> = alive
            .iter()
            .filter(|i| {
                asked
                    .get(&i.iaas_id)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            })
            .map(|i| InstanceRef {
                node_id: i.node_id.clone().unwrap_or_default(),
                iaas_id: i.iaas_id.clone(),
                incarnation: i.incarnation.clone(),
            })
            .collect();
        if !due.is_empty() {
            waiting_for(format!("EC2 to terminate {} instance(s)", due.len()));
            match tokio::time::timeout(call(), driver.terminate(&due)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    eprintln!("killrun {}: EC2 terminate failed ({e}); retrying", rec.run)
                }
                Err(_) => eprintln!(
                    "killrun {}: EC2 terminate did not answer; retrying",
                    rec.run
                ),
            }
            for r in &due {
                asked.insert(r.iaas_id.clone(), Instant::now());
            }
        }
        waiting_for(format!(
            "{} EC2 instance(s) of run {} to reach terminated",
            alive.len(),
            rec.run
        ));
        tokio::time::sleep(
            Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}
