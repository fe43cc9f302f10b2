//! The statements an outbox engine supplies, and nothing else: the claim (`claim.rs`), the
//! outcome write (`record.rs`) and the lease of stored batches (`lease.rs`) are written once over
//! this trait, as River's client holds its algorithms over `riverdriver`. Each engine's file
//! (`sqlite.rs`, `postgres.rs`) implements it with SQL written for that engine.
//!
//! A method is one statement (or, where the engine has no set-valued form of it, the same
//! statement once per batch), so that the algorithms decide what runs and in which order, and the
//! engines only how. Methods that take a transaction run inside it; the others open their own.
//!
//! Adding a database means implementing this trait, not touching the algorithms.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use uuid::Uuid;

use super::{ClaimRequest, DueRequest, FinishBatch, Lane, LeasedBatch, StoreResult};
use crate::batch::{CandidateRow, DeadRow, NewBatch};
use crate::linger::{Backlog, RecentBatch};

/// What [`Dialect::still_waiting`] read afresh of rows a claim has locked.
#[derive(Debug, Default)]
pub(super) struct StillWaiting {
    /// The rows that still wait as the claim read them.
    pub waiting: HashSet<i64>,
    /// Of those, the ones with no claim row (never claimed): [`Dialect::mark_in_flight`]
    /// inserts theirs, and moves the others' (waiting again, or parked) to the new batch.
    pub unclaimed: HashSet<i64>,
}

/// The never-claimed rows that a process's claims in flight have locked, as one id span per
/// claim and lane (Postgres). A claim walks a lane from its floor; the rows another claim of
/// this process has locked there, and not yet committed, look unclaimed to it, so it would
/// test each of them (the guard's probe and the rest) before `SKIP LOCKED` passes it over:
/// with two claims in flight, every claim walked the other's rows too. A claim skips the span
/// of the others' instead (one comparison a row; with more than two claims in flight, the one
/// span from the lowest to the highest of theirs). Rows in a span that its claim did not take
/// are walked again by the first claim that starts once no claim in flight covers them; the
/// floor stays at or below them meanwhile: they are passed over, never lost. (A claim that
/// took rows on both sides of one keeps covering it while it is in flight, and one that waits
/// long for a follower's row lock holds its span as long.)
#[derive(Debug, Default)]
pub(crate) struct InFlightSpans {
    next: u64,
    held: Vec<(u64, (String, String), i64, i64)>,
}

/// One claim's place in [`InFlightSpans`], for as long as it is in flight: dropped (after its
/// commit or rollback, or with the claim), its spans go.
pub(super) struct ClaimSpans {
    all: Arc<Mutex<InFlightSpans>>,
    claim: u64,
}

impl ClaimSpans {
    pub(super) fn open(all: &Arc<Mutex<InFlightSpans>>) -> ClaimSpans {
        let mut spans = all.lock().unwrap_or_else(PoisonError::into_inner);
        spans.next += 1;
        ClaimSpans {
            all: Arc::clone(all),
            claim: spans.next,
        }
    }

    /// The span covering the other claims' spans in `lane`, if any.
    pub(super) fn others(&self, lane: &(String, String)) -> Option<(i64, i64)> {
        let spans = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        spans
            .held
            .iter()
            .filter(|(claim, l, ..)| *claim != self.claim && l == lane)
            .map(|&(_, _, lo, hi)| (lo, hi))
            .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))
    }

    /// This claim has locked never-claimed rows from `lo` to `hi` in `lane`.
    pub(super) fn hold(&self, lane: &(String, String), lo: i64, hi: i64) {
        let mut spans = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        spans.held.push((self.claim, lane.clone(), lo, hi));
    }
}

impl Drop for ClaimSpans {
    fn drop(&mut self) {
        let mut spans = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        spans.held.retain(|(claim, ..)| *claim != self.claim);
    }
}

/// One engine's statements. Private to the store: the engine and the operators see
/// [`super::Store`].
pub(super) trait Dialect: Sync {
    /// A write transaction (on SQLite, the one writer connection under the in-process gate).
    type Tx: Send;

    /// Opens the transaction a group of batch ends is written in (a claim's is
    /// [`Dialect::begin_claim`]).
    async fn begin(&self) -> StoreResult<Self::Tx>;

