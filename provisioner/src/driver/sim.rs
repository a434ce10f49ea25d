//! The sim driver: virtual instances on the provisioner's clock.
//!
//! An instance is `Pending` from its launch until `boot_secs` of *clock* time have
//! passed (a [`ManualClock`](epu_core::clock::ManualClock) in tests and the simulator),
//! then `Running` — or, with probability `failure_rate`, `Terminated` with
//! `SIMULATED_FAILURE`. Failures are drawn from a seeded RNG in launch order, so a run is
//! deterministic for a seed. Tokens are remembered, so a repeated launch returns the same
//! instances. Terminated instances stay listed for an hour of clock time, as EC2 does.
//!
//! The state is a map in memory: 100,000 instances take a few tens of MB. Sharing one
//! `SimDriver` between two provisioners in a test is how a "cloud that outlives the
//! provisioner" is simulated.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use epu_core::clock::SharedClock;
use epu_core::wire::RunName;
use epu_model::messages::{Deployable, FailReason};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    IaasDriver, IaasError, InstanceFailure, InstanceRef, InstanceState, LaunchOutcome,
    LaunchRequest, LaunchedInstance, ListedInstance, TerminateOutcome,
};

/// How long terminated instances stay listed.
const KEEP_TERMINATED: TimeDelta = TimeDelta::hours(1);

/// Defaults of the sim driver (`[drivers.sim]`); a deployable may override
/// `boot_secs` and `failure_rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimSettings {
    pub boot_secs: f64,
    pub failure_rate: f64,
    pub seed: u64,
}

