//! **queuelen** — grow and shrink the domain with the backlog on its work queue,
//! between watermarks, within `[min_instances, max_instances]`.
//!
//! # Configuration
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `queuelen_high_water` | integer ≥ 0 | required | grow when the backlog is **above** this |
//! | `queuelen_low_water` | integer, 0 ≤ low ≤ high | required | shrink when the backlog is **below** this (so `1` shrinks on an empty queue and `0` never shrinks on backlog) |
//! | `min_instances` | integer ≥ 0 | 0 | never fewer instances |
//! | `max_instances` | integer ≥ 1 and ≥ `min_instances` | required | never more instances |
//! | `cooldown_up` | integer ≥ 0 (seconds) | 10 | at least this long between two backlog-driven scale-ups |
//! | `cooldown_down` | integer ≥ 0 (seconds) | 60 | a scale-down needs the backlog below low water for this long *and* this long since the last scale change (up or down) |
//! | `scale_up_step` | integer ≥ 1 | 1 | instances added per scale-up |
//! | `scale_down_step` | integer ≥ 1 | 1 | instances removed per scale-down |
//! | `backlog_per_worker` | integer ≥ 1 | none | when set, a scale-up goes straight to `ceil(backlog / backlog_per_worker)` instances if that is more than one step (still capped at `max_instances`) |
//! | `sensor_stale_secs` | integer ≥ 1 (seconds) | 60 | a backlog reading older than this is stale: no scaling on it |
//! | `backoff_initial_secs` | integer ≥ 0 (seconds) | 10 | launch-failure backoff: first delay, doubled per consecutive failure; 0 turns backoff off |
//! | `backoff_max_secs` | integer ≥ `backoff_initial_secs` (seconds) | 300 | cap on the backoff delay |
//!
//! Integers may be given as JSON numbers or strings (`5`, `5.0`, `"5"`). Any other key is
//! refused, naming it.
//!
//! # Rules, in each decision
//!
//! The engine keeps a **target** size (like an autoscaling group's desired capacity),
//! and its own memory of when it last scaled up and down and since when the backlog
//! has been low. On its first decision it adopts the current size: the instances not
//! yet being terminated (REQUESTING ..= RUNNING_FAILED, unhealthy ones included, since
//! they are about to be replaced).
//!
//! 1. **Backlog** is the [`SensorReadings::backlog`](crate::SensorReadings::backlog)
//!    reading as is — the aggregator already counts the jobs held by busy workers, so
//!    the engine never adds `Instance::busy` to it. A reading that is not a finite
//!    number is ignored; a negative one counts as 0.
//! 2. **Growth**: fresh backlog > `queuelen_high_water` raises the target to
//!    `max(target + scale_up_step, ceil(backlog / backlog_per_worker))`, capped at
//!    `max_instances`, unless a scale-up happened less than `cooldown_up` ago or
//!    launches are held back by backoff.
//! 3. **Shrink**: fresh backlog < `queuelen_low_water` lowers the target by
//!    `scale_down_step` once the backlog has been below low water (in every decision)
//!    for `cooldown_down` and the last scale change is `cooldown_down` old.
//! 4. **No reading yet, or a stale one** (older than `sensor_stale_secs`): the target
//!    holds; only the bounds below apply.
//! 5. **Bounds**, applied at once, without cooldown: the target stays within
//!    `[min_instances, max_instances]`, and is at least 1 while the latest backlog
//!    reading (even a stale one) is above 0 — the domain never drops to zero while work
//!    is queued, and a domain at zero starts one worker as soon as work appears.
//! 6. **Capacity** is the healthy live instances (REQUESTING ..= RUNNING): booting ones
//!    count, so the engine does not launch again for workers still on their way. Below
//!    the target the difference is launched; above it the surplus is destroyed, victims
//!    by [`victim_order`]: idle (`busy == Some(0)`) first, then
//!    unknown busyness (booting, or no heartbeat yet), then busy (fewest jobs first);
//!    the newest first within each group; ties by id.
//! 7. **Unhealthy** instances (MISSING, ZOMBIE, PROCESS_ERROR, RUNNING_FAILED) are
//!    destroyed, and, since they no longer count as capacity, replaced in the same
//!    decision up to the target (never above `max_instances`).
//! 8. **Backoff** after launch failures as in [`crate::backoff`]: launches are held
//!    back (the report says `BACKING_OFF`), destroys still happen.
//!
//! Any change of the target (growth, shrink, or bounds) counts as a scale-up or a
//! scale-down for the cooldowns.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};

