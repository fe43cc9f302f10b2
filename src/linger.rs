//! Batch fill (`batch.linger`): whether a claim lane's partial tail may wait for more rows
//! (pure; the claim in `store/claim.rs` reads the numbers and applies the decision).
//!
//! Under a trickle of inserts, with jittered retries coming due one by one and several replicas
//! splitting what is there, each claim finds a few rows and a request carries a few items. A
//! lane that is *flowing* (its batches made in the last two lingers carried at least a quarter
//! of a batch) lets its partial tail wait until the tail's oldest row has been due for
//! `linger`, so that the rows arriving meanwhile ride in the same request. Full batches never
//! wait, and a lane that is not flowing (a lone change after quiet) never waits: its latency is
//! what it was without a linger.

use std::time::Duration;

/// How many of a lane's newest batches the flowing test reads (it needs only those made in the
/// last two lingers; this bounds the read whatever the rate).
pub const RECENT_BATCHES: usize = 32;

/// The longest `batch.linger` accepted.
pub const MAX_LINGER: Duration = Duration::from_secs(30);

/// One of a lane's recent batches, as the flowing test reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentBatch {
    /// Rows it carried.
    pub rows: usize,
    /// How long ago it was made (the database's clock).
    pub age: Duration,
}

/// A lane's due rows, looked at before anything is locked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Claimable rows (due, visible, no older row of their record waiting or in flight),
    /// counted up to the cap the claim asked for.
    pub due: usize,
    /// How long the longest-due of them has been due (0 when `due` is 0).
    pub oldest_due: Duration,
}

/// What a claim does with one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Take every due row now (up to the claim's size).
    All,
    /// Take `full` rows now (whole batches, possibly none); the tail past them waits, and the
    /// lane must be looked at again after `wait`, when the tail's oldest row will have been due
    /// for the linger.
    Tail { full: usize, wait: Duration },
}

/// Whether a lane is flowing: its batches made in the last two lingers carried at least a
/// quarter of a batch between them.
pub fn flowing(recent: &[RecentBatch], linger: Duration, batch_size: usize) -> bool {
    let window = linger.saturating_mul(2);
    let rows: usize = recent
        .iter()
        .filter(|b| b.age <= window)
        .map(|b| b.rows)
        .sum();
    !linger.is_zero() && rows * 4 >= batch_size.max(1)
}

/// The decision for a flowing lane with `backlog` (counted up to `cap`, at least one batch):
/// full batches go now; the partial tail waits until the oldest due row has been due for
/// `linger`, and then goes too. A backlog at the cap is deep: everything goes now.
pub fn decide(backlog: Backlog, linger: Duration, batch_size: usize, cap: usize) -> Decision {
    let batch_size = batch_size.max(1);
    if linger.is_zero() || backlog.due >= cap.max(batch_size) || backlog.oldest_due >= linger {
        return Decision::All;
    }
    let full = backlog.due / batch_size * batch_size;
    if full == backlog.due {
        return Decision::All;
    }
    Decision::Tail {
        full,
        wait: linger - backlog.oldest_due,
    }
}

/// After the lock, in a flowing lane: `rows` (fewer than a batch) are what a claim would send
/// past the lane's whole batches, the longest-due of them due for `oldest`. Unless that is the
/// linger, they wait until it is (`Some(wait)`) and ride with the rows that come meanwhile,
/// rather than go as a small request of their own (a tail that grew just past a batch as its
/// linger ran out; the rows left after another replica took the due tail). `None`: they go now.
pub fn left_short(
    rows: usize,
    oldest: Duration,
    linger: Duration,
    batch_size: usize,
) -> Option<Duration> {
    (rows > 0 && rows < batch_size && oldest < linger).then(|| linger - oldest)
}