    /// Opens a claim's transaction. On Postgres the claim also holds the claim gate (shared):
    /// an operator's write transaction (replay, discard) takes it exclusively, so that no claim
    /// reads the outbox from a snapshot taken before the operator's change and locks rows after
    /// it (see `PgStore::begin_claim`).
    async fn begin_claim(&self) -> StoreResult<Self::Tx> {
        self.begin().await
    }
    async fn commit(&self, tx: Self::Tx) -> StoreResult<()>;
    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()>;

    // ── The claim ───────────────────────────────────────────────────────────────────────

    /// Held by one claim of this process at a time while it locks its heads (from the look at
    /// the lanes to the last lane's heads; never over a wait for a row lock), when the engine's transactions can run side by side
    /// (Postgres; SQLite's writes are one at a time already). Two overlapping claims that scan
    /// one lane at once would interleave under `SKIP LOCKED` and cut its rows at random
    /// (100 + 150 due rows claimed as 100 + 100 + 4 and 46); one after the other, the second
    /// starts where the first stopped. Only the scans wait: their writes and commits overlap.
    fn scan_gate(&self) -> Option<&tokio::sync::Mutex<()>>;

    /// Which of `lanes` hold waiting rows at all, as `(team_id, object_type)` as stored.
    async fn busy_lanes(
        &self,
        tx: &mut Self::Tx,
        lanes: &[Lane],
    ) -> StoreResult<Vec<(String, String)>>;

    /// The newest (at most `recent`) batches of each of `lanes`, newest first: what the linger's
    /// flowing test reads (`crate::linger::flowing`). One entry per lane, in `lanes` order.
    async fn lane_fill(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        recent: usize,
    ) -> StoreResult<Vec<Vec<RecentBatch>>>;

    /// A look at each of `lanes`' claimable rows before anything is locked (no row lock, no
    /// write): how many there are, counted up to `cap`, and how long the longest-due of them has
    /// been due. Claimable as in [`Dialect::lane_heads`] (due, below the watermark, no older row
    /// of the record waiting or in flight). One entry per lane, in `lanes` order. A lane may
    /// be reported at `cap` (deep) on a cheaper count that over-counts (the Postgres one counts
    /// rows above the watermark or held by their record too; both counts, as before, count the
    /// rows this process's other claims in flight have locked): a deep lane is claimed at once,
    /// as without a linger, so an over-count only lets a tail go early, never holds rows back.
    async fn lane_backlog(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        cap: usize,
    ) -> StoreResult<Vec<Backlog>>;

    /// Takes the right to claim `lane`'s tail for the rest of this transaction; `false` when
    /// another claim holds it (another replica is taking the same tail at this moment).
    async fn try_lock_lane(&self, tx: &mut Self::Tx, lane: &(String, String)) -> StoreResult<bool>;

    /// How long the longest-due of the rows `ids` (just locked by this claim) has been due.
    async fn oldest_due(&self, tx: &mut Self::Tx, ids: &[i64]) -> StoreResult<Duration>;

    /// One busy lane's claimable rows, oldest first, at most `req.max_records`: due, and no
    /// older row of their record waiting or in flight. With `spans` (engines that keep
    /// [`InFlightSpans`]), it skips the other claims' spans and holds its own.
    async fn lane_heads(
        &self,
        tx: &mut Self::Tx,
        lane: &(String, String),
        req: &ClaimRequest<'_>,
        spans: Option<&ClaimSpans>,
    ) -> StoreResult<Vec<CandidateRow>>;

    /// The spans of this process's claims in flight, where the engine keeps them.
    fn in_flight_spans(&self) -> Option<&Arc<Mutex<InFlightSpans>>> {
        None
    }