use crate::backoff::{Backoff, KEY_BACKOFF_INITIAL, KEY_BACKOFF_MAX};
use crate::config::{ConfigError, EngineConfig};
use crate::control::{Control, LaunchSpec};
use crate::engine::{check_state, DecisionEngine, EngineError, EngineReport, EngineState};
use crate::npreserving::describe_unhealthy;
use crate::state::{victim_order, Instance, State};

/// The registry name.
pub const NAME: &str = "queuelen";

/// Config key.
pub const KEY_HIGH_WATER: &str = "queuelen_high_water";
/// Config key.
pub const KEY_LOW_WATER: &str = "queuelen_low_water";
/// Config key.
pub const KEY_MIN_INSTANCES: &str = "min_instances";
/// Config key.
pub const KEY_MAX_INSTANCES: &str = "max_instances";
/// Config key.
pub const KEY_COOLDOWN_UP: &str = "cooldown_up";
/// Config key.
pub const KEY_COOLDOWN_DOWN: &str = "cooldown_down";
/// Config key.
pub const KEY_SCALE_UP_STEP: &str = "scale_up_step";
/// Config key.
pub const KEY_SCALE_DOWN_STEP: &str = "scale_down_step";
/// Config key.
pub const KEY_BACKLOG_PER_WORKER: &str = "backlog_per_worker";
/// Config key.
pub const KEY_SENSOR_STALE_SECS: &str = "sensor_stale_secs";

/// Every key this engine accepts.
pub const KEYS: &[&str] = &[
    KEY_HIGH_WATER,
    KEY_LOW_WATER,
    KEY_MIN_INSTANCES,
    KEY_MAX_INSTANCES,
    KEY_COOLDOWN_UP,
    KEY_COOLDOWN_DOWN,
    KEY_SCALE_UP_STEP,
    KEY_SCALE_DOWN_STEP,
    KEY_BACKLOG_PER_WORKER,
    KEY_SENSOR_STALE_SECS,
    KEY_BACKOFF_INITIAL,
    KEY_BACKOFF_MAX,
];

/// Default `cooldown_up`, seconds.
pub const DEFAULT_COOLDOWN_UP_SECS: u64 = 10;
/// Default `cooldown_down`, seconds.
pub const DEFAULT_COOLDOWN_DOWN_SECS: u64 = 60;
/// Default `sensor_stale_secs`.
pub const DEFAULT_SENSOR_STALE_SECS: u64 = 60;

/// Longest duration accepted for any `*_secs`/cooldown key (100 years).
const MAX_SECS: u64 = 100 * 365 * 24 * 3600;

/// The typed, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLenConfig {
    /// Grow above this backlog.
    pub high_water: u64,
    /// Shrink below this backlog.
    pub low_water: u64,
    /// Fewest instances.
    pub min_instances: u32,
    /// Most instances.
    pub max_instances: u32,
    /// Seconds between scale-ups.
    pub cooldown_up_secs: u64,
    /// Seconds of low backlog, and since the last change, before a scale-down.
    pub cooldown_down_secs: u64,
    /// Instances per scale-up.
    pub scale_up_step: u32,
    /// Instances per scale-down.
    pub scale_down_step: u32,
    /// Backlog one worker handles, for proportional scale-up.
    pub backlog_per_worker: Option<u64>,
    /// Readings older than this are stale.
    pub sensor_stale_secs: u64,
    /// Launch-failure backoff.
    pub backoff: Backoff,
}

fn secs_key(conf: &EngineConfig, key: &str, default: u64) -> Result<u64, ConfigError> {
    let v = conf.get_u64(key)?.unwrap_or(default);
    if v > MAX_SECS {
        return Err(ConfigError::invalid(
            key,
            format!("must be at most {MAX_SECS} seconds, got {v}"),
        ));
    }
    Ok(v)
}

fn at_least_one(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(
            key,
            "expected an integer of at least 1, got 0",
        ))
    } else {
        Ok(())
    }
}

