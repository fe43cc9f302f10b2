//! Retry timing as a pure function of the stored attempt count.
//!
//! Durable retries (rows, batches) never keep a timer in memory: the next try's time is computed
//! from the attempt count in the database, so a restart or another replica continues the same
//! schedule. Full jitter spreads a burst of failures over the whole window.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The ceiling of the wait before try number `attempt + 1`, after `attempt` failed tries
    /// (attempt 1 → base, doubling up to `max_delay`).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        let factor = 1u64 << exponent;
        let ceiling = self
            .base_delay
            .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX));
        ceiling.min(self.max_delay)
    }

    /// The wait itself: `ceiling(attempt) * unit`, where `unit` in `[0, 1)` is the jitter drawn by
    /// the caller (so tests pass a fixed one).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.ceiling(attempt).mul_f64(unit)
    }

    /// A delay with fresh jitter.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }

    /// The pause after the `consecutive`-th throttled answer (429) in a row that named no
    /// delay of its own: between half the ceiling and the ceiling ("equal jitter"), so that it
    /// grows with every throttled answer, never drops near zero, and stops at `max_delay`.
    /// Throttled sends burn no attempt, so the attempt count cannot drive this.
    pub fn throttled(&self, consecutive: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.ceiling(consecutive).mul_f64(0.5 + unit / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(10),
    };

    #[test]
    fn the_ceiling_doubles_from_the_base_and_stops_at_the_maximum() {
        let ceilings: Vec<_> = (1..=9).map(|a| POLICY.ceiling(a).as_millis()).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert_eq!(POLICY.ceiling(0), Duration::from_millis(100));
        assert_eq!(POLICY.ceiling(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(POLICY.delay(3, 0.0), Duration::ZERO);
        assert_eq!(POLICY.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(POLICY.delay(3, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn throttled_pauses_grow_with_each_429_in_a_row_and_never_near_zero() {
        let lowest: Vec<_> = (1..=9)
            .map(|n| POLICY.throttled(n, 0.0).as_millis())
            .collect();
        assert_eq!(lowest, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(POLICY.throttled(3, 1.0), Duration::from_millis(400));
        assert_eq!(POLICY.throttled(3, f64::NAN), Duration::from_millis(200));
    }

    proptest! {
        #[test]
        fn a_throttled_pause_never_shrinks_below_the_previous_floor(n in 1u32..64, u in 0.0f64..1.0, v in 0.0f64..1.0) {
            // The (n+1)-th pause is at least the n-th's lowest value, whatever the jitter.
            prop_assert!(POLICY.throttled(n + 1, u) >= POLICY.throttled(n, 0.0));
            prop_assert!(POLICY.throttled(n, v) <= POLICY.max_delay);
        }

        #[test]
        fn a_delay_never_exceeds_the_maximum(attempt in 0u32..10_000, unit in 0.0f64..1.0) {
            let d = POLICY.delay(attempt, unit);
            prop_assert!(d <= POLICY.max_delay);
            prop_assert!(d <= POLICY.ceiling(attempt));
        }

        #[test]
        fn ceilings_never_shrink_as_attempts_grow(attempt in 0u32..10_000) {
            prop_assert!(POLICY.ceiling(attempt) <= POLICY.ceiling(attempt + 1));
        }
    }
}
