//! **npreserving** — keep exactly `preserve_n` healthy instances.
//!
//! # Configuration
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `preserve_n` | integer ≥ 0 | required, unless `unique_instances` is given | how many healthy instances to keep |
//! | `unique_instances` | map or list (see below) | none | named instances, exactly one each, each launched with its own variables; when given, `preserve_n` may be omitted and, if given, must equal the number of keys |
//! | `backoff_initial_secs` | integer ≥ 0 (seconds) | 10 | after launch failures, wait this long after the first; doubles with each consecutive failure; 0 turns backoff off |
//! | `backoff_max_secs` | integer ≥ `backoff_initial_secs` (seconds) | 300 | cap on the backoff delay |
//!
//! Integers may be given as JSON numbers or strings (`5`, `5.0`, `"5"`). Any other key is
//! refused, naming it.
//!
//! `unique_instances` may be written as
//! - a map of key → launch variables: `{"db": {"role": "primary"}, "cache": {}}` (a key
//!   may map to `null` for no variables; variable values may be strings, numbers or
//!   booleans);
//! - a list of keys, or of `{"key": …, "vars": {…}}` objects: `["a", "b"]`;
//! - a string holding either of the above in JSON, or a comma-separated list of keys
//!   (`"a,b,c"`) as typed on a command line.
//!
//! Keys must be non-empty and distinct. To leave unique mode, reconfigure with
//! `unique_instances: null` and a `preserve_n`.
//!
//! # Rules, in each decision
//!
//! 1. Every unhealthy instance is destroyed: health MISSING, ZOMBIE or PROCESS_ERROR, or
//!    state RUNNING_FAILED, among instances not yet being terminated (a ZOMBIE in a
//!    terminal state is destroyed again; see [`Instance::needs_termination`]).
//! 2. Healthy live instances (REQUESTING ..= RUNNING, so booting ones count) are
//!    counted. Below `preserve_n`, the shortfall is launched in the same decision —
//!    so an unhealthy instance is destroyed and replaced at once. Above it, the surplus
//!    is destroyed, choosing victims by [`victim_order`]: idle first, then unknown
//!    busyness (booting), then busy; newest first within each group.
//! 3. With `unique_instances`, each key must have exactly one healthy live instance
//!    (matched by [`Instance::unique_key`]). A missing key is launched with
//!    [`LaunchSpec::unique`] carrying its variables; extra instances of a key (the worse
//!    ones by [`victim_order`] go first), and instances with no key or an unknown key, are
//!    surplus and destroyed.
//! 4. Launch-failure backoff (see [`crate::backoff`]): after `k` consecutive launch
//!    failures, no launch until `backoff_initial_secs × 2^(k−1)` (capped at
//!    `backoff_max_secs`) after the last one. Destroys still happen. The report says
//!    `BACKING_OFF`.
//!
//! The engine keeps no memory besides its configuration.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::backoff::{Backoff, KEY_BACKOFF_INITIAL, KEY_BACKOFF_MAX};
use crate::config::{show_value, ConfigError, EngineConfig};
use crate::control::{Control, LaunchSpec};
use crate::engine::{check_state, DecisionEngine, EngineError, EngineReport, EngineState};
use crate::state::{victim_order, Instance, State};

/// The registry name.
pub const NAME: &str = "npreserving";

/// Config key `preserve_n`.
pub const KEY_PRESERVE_N: &str = "preserve_n";
/// Config key `unique_instances`.
pub const KEY_UNIQUE_INSTANCES: &str = "unique_instances";

/// Every key this engine accepts.
pub const KEYS: &[&str] = &[
    KEY_PRESERVE_N,
    KEY_UNIQUE_INSTANCES,
    KEY_BACKOFF_INITIAL,
    KEY_BACKOFF_MAX,
];

/// The typed, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NPreservingConfig {
    /// How many healthy instances to keep.
    pub preserve_n: u32,
    /// Unique instance keys → their launch variables.
    pub unique_instances: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// Launch-failure backoff.
    pub backoff: Backoff,
}

