//! Launch-failure backoff, shared by the built-in engines (and usable by custom ones).
//!
//! After `k ≥ 1` consecutive launch failures ([`LaunchFailures`]), no launch is made
//! until `backoff_initial_secs × 2^(k−1)`, capped at `backoff_max_secs`, has passed since
//! the last failure. A successful launch (a node reaching RUNNING) resets the count.
//! Destroys are never held back.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};

use crate::config::{ConfigError, EngineConfig};
use crate::state::LaunchFailures;

/// Config key: first backoff delay in seconds.
pub const KEY_BACKOFF_INITIAL: &str = "backoff_initial_secs";
/// Config key: longest backoff delay in seconds.
pub const KEY_BACKOFF_MAX: &str = "backoff_max_secs";

/// Default of `backoff_initial_secs`.
pub const DEFAULT_BACKOFF_INITIAL_SECS: u64 = 10;
/// Default of `backoff_max_secs`.
pub const DEFAULT_BACKOFF_MAX_SECS: u64 = 300;

/// Backoff settings. `initial_secs == 0` turns backoff off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial_secs: u64,
    /// Cap on the delay.
    pub max_secs: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_secs: DEFAULT_BACKOFF_INITIAL_SECS,
            max_secs: DEFAULT_BACKOFF_MAX_SECS,
        }
    }
}

impl Backoff {
    /// Parse `backoff_initial_secs` and `backoff_max_secs` (max must be ≥ initial).
    pub fn from_config(conf: &EngineConfig) -> Result<Self, ConfigError> {
        let initial_secs = conf
            .get_u64(KEY_BACKOFF_INITIAL)?
            .unwrap_or(DEFAULT_BACKOFF_INITIAL_SECS);
        let max_secs = match conf.get_u64(KEY_BACKOFF_MAX)? {
            Some(m) => m,
            // Only the initial delay given: keep the default cap, unless it is smaller.
            None => DEFAULT_BACKOFF_MAX_SECS.max(initial_secs),
        };
        if max_secs < initial_secs {
            return Err(ConfigError::invalid(
                KEY_BACKOFF_MAX,
                format!("must be at least {KEY_BACKOFF_INITIAL} ({initial_secs}), got {max_secs}"),
            ));
        }
        // Keep delays representable as a TimeDelta (i64 milliseconds).
        const LIMIT: u64 = 100 * 365 * 24 * 3600;
        if max_secs > LIMIT {
            return Err(ConfigError::invalid(
                KEY_BACKOFF_MAX,
                format!("must be at most {LIMIT} seconds, got {max_secs}"),
            ));
        }
        Ok(Backoff {
            initial_secs,
            max_secs,
        })
    }

    /// The delay after `consecutive` failures (zero for none).
    pub fn delay_secs(&self, consecutive: u32) -> u64 {
        if consecutive == 0 || self.initial_secs == 0 {
            return 0;
        }
        // The project's one schedule: doubling from `initial_secs`, capped.
        let secs = epu_model::backoff::nominal_secs(
            self.initial_secs as f64,
            2.0,
            self.max_secs as f64,
            consecutive - 1,
        );
        secs.round() as u64
    }

    /// Until when launches are held back, if they are at `now`.
    pub fn blocked_until(
        &self,
        failures: &LaunchFailures,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let last = failures.last_at?;
        let delay = self.delay_secs(failures.consecutive);
        if delay == 0 {
            return None;
        }
        let until = i64::try_from(delay)
            .ok()
            .and_then(TimeDelta::try_seconds)
            .and_then(|d| last.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        (now < until).then_some(until)
    }

    /// A JSON description for engine reports.
    pub(crate) fn report(&self, failures: &LaunchFailures, now: DateTime<Utc>) -> Value {
        json!({
            "consecutive_failures": failures.consecutive,
            "last_failure": failures.last_at,
            "delay_secs": self.delay_secs(failures.consecutive),
            "blocked_until": self.blocked_until(failures, now),
        })
    }
}
