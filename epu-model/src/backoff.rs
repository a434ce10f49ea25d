//! The exponential backoff schedule, as arithmetic. Both the services' retry and
//! reconnect loops (`epu_core::backoff`) and the engines' launch-failure backoff
//! (`decision_engines::backoff`) compute their delays here, so there is one
//! schedule in the project.

/// `initial × multiplier^attempt` seconds, capped at `max` (attempts count from 0).
///
/// Saturates instead of overflowing: any attempt, however large, gives at most
/// `max`. A multiplier below 1 (or NaN) counts as 1; a negative or NaN `initial`
/// counts as 0; `initial` above `max` gives `max`.
pub fn nominal_secs(initial: f64, multiplier: f64, max: f64, attempt: u32) -> f64 {
    let max = if max.is_nan() { 0.0 } else { max.max(0.0) };
    let initial = if initial.is_nan() {
        0.0
    } else {
        initial.clamp(0.0, max)
    };
    let multiplier = if multiplier.is_nan() || multiplier < 1.0 {
        1.0
    } else {
        multiplier
    };
    // powi takes an i32; past a few thousand attempts the factor is infinite anyway.
    let factor = multiplier.powi(attempt.min(i32::MAX as u32) as i32);
    let secs = initial * factor;
    if secs.is_finite() {
        secs.min(max)
    } else {
        max
    }
}

#[cfg(test)]
mod tests {
    use super::nominal_secs;

    #[test]
    fn doubles_then_caps_and_never_overflows() {
        let d: Vec<f64> = (0..6).map(|a| nominal_secs(10.0, 2.0, 60.0, a)).collect();
        assert_eq!(d, vec![10.0, 20.0, 40.0, 60.0, 60.0, 60.0]);
        assert_eq!(nominal_secs(10.0, 2.0, 60.0, u32::MAX), 60.0);
        assert_eq!(nominal_secs(100.0, 2.0, 60.0, 0), 60.0);
        assert_eq!(nominal_secs(1.0, 0.5, 60.0, 5), 1.0);
        assert_eq!(nominal_secs(f64::NAN, 2.0, 60.0, 3), 0.0);
    }
}