    /// Claimable rows that no lane of `req.teams` holds (an unknown team or object type).
    async fn strays(
        &self,
        tx: &mut Self::Tx,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>>;

    /// The waiting rows after each of `heads` in its record, at most `req.limits.max_coalesce
    /// - 1` per head, in id order per record.
    async fn followers(
        &self,
        tx: &mut Self::Tx,
        heads: &[&CandidateRow],
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>>;

    /// Which of `ids` (rows this claim has locked) still wait as this claim read them: none
    /// taken by another claim that committed after this claim's statements read the outbox.
    /// `None`: all of them (an engine whose claims run one at a time). On Postgres a claim
    /// locks an outbox row it does not update, and a lock on a row that was only locked
    /// re-checks nothing: another claim that took the row and committed between this claim's
    /// read and its lock has left only a claim row, which this statement reads afresh.
    async fn still_waiting(
        &self,
        _tx: &mut Self::Tx,
        _ids: &[i64],
    ) -> StoreResult<Option<StillWaiting>> {
        Ok(None)
    }

    /// Before a claim, in a short transaction of its own: moves the floors of the lanes this
    /// process's claims have taken rows from since it last did on past those rows (see
    /// [`Dialect::claimed_from`]), and parks the rows at the floors of `lanes` that an older
    /// change of their record holds back, so that they do not hold the floor (see the Postgres
    /// implementation). Engines without floors do nothing.
    async fn settle_floors(&self, _lanes: &[Lane]) -> StoreResult<()> {
        Ok(())
    }

    /// A claim that took rows from `lanes` (team, object type, as stored) has committed: the
    /// next [`Dialect::settle_floors`] of this process moves their floors on. Only the cost of
    /// later claims depends on it (a floor left behind is walked from); engines without floors
    /// do nothing.
    fn claimed_from(&self, _lanes: &[(Vec<u8>, Vec<u8>)]) {}

    /// Stores `batches` (key, body, items) leased to `owner` for `lease`; `parent` for the
    /// children of a split.
    async fn insert_batches(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        owner: &str,
        lease: Duration,
        parent: Option<Uuid>,
    ) -> StoreResult<()>;

    /// Puts the rows of `batches` in flight in them. `unclaimed`, where the claim knows it
    /// ([`StillWaiting::unclaimed`]): which of them have no claim row yet, each with the tries
    /// its outbox row counts (as the claim read it, under its lock); `None`: any may have one
    /// (a split's rows all have).
    async fn mark_in_flight(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        unclaimed: Option<&HashMap<i64, i32>>,
    ) -> StoreResult<()>;

    /// Ends malformed rows `dead` with their codes.
    async fn mark_dead(&self, tx: &mut Self::Tx, rows: &[DeadRow]) -> StoreResult<()>;

    // ── The outcome write ───────────────────────────────────────────────────────────────

    /// Ends each of `ends` (distinct batches, in id order) whose batch is still `open` and
    /// leased to its writer; returns the ids of those it ended, the others stay untouched.
    async fn fence(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<HashSet<Uuid>>;

    /// One `prism_batch_attempts` row for each of `ends` (all fenced).
    async fn write_attempts(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()>;

    /// Each row's new state after its batch's end (only rows still in flight in that batch);
    /// a row that would retry past its end's `give_up_after` goes `dead` instead.
    async fn write_rows(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()>;

    // ── Leasing stored batches ──────────────────────────────────────────────────────────

    /// Leases the stored batches due for a (re)send and reads them back, each as
    /// [`super::lease::leased`] makes of it (an unreadable one as its error, not the call's).
    async fn lease_due(&self, req: &DueRequest<'_>) -> StoreResult<Vec<StoreResult<LeasedBatch>>>;

    /// Ends one stored batch for good in a transaction of its own: its rows in flight go `dead`
    /// with `code` and `message`, the batch ends `released`.
    async fn end_batch_dead(&self, batch: Uuid, code: &str, message: &str) -> StoreResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(t: &str) -> (String, String) {
        (t.to_owned(), "contact".to_owned())
    }

    #[test]
    fn a_claim_skips_the_spans_of_the_other_claims_in_flight_in_its_lane_until_they_end() {
        let all = Arc::new(Mutex::new(InFlightSpans::default()));
        let first = ClaimSpans::open(&all);
        let second = ClaimSpans::open(&all);
        assert_eq!(second.others(&lane("a")), None);
        first.hold(&lane("a"), 10, 20);
        first.hold(&lane("b"), 1, 5);
        // Its own span is not skipped; another lane's is not either.
        assert_eq!(first.others(&lane("a")), None);
        assert_eq!(second.others(&lane("a")), Some((10, 20)));
        assert_eq!(second.others(&lane("c")), None);
        let third = ClaimSpans::open(&all);
        second.hold(&lane("a"), 30, 40);
        assert_eq!(third.others(&lane("a")), Some((10, 40)));
        // The first claim ends (committed or rolled back): its rows are walked again.
        drop(first);
        assert_eq!(third.others(&lane("a")), Some((30, 40)));
        assert_eq!(third.others(&lane("b")), None);
        drop(second);
        assert_eq!(third.others(&lane("a")), None);
    }
}
