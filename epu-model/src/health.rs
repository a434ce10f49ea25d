//! How a domain's workers are judged, and where its work queue is: the settings a
//! domain's policy (`epu-controller`) and the sensor aggregator's config share, in
//! one type each, so the two can never disagree on a key, a default or a check.
//!
//! * [`Secs`]: a number of seconds that is finite and above 0, checked as it is read.
//! * [`HealthPolicy`]: `boot_timeout_secs`, `missing_timeout_secs`, `zombie_secs`.
//!   In a policy file it is the `[health]` table (read with [`deserialize_strict`],
//!   so a misspelt key is refused); in the aggregator's config its keys sit in each
//!   `[[domains]]` entry (flattened); in the controller's `describe_domain` reply it
//!   is `health`.
//! * [`SensorPolicy`]: a policy's `[sensors]` (the work queue and its broker), the
//!   reply's `sensors`.

use std::fmt;
use std::time::Duration;

use chrono::TimeDelta;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest span a [`Secs`] converts to (about 31 years); longer values are
/// clamped, so a conversion never overflows.
const MAX_SECS: f64 = 1e9;

/// A number of seconds for a `*_secs` setting: finite and **above 0**.
///
/// Zero is refused along with negative numbers, NaN and infinity, *because* every
/// setting of this type is either a timeout (zero would declare every worker
/// unhealthy the moment it was judged) or a period (zero would spin). Where the
/// settings used to be checked twice, the controller's policy check was already
/// `> 0` and the aggregator's `>= 0`; the stricter one is kept.
///
/// It reads from a plain number (`15`, `0.5`) and writes as one.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Secs(f64);

/// A value that is not a valid [`Secs`]; the message names it.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("{value} is not a valid number of seconds: use a finite number above 0, such as 15 or 0.5")]
pub struct SecsError {
    pub value: f64,
}

impl Secs {
    /// `value` seconds, if it is finite and above 0.
    pub fn new(value: f64) -> Result<Secs, SecsError> {
        if value.is_finite() && value > 0.0 {
            Ok(Secs(value))
        } else {
            Err(SecsError { value })
        }
    }

    /// For constants whose value is known to be valid.
    const fn known(value: f64) -> Secs {
        Secs(value)
    }

    /// The number of seconds.
    pub const fn get(self) -> f64 {
        self.0
    }

    /// As a `Duration` (clamped to about 31 years).
    pub fn as_duration(self) -> Duration {
        Duration::from_secs_f64(self.0.min(MAX_SECS))
    }

    /// As a `TimeDelta`, to the millisecond (clamped to about 31 years).
    pub fn as_time_delta(self) -> TimeDelta {
        TimeDelta::milliseconds((self.0.min(MAX_SECS) * 1000.0).round() as i64)
    }
}

impl TryFrom<f64> for Secs {
    type Error = SecsError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Secs::new(value)
    }
}

impl From<Secs> for f64 {
    fn from(s: Secs) -> f64 {
        s.0
    }
}

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} s", self.0)
    }
}

impl Serialize for Secs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Secs::new(v).map_err(serde::de::Error::custom)
    }
}

/// How the sensor aggregator judges a domain's workers (its rules are in
/// `sensor-aggregator/src/health.rs`). Every key is optional; a missing one takes
/// its default.
///
/// Read leniently: keys it does not know are left for the surrounding struct (so it
/// can be flattened into the aggregator's `[[domains]]` entries, whose own
/// `deny_unknown_fields` refuses a typo). Where it stands alone, as a policy's
/// `[health]` table, read it with [`deserialize_strict`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HealthFields")]
pub struct HealthPolicy {
    /// A RUNNING worker never heard from within this is MISSING (default 60 s).
    pub boot_timeout_secs: Secs,
    /// A worker silent for longer than this is MISSING (default 15 s).
    pub missing_timeout_secs: Secs,
    /// A worker heard more than this after it was terminated is a ZOMBIE (default 10 s).
    pub zombie_secs: Secs,
}

impl HealthPolicy {
    /// Every setting at its default: boot 60 s, missing 15 s, zombie 10 s.
    pub const DEFAULT: HealthPolicy = HealthPolicy {
        boot_timeout_secs: Secs::known(60.0),
        missing_timeout_secs: Secs::known(15.0),
        zombie_secs: Secs::known(10.0),
    };
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy::DEFAULT
    }
}

