//! Engine configuration: an untyped key → value map, and the helpers engines use to
//! parse it into typed, validated settings.
//!
//! Parsing is lenient about form and strict about meaning: `5`, `5.0` and `"5"` are all
//! the integer 5 (operators type `preserve_n=5` on a command line, which arrives as a
//! string), `true`, `"yes"`, `"1"` are all true; but `-1`, `2.5` or `"five"` where a
//! count is expected are refused with an error that names the key.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An engine's configuration: keys → JSON values.
///
/// A `null` value means "not set" (the engine's default applies); in a partial
/// configuration given to [`reconfigure`](crate::DecisionEngine::reconfigure) it removes
/// the key, resetting it to its default (see [`EngineConfig::merged`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EngineConfig(Map<String, Value>);

impl EngineConfig {
    /// An empty configuration.
    pub fn new() -> Self {
        EngineConfig(Map::new())
    }

    /// From a JSON object; anything else is refused.
    pub fn from_json(value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::Object(map) => Ok(EngineConfig(map)),
            other => Err(ConfigError::invalid(
                "",
                format!(
                    "expected an object of keys to values, got {}",
                    show_value(&other)
                ),
            )),
        }
    }

    /// From `key=value` assignments as typed on a command line (values stay strings;
    /// engines parse them leniently).
    pub fn from_assignments<I, S>(items: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut conf = EngineConfig::new();
        for item in items {
            let item = item.as_ref();
            match item.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    conf.set(k.trim(), Value::String(v.trim().to_owned()));
                }
                _ => {
                    return Err(ConfigError::invalid(
                        item.trim(),
                        format!("expected key=value, got {item:?}"),
                    ))
                }
            }
        }
        Ok(conf)
    }

    /// Set `key` to `value` (replacing any previous value).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// Builder form of [`set`](Self::set).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    /// The value of `key`; `None` if absent or `null`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` has a non-null value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The keys present (including those set to `null`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The underlying map.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The underlying map, owned.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }

    /// As a JSON object.
    pub fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// `self` with `partial` laid over it: keys in `partial` replace those in `self`, and
    /// a key set to `null` in `partial` is removed (back to its default). This is how
    /// every built-in engine merges a reconfiguration; a controller that persists the
    /// domain's configuration merges the same way after a reconfigure is accepted.
    pub fn merged(&self, partial: &EngineConfig) -> EngineConfig {
        let mut out = self.0.clone();
        for (k, v) in &partial.0 {
            if v.is_null() {
                out.remove(k);
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
        EngineConfig(out)
    }

    /// Refuse the first key (in map order) that is not in `known`.
    pub fn ensure_known_keys(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(ConfigError::unknown(k, known)),
            None => Ok(()),
        }
    }

    /// A non-negative integer, if set.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key).map(|v| parse_u64(key, v)).transpose()
    }

    /// A non-negative integer that fits in 32 bits, if set.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        self.get(key)
            .map(|v| {
                let n = parse_u64(key, v)?;
                u32::try_from(n).map_err(|_| {
                    ConfigError::invalid(
                        key,
                        format!(
                            "expected a non-negative integer no greater than {}, got {}",
                            u32::MAX,
                            show_value(v)
                        ),
                    )
                })
            })
            .transpose()
    }

    /// A required non-negative integer that fits in 32 bits.
    pub fn require_u32(&self, key: &str) -> Result<u32, ConfigError> {
        self.get_u32(key)?
            .ok_or_else(|| ConfigError::missing(key, "expected a non-negative integer"))
    }

    /// A required non-negative integer.
    pub fn require_u64(&self, key: &str) -> Result<u64, ConfigError> {
        self.get_u64(key)?
            .ok_or_else(|| ConfigError::missing(key, "expected a non-negative integer"))
    }

    /// A boolean (`true`/`false`, `"yes"`/`"no"`, `"on"`/`"off"`, `1`/`0`), if set.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| {
                let b = match v {
                    Value::Bool(b) => Some(*b),
                    Value::Number(n) => match n.as_u64() {
                        Some(0) => Some(false),
                        Some(1) => Some(true),
                        _ => None,
                    },
                    Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                        "true" | "yes" | "on" | "1" => Some(true),
                        "false" | "no" | "off" | "0" => Some(false),
                        _ => None,
                    },
                    _ => None,
                };
                b.ok_or_else(|| {
                    ConfigError::invalid(key, format!("expected a boolean, got {}", show_value(v)))
                })
            })
            .transpose()
    }

    /// A string (numbers and booleans are given in their JSON form), if set.
    pub fn get_string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Err(ConfigError::invalid(
                    key,
                    format!("expected a string, got {}", show_value(other)),
                )),
            })
            .transpose()
    }
}

