//! The one backoff and retry schedule of the project.
//!
//! Every place that waits before trying again — IaaS calls that hit a rate limit, bus
//! reconnects, relaunching after a capacity error — uses [`Backoff`]. It is exponential
//! (`initial * multiplier^attempt`), capped at `max`, with an optional symmetric jitter so
//! that many clients that failed together do not retry together.
//!
//! Attempts are counted from zero: `delay_nominal(0)` is the wait after the first failure,
//! `delay_nominal(1)` the wait after the second, and so on. The arithmetic saturates: any
//! attempt number, however large, gives at most `max`.
//!
//! [`retry`] runs an async operation under a schedule, and [`BackoffState`] keeps the
//! attempt count for loops that are not a single call (a reconnect loop that resets after
//! a success).

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// An exponential backoff schedule with a cap and jitter.
///
/// Out-of-range fields are clamped when a delay is computed rather than rejected: a
/// `multiplier` below 1 (or NaN) counts as 1, a `jitter` outside `0..=1` is clamped into it,
/// and an `initial` above `max` gives `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of every delay, jittered or not.
    pub max: Duration,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
    /// Jitter as a fraction of the nominal delay, in `0..=1`: a jittered delay lies in
    /// `nominal * (1 - jitter) ..= nominal * (1 + jitter)`, capped at `max`.
    pub jitter: f64,
}

impl Default for Backoff {
    /// 100 ms, doubling, capped at 30 s, ±20 % jitter.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// A schedule with the given bounds, the default multiplier (2) and jitter (0.2).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            ..Backoff::default()
        }
    }

    /// The same schedule with another jitter fraction.
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The same schedule with another multiplier.
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    fn effective_jitter(&self) -> f64 {
        if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        }
    }

    /// Converts seconds to a duration capped at `max`; anything not finite or too large
    /// becomes `max`, anything negative becomes zero.
    fn capped(&self, secs: f64) -> Duration {
        if secs.is_nan() {
            return self.max;
        }
        if secs <= 0.0 {
            return Duration::ZERO;
        }
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => d.min(self.max),
            Err(_) => self.max,
        }
    }

    /// The delay after failed attempt `attempt` (0-based), without jitter.
    ///
    /// Deterministic, monotone non-decreasing in `attempt`, and never above `max`.
    pub fn delay_nominal(&self, attempt: u32) -> Duration {
        let secs = epu_model::backoff::nominal_secs(
            self.initial.as_secs_f64(),
            self.multiplier,
            self.max.as_secs_f64(),
            attempt,
        );
        self.capped(secs)
    }

    /// The delay after failed attempt `attempt` (0-based), with jitter drawn from `rng`.
    ///
    /// Lies within `±jitter` of [`delay_nominal`](Self::delay_nominal) and never above `max`.
    pub fn delay_with_jitter<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let nominal = self.delay_nominal(attempt);
        let jitter = self.effective_jitter();
        if jitter == 0.0 || nominal.is_zero() {
            return nominal;
        }
        let spread: f64 = rng.random_range(-jitter..=jitter);
        self.capped(nominal.as_secs_f64() * (1.0 + spread))
    }

    /// A stateful cursor over this schedule, starting at attempt 0.
    pub fn state(&self) -> BackoffState {
        BackoffState {
            backoff: *self,
            attempt: 0,
        }
    }
}

/// A running position in a [`Backoff`] schedule, for loops that wait between tries and
/// start over after a success (reconnect loops).
#[derive(Debug, Clone)]
pub struct BackoffState {
    backoff: Backoff,
    attempt: u32,
}

impl BackoffState {
    /// The number of delays handed out since the start or the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The next jittered delay; advances the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self
            .backoff
            .delay_with_jitter(self.attempt, &mut rand::rng());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Sleeps for the next jittered delay (with `tokio::time`, so paused-time tests work).
    pub async fn wait(&mut self) {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
    }