#[derive(Debug)]
struct SimInstance {
    run: String,
    node_id: String,
    launch_id: String,
    ready_at: DateTime<Utc>,
    fails: bool,
    terminated_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct SimState {
    instances: HashMap<String, SimInstance>,
    tokens: HashMap<String, Vec<(String, String)>>,
    next_id: u64,
    rng: StdRng,
}

/// The sim driver. See the module docs.
#[derive(Debug)]
pub struct SimDriver {
    clock: SharedClock,
    settings: SimSettings,
    state: Mutex<SimState>,
}

impl SimDriver {
    pub fn new(clock: SharedClock, settings: SimSettings) -> Self {
        SimDriver {
            clock,
            settings,
            state: Mutex::new(SimState {
                instances: HashMap::new(),
                tokens: HashMap::new(),
                next_id: 1,
                rng: StdRng::seed_from_u64(settings.seed),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves the maps consistent enough for a sim.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many instances exist (not terminated), for tests and the benchmark.
    pub fn alive(&self) -> usize {
        let now = self.clock.now();
        let st = self.lock();
        st.instances
            .values()
            .filter(|i| self.state_of(i, now).0 != InstanceState::Terminated)
            .count()
    }

    /// Makes the live instance of `node_id` crash now (the simulator's and tests' way
    /// to kill a worker): the next listing shows it gone with a failure. False if
    /// there is no such live instance.
    pub fn crash(&self, node_id: &str) -> bool {
        let now = self.clock.now();
        let mut st = self.lock();
        for inst in st.instances.values_mut() {
            if inst.node_id == node_id && inst.terminated_at.is_none() && !inst.fails {
                inst.fails = true;
                inst.ready_at = inst.ready_at.min(now);
                return true;
            }
        }
        false
    }

    fn state_of(&self, inst: &SimInstance, now: DateTime<Utc>) -> (InstanceState, bool) {
        if inst.terminated_at.is_some() {
            return (InstanceState::Terminated, false);
        }
        if now < inst.ready_at {
            return (InstanceState::Pending, false);
        }
        if inst.fails {
            (InstanceState::Terminated, true)
        } else {
            (InstanceState::Running, false)
        }
    }
}

fn secs(s: f64) -> TimeDelta {
    TimeDelta::from_std(std::time::Duration::from_secs_f64(s.max(0.0))).unwrap_or(TimeDelta::MAX)
}

#[async_trait]
impl IaasDriver for SimDriver {
    fn name(&self) -> &str {
        "sim"
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<LaunchOutcome, IaasError> {
        let Deployable::Sim(spec) = &req.deployable else {
            return Err(IaasError::bad_request(
                "the sim driver launches sim deployables only",
            ));
        };
        let boot = spec.boot_secs.unwrap_or(self.settings.boot_secs);
        let failure_rate = spec
            .failure_rate
            .unwrap_or(self.settings.failure_rate)
            .clamp(0.0, 1.0);
        let now = self.clock.now();
        let mut st = self.lock();
        let known: HashMap<String, String> = st
            .tokens
            .get(&req.token)
            .map(|pairs| pairs.iter().cloned().collect())
            .unwrap_or_default();
        let mut out = LaunchOutcome::default();
        let mut added = Vec::new();
        for node_id in &req.node_ids {
            let iaas_id = match known.get(node_id) {
                Some(id) => id.clone(),
                None => {
                    let id = format!("sim-{:08x}", st.next_id);
                    st.next_id += 1;
                    let fails = failure_rate > 0.0 && st.rng.random_bool(failure_rate);
                    st.instances.insert(
                        id.clone(),
                        SimInstance {
                            run: req.run.to_string(),
                            node_id: node_id.clone(),
                            launch_id: req.launch_id.clone(),
                            ready_at: now + secs(boot),
                            fails,
                            terminated_at: None,
                        },
                    );
                    added.push((node_id.clone(), id.clone()));
                    id
                }
            };
            let state = match st.instances.get(&iaas_id) {
                Some(inst) => self.state_of(inst, now).0,
                None => InstanceState::Terminated,
            };
            out.instances.push(LaunchedInstance {
                node_id: node_id.clone(),
                iaas_id,
                incarnation: None,
                state,
                addresses: Vec::new(),
            });
        }
        st.tokens
            .entry(req.token.clone())
            .or_default()
            .extend(added);
        Ok(out)
    }

    async fn terminate(
        &self,
        instances: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError> {
        let now = self.clock.now();
        let mut st = self.lock();
        let mut out = Vec::with_capacity(instances.len());
        for r in instances {
            if let Some(inst) = st.instances.get_mut(&r.iaas_id) {
                if inst.terminated_at.is_none() {
                    inst.terminated_at = Some(now);
                }
            }
            out.push(TerminateOutcome::Gone);
        }
        Ok(out)
    }

    async fn list(&self, run: &RunName) -> Result<Vec<ListedInstance>, IaasError> {
        let now = self.clock.now();
        let mut st = self.lock();
        st.instances
            .retain(|_, i| i.terminated_at.is_none_or(|t| now - t < KEEP_TERMINATED));
        let mut out = Vec::new();
        for (id, inst) in &st.instances {
            if inst.run != run.as_str() {
                continue;
            }
            let (state, failed) = self.state_of(inst, now);
            out.push(ListedInstance {
                iaas_id: id.clone(),
                incarnation: None,
                node_id: Some(inst.node_id.clone()),
                launch_id: Some(inst.launch_id.clone()),
                state,
                addresses: Vec::new(),
                failure: failed.then(|| InstanceFailure {
                    reason: FailReason::SimulatedFailure,
                    detail: "the sim driver failed this instance (failure_rate)".to_string(),
                }),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_core::clock::ManualClock;
    use epu_model::messages::SimDeployable;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn req(token: &str, nodes: &[&str], failure_rate: f64) -> LaunchRequest {
        LaunchRequest {
            run: RunName::new("r").expect("run"),
            launch_id: "l".into(),
            token: token.into(),
            domain: "d".into(),
            node_ids: nodes.iter().map(|s| s.to_string()).collect(),
            deployable: Deployable::Sim(SimDeployable {
                boot_secs: Some(10.0),
                failure_rate: Some(failure_rate),
            }),
            vars: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn boots_on_the_clock_and_honours_tokens() {
        let clock = ManualClock::default();
        let sim = SimDriver::new(
            clock.shared(),
            SimSettings {
                boot_secs: 1.0,
                failure_rate: 0.0,
                seed: 1,
            },
        );
        let a = sim
            .launch(&req("t1", &["n1", "n2"], 0.0))
            .await
            .expect("launch");
        assert_eq!(a.instances.len(), 2);
        assert!(a
            .instances
            .iter()
            .all(|i| i.state == InstanceState::Pending));
        let again = sim
            .launch(&req("t1", &["n1", "n2"], 0.0))
            .await
            .expect("again");
        assert_eq!(again.instances, a.instances, "same token, same instances");
        assert_eq!(sim.alive(), 2);
        clock.advance(Duration::from_secs(10));
        let run = RunName::new("r").expect("run");
        let listed = sim.list(&run).await.expect("list");
        assert!(listed.iter().all(|i| i.state == InstanceState::Running));
        let other = sim
            .list(&RunName::new("other").expect("run"))
            .await
            .expect("list");
        assert!(other.is_empty());
        let refs: Vec<InstanceRef> = a
            .instances
            .iter()
            .map(|i| InstanceRef {
                node_id: i.node_id.clone(),
                iaas_id: i.iaas_id.clone(),
                incarnation: None,
            })
            .collect();
        sim.terminate(&refs).await.expect("terminate");
        assert_eq!(sim.alive(), 0);
        clock.advance(Duration::from_secs(7200));
        assert!(sim.list(&run).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn failures_are_seeded() {
        let run = RunName::new("r").expect("run");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let clock = ManualClock::default();
            let sim = SimDriver::new(
                clock.shared(),
                SimSettings {
                    boot_secs: 0.0,
                    failure_rate: 0.0,
                    seed: 42,
                },
            );
            let nodes: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
            let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            sim.launch(&req("t", &refs, 0.3)).await.expect("launch");
            clock.advance(Duration::from_secs(11));
            let mut failed: Vec<String> = sim
                .list(&run)
                .await
                .expect("list")
                .into_iter()
                .filter(|i| i.failure.is_some())
                .filter_map(|i| i.node_id)
                .collect();
            failed.sort();
            seen.push(failed);
        }
        assert_eq!(seen[0], seen[1]);
        assert!(
            seen[0].len() > 30 && seen[0].len() < 90,
            "{}",
            seen[0].len()
        );
    }
}