/// The wire form of [`HealthPolicy`]: any values, checked (with the key named) as
/// they become [`Secs`]. Kept as raw values so that a mistyped one is reported with
/// its key even when flattened (serde's own type errors lose the key there), and so
/// that a number given as text (an `EPU_*` environment override) is read.
#[derive(Default, Deserialize)]
#[serde(default)]
struct HealthFields {
    boot_timeout_secs: Option<serde_json::Value>,
    missing_timeout_secs: Option<serde_json::Value>,
    zombie_secs: Option<serde_json::Value>,
}

/// A [`HealthPolicy`] key whose value is not a valid number of seconds.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum HealthPolicyError {
    #[error("{key}: {source}")]
    OutOfRange {
        key: &'static str,
        source: SecsError,
    },
    #[error("{key}: expected a number of seconds above 0, such as 15 or 0.5, got {got}")]
    NotANumber { key: &'static str, got: String },
}

fn field_secs(
    key: &'static str,
    v: Option<serde_json::Value>,
    default: Secs,
) -> Result<Secs, HealthPolicyError> {
    use serde_json::Value;
    let v = match v {
        None | Some(Value::Null) => return Ok(default),
        Some(v) => v,
    };
    let n = match &v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(x) => Secs::new(x).map_err(|source| HealthPolicyError::OutOfRange { key, source }),
        None => Err(HealthPolicyError::NotANumber {
            key,
            got: v.to_string(),
        }),
    }
}

impl TryFrom<HealthFields> for HealthPolicy {
    type Error = HealthPolicyError;
    fn try_from(f: HealthFields) -> Result<Self, Self::Error> {
        let d = HealthPolicy::DEFAULT;
        Ok(HealthPolicy {
            boot_timeout_secs: field_secs(
                "boot_timeout_secs",
                f.boot_timeout_secs,
                d.boot_timeout_secs,
            )?,
            missing_timeout_secs: field_secs(
                "missing_timeout_secs",
                f.missing_timeout_secs,
                d.missing_timeout_secs,
            )?,
            zombie_secs: field_secs("zombie_secs", f.zombie_secs, d.zombie_secs)?,
        })
    }
}

/// Reads a [`HealthPolicy`] that stands alone (a policy's `[health]` table), refusing
/// keys it does not know. For `#[serde(deserialize_with = "...")]`.
pub fn deserialize_strict<'de, D: Deserializer<'de>>(d: D) -> Result<HealthPolicy, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        #[serde(flatten)]
        health: HealthPolicy,
    }
    Strict::deserialize(d).map(|s| s.health)
}