impl QueueLenConfig {
    /// Parse and validate a full configuration.
    pub fn from_config(conf: &EngineConfig) -> Result<Self, ConfigError> {
        conf.ensure_known_keys(KEYS)?;
        let high_water = conf.require_u64(KEY_HIGH_WATER)?;
        let low_water = conf.require_u64(KEY_LOW_WATER)?;
        if low_water > high_water {
            return Err(ConfigError::invalid(
                KEY_LOW_WATER,
                format!("must not exceed {KEY_HIGH_WATER} ({high_water}), got {low_water}"),
            ));
        }
        let min_instances = conf.get_u32(KEY_MIN_INSTANCES)?.unwrap_or(0);
        let max_instances = conf.require_u32(KEY_MAX_INSTANCES)?;
        at_least_one(KEY_MAX_INSTANCES, u64::from(max_instances))?;
        if max_instances < min_instances {
            return Err(ConfigError::invalid(
                KEY_MAX_INSTANCES,
                format!(
                    "must be at least {KEY_MIN_INSTANCES} ({min_instances}), got {max_instances}"
                ),
            ));
        }
        let cooldown_up_secs = secs_key(conf, KEY_COOLDOWN_UP, DEFAULT_COOLDOWN_UP_SECS)?;
        let cooldown_down_secs = secs_key(conf, KEY_COOLDOWN_DOWN, DEFAULT_COOLDOWN_DOWN_SECS)?;
        let scale_up_step = conf.get_u32(KEY_SCALE_UP_STEP)?.unwrap_or(1);
        at_least_one(KEY_SCALE_UP_STEP, u64::from(scale_up_step))?;
        let scale_down_step = conf.get_u32(KEY_SCALE_DOWN_STEP)?.unwrap_or(1);
        at_least_one(KEY_SCALE_DOWN_STEP, u64::from(scale_down_step))?;
        let backlog_per_worker = conf.get_u64(KEY_BACKLOG_PER_WORKER)?;
        if let Some(b) = backlog_per_worker {
            at_least_one(KEY_BACKLOG_PER_WORKER, b)?;
        }
        let sensor_stale_secs = secs_key(conf, KEY_SENSOR_STALE_SECS, DEFAULT_SENSOR_STALE_SECS)?;
        at_least_one(KEY_SENSOR_STALE_SECS, sensor_stale_secs)?;
        let backoff = Backoff::from_config(conf)?;
        Ok(QueueLenConfig {
            high_water,
            low_water,
            min_instances,
            max_instances,
            cooldown_up_secs,
            cooldown_down_secs,
            scale_up_step,
            scale_down_step,
            backlog_per_worker,
            sensor_stale_secs,
            backoff,
        })
    }
}

/// The engine's memory between decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Memory {
    target: Option<u32>,
    last_scale_up: Option<DateTime<Utc>>,
    last_scale_down: Option<DateTime<Utc>>,
    low_since: Option<DateTime<Utc>>,
}

/// The queue-length watermark engine. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct QueueLenEngine {
    conf: Option<(EngineConfig, QueueLenConfig)>,
    memory: Memory,
    report: EngineReport,
}

impl Default for QueueLenEngine {
    fn default() -> Self {
        QueueLenEngine::new()
    }
}

fn secs(s: u64) -> TimeDelta {
    i64::try_from(s)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .unwrap_or(TimeDelta::MAX)
}

