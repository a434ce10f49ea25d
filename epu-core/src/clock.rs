//! Wall-clock time that tests and the simulator can drive.
//!
//! Code that records or compares timestamps (node state times, heartbeat ages, cooldowns)
//! asks a [`Clock`] instead of calling `Utc::now()`, so that decisions are deterministic for
//! a given clock. Services use [`SystemClock`]; tests and the simulator use
//! [`ManualClock`] and move time by hand.
//!
//! This is wall-clock time (`DateTime<Utc>`), the kind that is written to the store and
//! sent on the wire. Sleeping and timeouts use `tokio::time`, which tests pause separately.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The clock most code holds: cheap to clone, shared between tasks.
pub type SharedClock = Arc<dyn Clock>;

/// The real time of the machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// A [`SharedClock`] over the system time.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl Default for ManualClock {
    /// A clock stopped at 2024-01-01T00:00:00Z, so test output is stable.
    fn default() -> Self {
        let start = Utc
            .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        ManualClock::new(start)
    }
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// This clock as a [`SharedClock`]; the handle still moves it.
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }

    fn guard(&self) -> MutexGuard<'_, DateTime<Utc>> {
        // A panic while holding this lock cannot leave the time half-written.
        self.now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the time (it may go backwards: tests of clock skew need that).
    pub fn set(&self, t: DateTime<Utc>) {
        *self.guard() = t;
    }

    /// Moves the time forward by `d`, saturating at the largest representable time.
    pub fn advance(&self, d: Duration) {
        let delta = TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        let mut now = self.guard();
        *now = now
            .checked_add_signed(delta)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.guard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_tracks_real_time() {
        let before = Utc::now();
        let t = SystemClock.now();
        let after = Utc::now();
        assert!(before <= t && t <= after);
    }

    #[test]
    fn manual_clock_stands_still_until_moved() {
        let clock = ManualClock::default();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now() - t0, TimeDelta::seconds(90));
    }

    #[test]
    fn manual_clock_clones_and_shared_handles_move_together() {
        let clock = ManualClock::default();
        let shared: SharedClock = clock.shared();
        let other = clock.clone();
        let t = Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).single();
        let Some(t) = t else { panic!("valid date") };
        other.set(t);
        assert_eq!(shared.now(), t);
        assert_eq!(clock.now(), t);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(shared.now(), t + TimeDelta::milliseconds(1500));
    }

    #[test]
    fn manual_clock_set_may_go_backwards() {
        let clock = ManualClock::default();
        let t0 = clock.now();
        clock.set(t0 - TimeDelta::hours(1));
        assert!(clock.now() < t0);
    }

    #[test]
    fn advance_saturates() {
        let clock = ManualClock::default();
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn shared_clock_is_debug_and_object_safe() {
        let clocks: Vec<SharedClock> = vec![SystemClock::shared(), ManualClock::default().shared()];
        for c in &clocks {
            assert!(!format!("{c:?}").is_empty());
            let _ = c.now();
        }
    }
}