impl From<Map<String, Value>> for EngineConfig {
    fn from(map: Map<String, Value>) -> Self {
        EngineConfig(map)
    }
}

impl From<EngineConfig> for Value {
    fn from(conf: EngineConfig) -> Self {
        Value::Object(conf.0)
    }
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for EngineConfig {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        EngineConfig(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Parse a non-negative integer from a JSON number (`5`, `5.0`) or string (`"5"`).
pub fn parse_u64(key: &str, value: &Value) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            key,
            format!("expected a non-negative integer, got {}", show_value(value)),
        )
    };
    match value {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(u)
            } else {
                n.as_f64().and_then(integral_f64).ok_or_else(bad)
            }
        }
        Value::String(s) => {
            let t = s.trim();
            let t = t.strip_prefix('+').unwrap_or(t);
            if let Ok(u) = t.parse::<u64>() {
                Ok(u)
            } else {
                t.parse::<f64>().ok().and_then(integral_f64).ok_or_else(bad)
            }
        }
        _ => Err(bad()),
    }
}

/// A float that is a whole, non-negative number exactly representable as u64.
fn integral_f64(f: f64) -> Option<u64> {
    // 2^53: beyond it floats are not exact integers any more.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= MAX_EXACT {
        // Checked above: finite, non-negative, integral, in range.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(f as u64)
    } else {
        None
    }
}

/// A value as shown in error messages: its JSON text, shortened if long.
pub(crate) fn show_value(value: &Value) -> String {
    let s = value.to_string();
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s
    }
}

/// What is wrong with a configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigErrorKind {
    /// The key is set to a value the engine refuses.
    InvalidValue,
    /// The engine has no such key.
    UnknownKey,
    /// A required key is not set.
    MissingKey,
}

/// A refused configuration, naming the key.
///
/// Displays as, for example,
/// `invalid value for "preserve_n": expected a non-negative integer, got -1`,
/// `unknown config key "preserv_n"; known keys: preserve_n, unique_instances, …`, or
/// `missing required config key "preserve_n": expected a non-negative integer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ConfigError {
    /// The key at fault (empty if the configuration as a whole is not a map).
    pub key: String,
    /// What kind of fault.
    pub kind: ConfigErrorKind,
    /// What was expected and what was given.
    pub message: String,
}

impl ConfigError {
    /// `key` has a value the engine refuses.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            kind: ConfigErrorKind::InvalidValue,
            message: message.into(),
        }
    }

    /// `key` is not a key of this engine; `known` lists those that are.
    pub fn unknown(key: impl Into<String>, known: &[&str]) -> Self {
        ConfigError {
            key: key.into(),
            kind: ConfigErrorKind::UnknownKey,
            message: format!("known keys: {}", known.join(", ")),
        }
    }

    /// Required `key` is not set.
    pub fn missing(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            kind: ConfigErrorKind::MissingKey,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ConfigErrorKind::InvalidValue if self.key.is_empty() => {
                write!(f, "invalid engine configuration: {}", self.message)
            }
            ConfigErrorKind::InvalidValue => {
                write!(f, "invalid value for {:?}: {}", self.key, self.message)
            }
            ConfigErrorKind::UnknownKey => {
                write!(f, "unknown config key {:?}; {}", self.key, self.message)
            }
            ConfigErrorKind::MissingKey => {
                write!(
                    f,
                    "missing required config key {:?}: {}",
                    self.key, self.message
                )
            }
        }
    }
}