impl NPreservingConfig {
    /// Parse and validate a full configuration.
    pub fn from_config(conf: &EngineConfig) -> Result<Self, ConfigError> {
        conf.ensure_known_keys(KEYS)?;
        let preserve_n = conf.get_u32(KEY_PRESERVE_N)?;
        let unique_instances = conf
            .get(KEY_UNIQUE_INSTANCES)
            .map(parse_unique_instances)
            .transpose()?;
        let preserve_n = match (&unique_instances, preserve_n) {
            (None, Some(n)) => n,
            (None, None) => {
                return Err(ConfigError::missing(
                    KEY_PRESERVE_N,
                    "expected a non-negative integer (or give unique_instances)",
                ))
            }
            (Some(u), n) => {
                let len = u32::try_from(u.len()).map_err(|_| {
                    ConfigError::invalid(KEY_UNIQUE_INSTANCES, "too many unique instances")
                })?;
                match n {
                    Some(n) if n != len => {
                        return Err(ConfigError::invalid(
                            KEY_PRESERVE_N,
                            format!(
                                "must equal the number of unique_instances ({len}) or be omitted, got {n}"
                            ),
                        ))
                    }
                    _ => len,
                }
            }
        };
        let backoff = Backoff::from_config(conf)?;
        Ok(NPreservingConfig {
            preserve_n,
            unique_instances,
            backoff,
        })
    }
}

fn parse_unique_instances(
    value: &Value,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, ConfigError> {
    let key = KEY_UNIQUE_INSTANCES;
    let bad = |msg: String| ConfigError::invalid(key, msg);
    let expected = "expected a map of key to launch variables, a list of keys, or a comma-separated string of keys";
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut add = |name: &str, vars: Option<&Value>| -> Result<(), ConfigError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("unique instance keys must not be empty".to_owned()));
        }
        let vars = match vars {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    other => Err(bad(format!(
                        "variable {k:?} of unique instance {name:?} must be a string, number or boolean, got {}",
                        show_value(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "the launch variables of unique instance {name:?} must be a map, got {}",
                    show_value(other)
                )))
            }
        };
        if out.insert(name.to_owned(), vars).is_some() {
            return Err(bad(format!("unique instance key {name:?} is given twice")));
        }
        Ok(())
    };
    match value {
        Value::Object(map) => {
            for (name, vars) in map {
                add(name, Some(vars))?;
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(name) => add(name, None)?,
                    Value::Object(obj) => match obj.get("key") {
                        Some(Value::String(name))
                            if obj.keys().all(|k| k == "key" || k == "vars") =>
                        {
                            add(name, obj.get("vars"))?
                        }
                        _ => {
                            return Err(bad(format!(
                                "list items must be keys or {{\"key\": …, \"vars\": {{…}}}} objects, got {}",
                                show_value(item)
                            )))
                        }
                    },
                    other => {
                        return Err(bad(format!(
                            "list items must be keys or {{\"key\": …, \"vars\": {{…}}}} objects, got {}",
                            show_value(other)
                        )))
                    }
                }
            }
        }
        Value::String(s) => {
            let t = s.trim();
            if t.starts_with('{') || t.starts_with('[') {
                let parsed: Value = serde_json::from_str(t)
                    .map_err(|e| bad(format!("{expected}; the JSON given does not parse: {e}")))?;
                return parse_unique_instances(&parsed);
            }
            for name in t.split(',').filter(|n| !n.trim().is_empty()) {
                add(name, None)?;
            }
        }
        other => return Err(bad(format!("{expected}, got {}", show_value(other)))),
    }
    Ok(out)
}

/// The n-preserving engine. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct NPreservingEngine {
    conf: Option<(EngineConfig, NPreservingConfig)>,
    report: EngineReport,
}

impl Default for NPreservingEngine {
    fn default() -> Self {
        NPreservingEngine::new()
    }
}

impl NPreservingEngine {
    /// An unconfigured engine.
    pub fn new() -> Self {
        NPreservingEngine {
            conf: None,
            report: EngineReport::pending(),
        }
    }

    /// The current typed configuration, if initialized.
    pub fn config(&self) -> Option<&NPreservingConfig> {
        self.conf.as_ref().map(|(_, c)| c)
    }

    /// The current full configuration (after merges), if initialized.
    pub fn raw_config(&self) -> Option<&EngineConfig> {
        self.conf.as_ref().map(|(r, _)| r)
    }
}

fn ids(list: &[&Instance]) -> Vec<String> {
    list.iter().map(|i| i.id.clone()).collect()
}