/// `t + d`, saturating.
fn plus(t: DateTime<Utc>, d: TimeDelta) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `ceil(backlog / per_worker)` as an instance count.
fn workers_for(backlog: f64, per_worker: u64) -> u32 {
    // u64 → f64 may round for huge values; the result is only a size estimate.
    #[allow(clippy::cast_precision_loss)]
    let w = (backlog / per_worker as f64).ceil();
    if w >= f64::from(u32::MAX) {
        u32::MAX
    } else if w > 0.0 {
        // In range and non-negative, checked above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = w as u32;
        n
    } else {
        0
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sensor {
    Missing,
    Stale(f64),
    Fresh(f64),
}

impl QueueLenEngine {
    /// An unconfigured engine.
    pub fn new() -> Self {
        QueueLenEngine {
            conf: None,
            memory: Memory::default(),
            report: EngineReport::pending(),
        }
    }

    /// The current typed configuration, if initialized.
    pub fn config(&self) -> Option<&QueueLenConfig> {
        self.conf.as_ref().map(|(_, c)| c)
    }

    /// The current full configuration (after merges), if initialized.
    pub fn raw_config(&self) -> Option<&EngineConfig> {
        self.conf.as_ref().map(|(r, _)| r)
    }

    /// The current target size, once the engine has decided.
    pub fn target(&self) -> Option<u32> {
        self.memory.target
    }
}

impl DecisionEngine for QueueLenEngine {
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        let typed = QueueLenConfig::from_config(conf)?;
        self.conf = Some((conf.clone(), typed));
        self.memory = Memory::default();
        self.report = EngineReport::pending();
        Ok(())
    }

    fn reconfigure(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        let merged = match &self.conf {
            Some((raw, _)) => raw.merged(conf),
            None => EngineConfig::new().merged(conf),
        };
        let typed = QueueLenConfig::from_config(&merged)?;
        // Memory (target, cooldown times) is kept; the new bounds apply next decision.
        self.conf = Some((merged, typed));
        Ok(())
    }

    fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError> {
        let Some((raw, c)) = &self.conf else {
            return Err(EngineError::NotInitialized);
        };
        if let Err(e) = check_state(state) {
            self.report = EngineReport::new(
                EngineState::Error,
                json!({ "error": e.to_string(), "config": raw }),
            );
            return Err(e);
        }
        let now = state.now;
        let mut mem = self.memory.clone();
        let mut reasons: Vec<String> = Vec::new();

        // --- What is there.
        let mut unhealthy: Vec<&Instance> = state
            .instances
            .iter()
            .filter(|i| i.needs_termination())
            .collect();
        unhealthy.sort_by(|a, b| a.id.cmp(&b.id));
        let healthy: Vec<&Instance> = state.capacity().collect();
        let have = count(healthy.len());
        let booting = healthy.iter().filter(|i| i.state.is_booting()).count();
        let pool = count(
            state
                .instances
                .iter()
                .filter(|i| i.state.is_terminable())
                .count(),
        );

        // --- The sensor.
        let sensor = match state.sensors.backlog {
            Some(r) if r.value.is_finite() => {
                let v = r.value.max(0.0);
                if r.age(now) > secs(c.sensor_stale_secs) {
                    Sensor::Stale(v)
                } else {
                    Sensor::Fresh(v)
                }
            }
            _ => Sensor::Missing,
        };
        let work_queued = matches!(sensor, Sensor::Fresh(v) | Sensor::Stale(v) if v > 0.0);
        let floor = c.min_instances.max(u32::from(work_queued));
        let blocked = c.backoff.blocked_until(&state.launch_failures, now);

        // --- The target.
        let before = mem.target.unwrap_or(pool);
        let mut target = before;
        let mut cooldown_up_until = None;
        let mut cooldown_down_until = None;
        #[allow(clippy::cast_precision_loss)]
        let (high, low) = (c.high_water as f64, c.low_water as f64);
        match sensor {
            Sensor::Fresh(v) if v > high => {
                mem.low_since = None;
                let mut want = target.saturating_add(c.scale_up_step);
                if let Some(per) = c.backlog_per_worker {
                    want = want.max(workers_for(v, per));
                }
                let want = want.min(c.max_instances);
                let ready_at = mem
                    .last_scale_up
                    .map(|t| plus(t, secs(c.cooldown_up_secs)))
                    .filter(|t| *t > now);
                if want <= target {
                    reasons.push(format!(
                        "backlog {v} > high water {}, but already at max_instances {}",
                        c.high_water, c.max_instances
                    ));
                } else if let Some(until) = blocked {
                    reasons.push(format!(
                        "backlog {v} > high water {}, but not growing while launches back off (until {})",
                        c.high_water,
                        until.to_rfc3339()
                    ));
                } else if let Some(until) = ready_at {
                    cooldown_up_until = Some(until);
                    reasons.push(format!(
                        "backlog {v} > high water {}, but scale-up cooldown until {}",
                        c.high_water,
                        until.to_rfc3339()
                    ));
                } else {
                    reasons.push(format!(
                        "backlog {v} > high water {}: target {target} -> {want}",
                        c.high_water
                    ));
                    target = want;
                }
            }
            Sensor::Fresh(v) if v < low => {
                let since = *mem.low_since.get_or_insert(now);
                let want = target.saturating_sub(c.scale_down_step).max(floor);
                if want < target {
                    let cd = secs(c.cooldown_down_secs);
                    let last_change = mem.last_scale_up.max(mem.last_scale_down);
                    let ready_at = plus(since, cd).max(last_change.map_or(now, |t| plus(t, cd)));
                    if ready_at <= now {
                        reasons.push(format!(
                            "backlog {v} < low water {} since {}: target {target} -> {want}",
                            c.low_water,
                            since.to_rfc3339()
                        ));
                        target = want;
                    } else {
                        cooldown_down_until = Some(ready_at);
                        reasons.push(format!(
                            "backlog {v} < low water {}, but scale-down cooldown until {}",
                            c.low_water,
                            ready_at.to_rfc3339()
                        ));
                    }
                }
            }
            Sensor::Fresh(_) => mem.low_since = None,
            Sensor::Stale(v) => {
                mem.low_since = None;
                reasons.push(format!(
                    "backlog reading {v} is stale (older than {}s): holding",
                    c.sensor_stale_secs
                ));
            }
            Sensor::Missing => mem.low_since = None,
        }
        let bounded = target.clamp(floor, c.max_instances);
        if bounded != target {
            let why = if bounded > target && bounded > c.min_instances {
                "to keep a worker while work is queued".to_owned()
            } else {
                format!("to stay within [{}, {}]", c.min_instances, c.max_instances)
            };
            reasons.push(format!("target {target} -> {bounded} {why}"));
            target = bounded;
        }
        if target > before {
            mem.last_scale_up = Some(now);
        } else if target < before {
            mem.last_scale_down = Some(now);
        }
        mem.target = Some(target);

        // --- Intents.
        for r in reasons {
            control.reason(r);
        }
        if !unhealthy.is_empty() {
            control.reason(format!(
                "destroying {} unhealthy instance(s): {}",
                unhealthy.len(),
                describe_unhealthy(&unhealthy)
            ));
            control.destroy(unhealthy.iter().map(|i| i.id.clone()).collect());
        }
        let mut surplus: Vec<&Instance> = Vec::new();
        if have > target {
            let mut v = healthy.clone();
            v.sort_by(|a, b| victim_order(a, b));
            surplus.extend(v.into_iter().take((have - target) as usize));
            control.reason(format!(
                "destroying {} surplus instance(s) ({have} healthy, target {target}): {}",
                surplus.len(),
                surplus
                    .iter()
                    .map(|i| i.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            control.destroy(surplus.iter().map(|i| i.id.clone()).collect());
        }
        let wanted = target.saturating_sub(have);
        let mut launched = 0;
        if wanted > 0 {
            match blocked {
                Some(until) => control.reason(format!(
                    "holding back {wanted} launch(es): {} consecutive launch failure(s), backing off until {}",
                    state.launch_failures.consecutive,
                    until.to_rfc3339()
                )),
                None => {
                    control.reason(format!(
                        "launching {wanted} instance(s) ({have} healthy, target {target})"
                    ));
                    control.launch(wanted, LaunchSpec::default());
                    launched = wanted;
                }
            }
        }

        let engine_state = if wanted > 0 && blocked.is_some() {
            EngineState::BackingOff
        } else if !surplus.is_empty() {
            EngineState::Shrinking
        } else if launched > 0 || booting > 0 {
            EngineState::Growing
        } else {
            EngineState::Stable
        };
        let backlog = match sensor {
            Sensor::Missing => Value::Null,
            Sensor::Fresh(v) | Sensor::Stale(v) => json!({
                "value": v,
                "status": if matches!(sensor, Sensor::Fresh(_)) { "fresh" } else { "stale" },
                "age_secs": state.sensors.backlog.map(|r| r.age(now).num_seconds()),
            }),
        };
        self.report = EngineReport::new(
            engine_state,
            json!({
                "engine": NAME,
                "at": now,
                "target": target,
                "healthy": have,
                "booting": booting,
                "backlog": backlog,
                "floor": floor,
                "min_instances": c.min_instances,
                "max_instances": c.max_instances,
                "last_scale_up": mem.last_scale_up,
                "last_scale_down": mem.last_scale_down,
                "low_since": mem.low_since,
                "cooldown_up_until": cooldown_up_until,
                "cooldown_down_until": cooldown_down_until,
                "destroyed_unhealthy": unhealthy.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
                "destroyed_surplus": surplus.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
                "launched": launched,
                "backoff": c.backoff.report(&state.launch_failures, now),
                "config": raw,
            }),
        );
        self.memory = mem;
        Ok(())
    }

    fn report(&self) -> EngineReport {
        self.report.clone()
    }
}