    /// Starts the schedule over, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs `op` until it succeeds, fails with an error that `is_retryable` rejects, or has
/// been tried `max_attempts` times in all (the first try counts; 0 is taken as 1).
///
/// Between tries it sleeps for the jittered delay of the schedule with
/// `tokio::time::sleep`, so tests can use `tokio::time::pause()`. Returns the first
/// success, or the last error.
pub async fn retry<T, E, F, Fut, P>(
    backoff: &Backoff,
    max_attempts: u32,
    is_retryable: P,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    P: Fn(&E) -> bool,
{
    let max_attempts = max_attempts.max(1);
    let mut attempt: u32 = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                let tried = attempt.saturating_add(1);
                if tried >= max_attempts || !is_retryable(&err) {
                    return Err(err);
                }
                // The rng is a temporary so the returned future stays Send.
                let delay = backoff.delay_with_jitter(attempt, &mut rand::rng());
                tracing::debug!(
                    attempt = tried,
                    max_attempts,
                    delay_ms = delay.as_millis() as u64,
                    "operation failed with a retryable error; retrying after backoff"
                );
                tokio::time::sleep(delay).await;
                attempt = tried;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn default_schedule_doubles_from_100ms() {
        let b = Backoff::default().with_jitter(0.0);
        assert_eq!(b.delay_nominal(0), Duration::from_millis(100));
        assert_eq!(b.delay_nominal(1), Duration::from_millis(200));
        assert_eq!(b.delay_nominal(2), Duration::from_millis(400));
        assert_eq!(b.delay_nominal(20), Duration::from_secs(30));
    }

    #[test]
    fn huge_attempt_gives_max_without_overflow() {
        let b = Backoff::default();
        assert_eq!(b.delay_nominal(1000), b.max);
        assert_eq!(b.delay_nominal(u32::MAX), b.max);
        let mut rng = StdRng::seed_from_u64(7);
        assert!(b.delay_with_jitter(u32::MAX, &mut rng) <= b.max);
    }

    #[test]
    fn odd_fields_are_clamped() {
        let b = Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(1),
            multiplier: f64::NAN,
            jitter: 5.0,
        };
        assert_eq!(b.delay_nominal(0), Duration::from_secs(1));
        let shrinking = Backoff::default().with_multiplier(0.5);
        assert_eq!(shrinking.delay_nominal(3), Duration::from_millis(100));
    }

    #[test]
    fn state_advances_and_resets() {
        let mut s = Backoff::default().with_jitter(0.0).state();
        assert_eq!(s.next_delay(), Duration::from_millis(100));
        assert_eq!(s.next_delay(), Duration::from_millis(200));
        assert_eq!(s.attempt(), 2);
        s.reset();
        assert_eq!(s.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_sleeps_between_attempts_then_succeeds() {
        let calls = Arc::new(AtomicU32::new(0));
        let b = Backoff::default().with_jitter(0.0);
        let start = tokio::time::Instant::now();
        let c = calls.clone();
        let out: Result<u32, &str> = retry(
            &b,
            5,
            |_| true,
            move || {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    if n < 2 {
                        Err("transient")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(out, Ok(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // 100 ms + 200 ms of virtual time.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_after_max_attempts_with_last_error() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let out: Result<(), u32> = retry(
            &Backoff::default(),
            3,
            |_| true,
            move || {
                let c = c.clone();
                async move { Err(c.fetch_add(1, Ordering::SeqCst)) }
            },
        )
        .await;
        assert_eq!(out, Err(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_non_retryable_error() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let start = tokio::time::Instant::now();
        let out: Result<(), &str> = retry(
            &Backoff::default(),
            10,
            |e: &&str| *e != "fatal",
            move || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Err("fatal")
                }
            },
        )
        .await;
        assert_eq!(out, Err("fatal"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn retry_future_is_send() {
        fn assert_send<T: Send>(_: T) {}
        let b = Backoff::default();
        assert_send(retry(&b, 2, |_: &()| true, || async { Ok::<(), ()>(()) }));
    }

    fn arb_backoff() -> impl Strategy<Value = Backoff> {
        (
            0u64..5_000,
            0u64..120_000,
            prop_oneof![Just(1.0f64), 1.0f64..10.0, Just(0.5f64)],
            0.0f64..=1.0,
        )
            .prop_map(|(initial_ms, max_ms, multiplier, jitter)| Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                multiplier,
                jitter,
            })
    }

    proptest! {
        #[test]
        fn nominal_is_monotone_and_capped(b in arb_backoff(), attempt in 0u32..2_000) {
            let here = b.delay_nominal(attempt);
            let next = b.delay_nominal(attempt + 1);
            prop_assert!(here <= next, "{here:?} > {next:?} at attempt {attempt}");
            prop_assert!(here <= b.max);
            prop_assert!(next <= b.max);
        }

        #[test]
        fn jittered_is_within_bounds(b in arb_backoff(), attempt in 0u32..2_000, seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let nominal = b.delay_nominal(attempt).as_secs_f64();
            let jittered = b.delay_with_jitter(attempt, &mut rng);
            prop_assert!(jittered <= b.max);
            let j = jittered.as_secs_f64();
            // One nanosecond of slack for the float round trip.
            let slack = 1e-9;
            prop_assert!(j >= nominal * (1.0 - b.jitter) - slack, "{j} below {nominal} - {}", b.jitter);
            prop_assert!(j <= nominal * (1.0 + b.jitter) + slack, "{j} above {nominal} + {}", b.jitter);
        }
    }
}