/// Where a domain's work queue is (for queue-length engines): a policy's `[sensors]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SensorPolicy {
    pub queue: Option<String>,
    /// The broker holding `queue`; default the run's broker. May hold a password:
    /// never log it unredacted.
    pub broker_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secs_accepts_finite_positive_numbers_only() {
        let cases: &[(f64, bool)] = &[
            (15.0, true),
            (0.5, true),
            (1e-3, true),
            (1e12, true),
            (0.0, false),
            (-0.0, false),
            (-1.0, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
            (f64::NEG_INFINITY, false),
        ];
        for (v, ok) in cases {
            match Secs::new(*v) {
                Ok(s) => {
                    assert!(ok, "{v} accepted");
                    assert_eq!(s.get(), *v);
                }
                Err(e) => {
                    assert!(!ok, "{v} refused: {e}");
                    assert!(e.to_string().contains(&v.to_string()), "names {v}: {e}");
                    assert!(e.to_string().contains("above 0"), "says what to do: {e}");
                }
            }
        }
    }

    #[test]
    fn secs_reads_and_writes_a_plain_number() {
        let cases: &[(serde_json::Value, Result<f64, &str>)] = &[
            (json!(15), Ok(15.0)),
            (json!(0.25), Ok(0.25)),
            (json!(0), Err("0 is not a valid number of seconds")),
            (json!(-2.5), Err("-2.5 is not a valid number of seconds")),
            (json!("15"), Err("invalid type")),
            (json!(null), Err("invalid type")),
        ];
        for (input, want) in cases {
            let got = serde_json::from_value::<Secs>(input.clone());
            match (want, got) {
                (Ok(w), Ok(s)) => {
                    assert_eq!(s.get(), *w, "{input}");
                    assert_eq!(serde_json::to_value(s).expect("enc"), json!(w));
                }
                (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{input}: {e}"),
                (w, g) => panic!("{input}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn secs_converts_to_the_millisecond_and_clamps() {
        let s = |v| Secs::new(v).expect("valid");
        assert_eq!(s(1.5).as_time_delta(), TimeDelta::milliseconds(1500));
        assert_eq!(s(0.0004).as_time_delta(), TimeDelta::zero());
        assert_eq!(s(1.5).as_duration(), Duration::from_millis(1500));
        assert_eq!(s(1e300).as_duration(), Duration::from_secs(1_000_000_000));
        assert_eq!(s(1e300).as_time_delta(), TimeDelta::seconds(1_000_000_000));
    }

    /// (input, expected (boot, missing, zombie) or a fragment of the error).
    type Case = (serde_json::Value, Result<(f64, f64, f64), &'static str>);

    #[test]
    fn health_policy_table() {
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (json!({}),                                         Ok((60.0, 15.0, 10.0))),
            (json!({"missing_timeout_secs": 1}),                Ok((60.0, 1.0, 10.0))),
            (json!({"boot_timeout_secs": 3600, "missing_timeout_secs": 3600}), Ok((3600.0, 3600.0, 10.0))),
            (json!({"boot_timeout_secs": 0.5, "missing_timeout_secs": 0.25, "zombie_secs": 2}), Ok((0.5, 0.25, 2.0))),
            (json!({"zombie_secs": null}),                      Ok((60.0, 15.0, 10.0))),
            (json!({"boot_timeout_secs": 0}),                   Err("boot_timeout_secs: 0 is not a valid number of seconds")),
            (json!({"missing_timeout_secs": -1}),               Err("missing_timeout_secs: -1 is not a valid number of seconds")),
            (json!({"zombie_secs": 0}),                         Err("zombie_secs: 0 is not")),
            (json!({"missing_timeout_secs": "soon"}),           Err("missing_timeout_secs: expected a number of seconds above 0, such as 15 or 0.5, got \"soon\"")),
            (json!({"missing_timeout_secs": [1]}),              Err("missing_timeout_secs: expected a number")),
            (json!({"missing_timeout_secs": "2.5"}),            Ok((60.0, 2.5, 10.0))),
            (json!({"missing_timeout_secs": "-2"}),             Err("missing_timeout_secs: -2 is not")),
        ];
        for (input, want) in cases {
            let lenient = serde_json::from_value::<HealthPolicy>(input.clone());
            let strict = deserialize_strict(input.clone());
            for (how, got) in [("lenient", lenient), ("strict", strict)] {
                match (&want, got) {
                    (Ok((b, m, z)), Ok(p)) => assert_eq!(
                        (
                            p.boot_timeout_secs.get(),
                            p.missing_timeout_secs.get(),
                            p.zombie_secs.get()
                        ),
                        (*b, *m, *z),
                        "{how} {input}"
                    ),
                    (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{how} {input}: {e}"),
                    (w, g) => panic!("{how} {input}: wanted {w:?}, got {g:?}"),
                }
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused_only_when_strict() {
        let typo = json!({"missing_timout_secs": 1});
        let p: HealthPolicy = serde_json::from_value(typo.clone()).expect("lenient");
        assert_eq!(p, HealthPolicy::DEFAULT);
        let e = deserialize_strict(typo).expect_err("strict");
        assert!(e.to_string().contains("missing_timout_secs"), "{e}");
    }

    #[test]
    fn flattened_it_leaves_other_keys_to_the_outer_struct() {
        #[derive(Debug, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        struct Outer {
            name: String,
            #[serde(flatten)]
            health: HealthPolicy,
        }
        let o: Outer =
            serde_json::from_value(json!({"name": "w", "zombie_secs": 3})).expect("flattened");
        assert_eq!(o.health.zombie_secs.get(), 3.0);
        assert_eq!(o.health.missing_timeout_secs.get(), 15.0);
        assert_eq!(
            serde_json::to_value(&o).expect("enc"),
            json!({"name": "w", "boot_timeout_secs": 60.0, "missing_timeout_secs": 15.0, "zombie_secs": 3.0})
        );
        let e =
            serde_json::from_value::<Outer>(json!({"name": "w", "queu": "x"})).expect_err("typo");
        assert!(e.to_string().contains("queu"), "{e}");
        let e = serde_json::from_value::<Outer>(json!({"name": "w", "zombie_secs": -3}))
            .expect_err("negative");
        assert!(e.to_string().contains("zombie_secs: -3"), "{e}");
    }

    #[test]
    fn it_round_trips() {
        let p = HealthPolicy {
            boot_timeout_secs: Secs::new(20.0).expect("valid"),
            missing_timeout_secs: Secs::new(4.0).expect("valid"),
            zombie_secs: Secs::new(10.0).expect("valid"),
        };
        let v = serde_json::to_value(p).expect("enc");
        assert_eq!(
            v,
            json!({"boot_timeout_secs": 20.0, "missing_timeout_secs": 4.0, "zombie_secs": 10.0})
        );
        assert_eq!(serde_json::from_value::<HealthPolicy>(v).expect("dec"), p);
    }
}