/// The decision for one lane: a lane that is not flowing takes everything now; a flowing one
/// as [`decide`] says. `backlog` is read only for flowing lanes (`None`: not read).
pub fn for_lane(
    recent: &[RecentBatch],
    backlog: Option<Backlog>,
    linger: Duration,
    batch_size: usize,
    cap: usize,
) -> Decision {
    match backlog {
        Some(backlog) if flowing(recent, linger, batch_size) => {
            decide(backlog, linger, batch_size, cap)
        }
        _ => Decision::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_millis(300);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn batch(rows: usize, age_ms: u64) -> RecentBatch {
        RecentBatch {
            rows,
            age: ms(age_ms),
        }
    }

    fn backlog(due: usize, oldest_ms: u64) -> Backlog {
        Backlog {
            due,
            oldest_due: ms(oldest_ms),
        }
    }

    #[test]
    fn a_lane_is_flowing_when_its_batches_of_the_last_two_lingers_carried_a_quarter_batch() {
        assert!(flowing(&[batch(25, 10)], LINGER, 100));
        assert!(flowing(
            &[batch(10, 10), batch(10, 300), batch(5, 600)],
            LINGER,
            100
        ));
        assert!(!flowing(&[batch(24, 10)], LINGER, 100));
        // Older than two lingers: quiet since.
        assert!(!flowing(&[batch(100, 601), batch(100, 5000)], LINGER, 100));
        assert!(!flowing(&[], LINGER, 100));
        // A small batch size: a quarter of it.
        assert!(flowing(&[batch(1, 10)], LINGER, 4));
    }

    #[test]
    fn no_linger_means_never_flowing_and_everything_goes_now() {
        assert!(!flowing(&[batch(100, 0)], Duration::ZERO, 100));
        assert_eq!(
            decide(backlog(30, 0), Duration::ZERO, 100, 200),
            Decision::All
        );
    }

    #[test]
    fn a_lone_change_after_quiet_goes_at_once() {
        let quiet = [batch(80, 2000)];
        assert_eq!(
            for_lane(&quiet, Some(backlog(1, 0)), LINGER, 100, 200),
            Decision::All
        );
        assert_eq!(for_lane(&[], None, LINGER, 100, 200), Decision::All);
    }

    #[test]
    fn a_flowing_lanes_partial_tail_waits_until_its_oldest_row_has_been_due_a_linger() {
        let busy = [batch(90, 100)];
        assert_eq!(
            for_lane(&busy, Some(backlog(30, 100)), LINGER, 100, 200),
            Decision::Tail {
                full: 0,
                wait: ms(200)
            }
        );
        assert_eq!(
            for_lane(&busy, Some(backlog(30, 300)), LINGER, 100, 200),
            Decision::All
        );
        assert_eq!(
            for_lane(&busy, Some(backlog(30, 5000)), LINGER, 100, 200),
            Decision::All
        );
    }

    #[test]
    fn full_batches_go_at_once_and_only_the_tail_past_them_waits() {
        assert_eq!(
            decide(backlog(130, 50), LINGER, 100, 200),
            Decision::Tail {
                full: 100,
                wait: ms(250)
            }
        );
        assert_eq!(decide(backlog(100, 0), LINGER, 100, 200), Decision::All);
        assert_eq!(decide(backlog(8, 0), LINGER, 4, 200), Decision::All);
        assert_eq!(
            decide(backlog(9, 0), LINGER, 4, 200),
            Decision::Tail {
                full: 8,
                wait: LINGER
            }
        );
    }

    #[test]
    fn a_backlog_at_the_cap_is_deep_and_goes_whole() {
        assert_eq!(decide(backlog(200, 0), LINGER, 100, 200), Decision::All);
        // A cap below one batch is read as one batch.
        assert_eq!(
            decide(backlog(50, 0), LINGER, 100, 10),
            Decision::Tail {
                full: 0,
                wait: LINGER
            }
        );
    }

    #[test]
    fn rows_left_after_another_replica_took_the_tail_wait_unless_due_or_a_batch() {
        assert_eq!(left_short(5, ms(20), LINGER, 100), Some(ms(280)));
        assert_eq!(left_short(5, ms(300), LINGER, 100), None);
        assert_eq!(left_short(100, ms(0), LINGER, 100), None);
        assert_eq!(left_short(0, ms(0), LINGER, 100), None);
    }

    #[test]
    fn nothing_due_waits_for_nothing() {
        assert_eq!(decide(backlog(0, 0), LINGER, 100, 200), Decision::All);
    }
}