/// `"i-1 (MISSING), i-2 (RUNNING_FAILED)"`.
pub(crate) fn describe_unhealthy(list: &[&Instance]) -> String {
    list.iter()
        .map(|i| {
            if i.health.is_unhealthy() {
                format!("{} ({} {})", i.id, i.state, i.health)
            } else {
                format!("{} ({})", i.id, i.state)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl DecisionEngine for NPreservingEngine {
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        let typed = NPreservingConfig::from_config(conf)?;
        self.conf = Some((conf.clone(), typed));
        self.report = EngineReport::pending();
        Ok(())
    }

    fn reconfigure(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
        let merged = match &self.conf {
            Some((raw, _)) => raw.merged(conf),
            None => EngineConfig::new().merged(conf),
        };
        let typed = NPreservingConfig::from_config(&merged)?;
        self.conf = Some((merged, typed));
        Ok(())
    }

    fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError> {
        let Some((raw, conf)) = &self.conf else {
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

        let mut unhealthy: Vec<&Instance> = state
            .instances
            .iter()
            .filter(|i| i.needs_termination())
            .collect();
        unhealthy.sort_by(|a, b| a.id.cmp(&b.id));
        let healthy: Vec<&Instance> = state.capacity().collect();
        let booting = healthy.iter().filter(|i| i.state.is_booting()).count();

        let mut surplus: Vec<&Instance> = Vec::new();
        let mut launches: Vec<(u32, LaunchSpec)> = Vec::new();
        let mut missing_keys: Vec<&str> = Vec::new();
        let n = conf.preserve_n as usize;
        match &conf.unique_instances {
            None => {
                if healthy.len() > n {
                    let mut v = healthy.clone();
                    v.sort_by(|a, b| victim_order(a, b));
                    surplus.extend(v.into_iter().take(healthy.len() - n));
                } else if healthy.len() < n {
                    let short = u32::try_from(n - healthy.len()).unwrap_or(u32::MAX);
                    launches.push((short, LaunchSpec::default()));
                }
            }
            Some(unique) => {
                let mut by_key: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
                for i in &healthy {
                    match i.unique_key.as_deref() {
                        Some(k) if unique.contains_key(k) => by_key.entry(k).or_default().push(i),
                        _ => surplus.push(i),
                    }
                }
                for (key, vars) in unique {
                    match by_key.get_mut(key.as_str()) {
                        Some(list) if !list.is_empty() => {
                            list.sort_by(|a, b| victim_order(a, b));
                            let extra = list.len() - 1;
                            surplus.extend(list.iter().take(extra));
                        }
                        _ => {
                            missing_keys.push(key);
                            launches.push((1, LaunchSpec::unique(key.clone(), vars.clone())));
                        }
                    }
                }
                surplus.sort_by(|a, b| victim_order(a, b));
            }
        }

        if !unhealthy.is_empty() {
            control.reason(format!(
                "destroying {} unhealthy instance(s): {}",
                unhealthy.len(),
                describe_unhealthy(&unhealthy)
            ));
            control.destroy(ids(&unhealthy));
        }
        if !surplus.is_empty() {
            control.reason(format!(
                "destroying {} surplus instance(s) ({} healthy, preserve_n {}): {}",
                surplus.len(),
                healthy.len(),
                conf.preserve_n,
                ids(&surplus).join(", ")
            ));
            control.destroy(ids(&surplus));
        }
        let wanted: u32 = launches.iter().map(|(c, _)| *c).sum();
        let blocked = conf.backoff.blocked_until(&state.launch_failures, now);
        let mut launched = 0u32;
        if wanted > 0 {
            match blocked {
                Some(until) => control.reason(format!(
                    "holding back {wanted} launch(es): {} consecutive launch failure(s), backing off until {}",
                    state.launch_failures.consecutive,
                    until.to_rfc3339()
                )),
                None => {
                    if missing_keys.is_empty() {
                        control.reason(format!(
                            "launching {wanted} instance(s) to preserve {} ({} healthy)",
                            conf.preserve_n,
                            healthy.len()
                        ));
                    } else {
                        control.reason(format!(
                            "launching unique instance(s) {}",
                            missing_keys.join(", ")
                        ));
                    }
                    for (count, spec) in launches {
                        control.launch(count, spec);
                    }
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
        self.report = EngineReport::new(
            engine_state,
            json!({
                "engine": NAME,
                "at": now,
                "preserve_n": conf.preserve_n,
                "healthy": healthy.len(),
                "booting": booting,
                "destroyed_unhealthy": ids(&unhealthy),
                "destroyed_surplus": ids(&surplus),
                "launched": launched,
                "missing_unique_keys": missing_keys,
                "backoff": conf.backoff.report(&state.launch_failures, now),
                "config": raw,
            }),
        );
        Ok(())
    }

    fn report(&self) -> EngineReport {
        self.report.clone()
    }
}
