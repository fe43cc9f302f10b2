//! The claim, once for both engines: take due rows lane by lane in per-record order, plan their
//! batches, store them leased to the claimer and put their rows in flight, all in one
//! transaction (stored before sent). The statements are the engine's ([`Dialect`]).
//!
//! With a linger (`batch.linger`), a flowing lane's partial tail is left waiting to fill its
//! batch: before any row is locked, the claim reads each busy lane's recent batches and, for
//! flowing lanes, a count of its claimable rows, and [`crate::linger`] decides how many rows
//! each lane gives now.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::dialect::{ClaimSpans, Dialect, StillWaiting};
use super::{ClaimOutcome, ClaimRequest, LeasedBatch, StoreResult};
use crate::batch::{self, CandidateRow};
use crate::linger::{self, Decision};

/// Claims due rows, stores their batches and leases them to `req.owner`; malformed rows go dead
/// in the same transaction. Nothing is written when there is nothing to take. A flowing lane's
/// partial tail waits while `linger` allows (zero: nothing waits).
pub(super) async fn claim<D: Dialect>(
    db: &D,
    req: &ClaimRequest<'_>,
    linger: Duration,
) -> StoreResult<ClaimOutcome> {
    db.settle_floors(req.lanes).await?;
    let mut tx = db.begin_claim().await?;
    // Dropped when this function returns: after the commit or the rollback.
    let spans = db.in_flight_spans().map(ClaimSpans::open);
    let gate = match db.scan_gate() {
        Some(gate) => Some(gate.lock().await),
        None => None,
    };
    let Heads {
        heads,
        lingering,
        waiting,
    } = take_heads(db, &mut tx, req, linger, spans.as_ref()).await?;
    // The followers may wait for a row lock (a record's later row locked elsewhere): not under
    // the gate, which would hold up every other claim of this process behind it.
    drop(gate);
    let (heads, mut unclaimed) = still_waiting(db, &mut tx, heads).await?;
    if heads.is_empty() {
        db.rollback(tx).await?;
        return Ok(ClaimOutcome {
            lingering,
            waiting,
            ..ClaimOutcome::default()
        });
    }
    let followers = take_followers(db, &mut tx, &heads, req).await?;
    let still = waiting_ids(db, &mut tx, &followers).await?;
    if let (Some(unclaimed), Some(still)) = (unclaimed.as_mut(), still.as_ref()) {
        unclaimed.extend(&still.unclaimed);
    }
    let followers = unbroken_followers(followers, still.as_ref().map(|s| &s.waiting));
    // The never-claimed rows with their tries, for their new claim rows: the claim has them
    // already, so `mark_in_flight` need not read each outbox row again.
    let unclaimed: Option<HashMap<i64, i32>> = unclaimed.map(|unclaimed| {
        heads
            .iter()
            .chain(&followers)
            .filter(|r| unclaimed.contains(&r.id))
            .map(|r| (r.id, r.attempts))
            .collect()
    });
    let mut lanes: Vec<(Vec<u8>, Vec<u8>)> = heads
        .iter()
        .map(|h| (h.team_id.clone(), h.object_type.clone()))
        .collect();
    lanes.sort_unstable();
    lanes.dedup();
    let chains = batch::record_chains(heads, followers);
    // Chains past a team's free buffer bytes wait (unlocked at commit) for a later claim.
    let (chains, over_budget) = match req.max_bytes {
        Some(budget) => batch::fit_budget(chains, budget),
        None => (chains, 0),
    };
    let plan = batch::plan_batches(chains, req.limits, req.teams);
    db.insert_batches(&mut tx, &plan.batches, req.owner, req.lease, None)
        .await?;
    db.mark_in_flight(&mut tx, &plan.batches, unclaimed.as_ref())
        .await?;
    if !plan.dead.is_empty() {
        db.mark_dead(&mut tx, &plan.dead).await?;
    }
    db.commit(tx).await?;
    // The next claim's `settle_floors` moves these lanes' floors past what this one took (and
    // past what the claims in flight beside it took, which this one could not see).
    db.claimed_from(&lanes);
    Ok(ClaimOutcome {
        batches: plan.batches.into_iter().map(LeasedBatch::fresh).collect(),
        dead: plan.dead,
        lingering,
        waiting: waiting || over_budget > 0,
    })
}

/// Which of `rows` no other claim took after this claim's statements read them
/// ([`Dialect::still_waiting`]); `None`: all of them.
async fn waiting_ids<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    rows: &[CandidateRow],
) -> StoreResult<Option<StillWaiting>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    db.still_waiting(tx, &ids).await
}

/// `heads` less those another claim took meanwhile, and which of them have no claim row yet
/// (`None`: the engine does not say).
async fn still_waiting<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    heads: Vec<CandidateRow>,
) -> StoreResult<(Vec<CandidateRow>, Option<HashSet<i64>>)> {
    Ok(match waiting_ids(db, tx, &heads).await? {
        None => (heads, None),
        Some(StillWaiting { waiting, unclaimed }) => (
            heads
                .into_iter()
                .filter(|r| waiting.contains(&r.id))
                .collect(),
            Some(unclaimed),
        ),
    })
}

/// The followers that still follow their head without a gap: from a follower that another
/// claim took meanwhile on, none of its record's later followers go either, so that no change
/// of a record goes before an older one.
fn unbroken_followers(
    followers: Vec<CandidateRow>,
    waiting: Option<&HashSet<i64>>,
) -> Vec<CandidateRow> {
    let Some(waiting) = waiting else {
        return followers;
    };
    let mut broken: HashMap<Vec<u8>, i64> = HashMap::new();
    for f in followers.iter().filter(|f| !waiting.contains(&f.id)) {
        let at = broken.entry(f.record_id_raw.clone()).or_insert(f.id);
        *at = (*at).min(f.id);
    }
    followers
        .into_iter()
        .filter(|f| broken.get(&f.record_id_raw).is_none_or(|&at| f.id < at))
        .collect()
}

/// What [`take_heads`] found.
struct Heads {
    heads: Vec<CandidateRow>,
    /// When a lane's tail was left lingering, the soonest it must be looked at again.
    lingering: Option<Duration>,
    /// A lane held a waiting row (see [`ClaimOutcome::waiting`]).
    waiting: bool,
}

/// The claim's heads: one row from each busy lane in turn (`fair_share`), up to the claim's
/// size, with the strays as one more lane when the claim asks for them; and, when a lane's
/// tail was left lingering, the soonest it must be looked at again.
async fn take_heads<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    req: &ClaimRequest<'_>,
    linger: Duration,
    spans: Option<&ClaimSpans>,
) -> StoreResult<Heads> {
    // Which of the lanes hold waiting rows at all: one index probe each, one statement.
    let busy = db.busy_lanes(tx, req.lanes).await?;
    let (takes, mut lingering) = lane_takes(db, tx, &busy, req, linger).await?;
    let mut per_lane = Vec::with_capacity(busy.len() + 1);
    for (lane, t) in busy.iter().zip(takes) {
        if t.take == 0 {
            continue;
        }
        // Replicas that look at a flowing lane's shallow tail at once would split it between
        // them (each locks what the others have not, `SKIP LOCKED`): one takes it, the others
        // leave the lane to it this round (it is being claimed, so nothing is left waiting).
        if t.alone && !db.try_lock_lane(tx, lane).await? {
            continue;
        }
        let lane_req = ClaimRequest {
            max_records: t.take,
            ..*req
        };
        let mut heads = db.lane_heads(tx, lane, &lane_req, spans).await?;
        // The rows past this lane's whole batches (in claim order) would go as a partial
        // request. Two ways they can be young while the look said the tail was due: the tail
        // grew past a batch in the last moments of its linger (its oldest rows fill a whole
        // batch, the newest few would ride alone), or another claimer took the lane's due rows
        // between the look and the lock (`SKIP LOCKED`) and what is left to us came after them.
        // Unless one of them has been due for the linger, they wait (unlocked when this
        // transaction ends) for the next tail.
        let rest = heads.len() % req.limits.batch_size.max(1);
        if t.alone && rest > 0 {
            let ids: Vec<i64> = heads[heads.len() - rest..].iter().map(|h| h.id).collect();
            let oldest = db.oldest_due(tx, &ids).await?;
            if let Some(wait) = linger::left_short(rest, oldest, linger, req.limits.batch_size) {
                lingering = Some(lingering.map_or(wait, |w| w.min(wait)));
                heads.truncate(heads.len() - rest);
            }
        }
        if heads.is_empty() {
            continue;
        }
        per_lane.push(heads);
    }
    if req.strays {
        // Rows no lane holds (an unknown team or object type): a scan of every waiting row, so
        // the engine asks for it only now and then. They go dead in this claim.
        per_lane.push(db.strays(tx, req).await?);
    }
    Ok(Heads {
        heads: batch::fair_share(per_lane, req.max_records),
        lingering,
        waiting: !busy.is_empty(),
    })
}

/// What a claim does with one busy lane.
#[derive(Debug, Clone, Copy)]
struct LaneTake {
    /// Rows it gives this claim at most.
    take: usize,
    /// A flowing lane with a shallow backlog (less than the two batches counted, batches of
    /// more than one row): claimed by one claimer at a time, under the lane's lock, and the
    /// rows past its whole batches wait unless one of them has been due for the linger. (In a
    /// deep backlog, claimed by every claimer at once, they are what the others left: holding
    /// them back there only hands them to another claimer.)
    alone: bool,
}

/// What each of the `busy` lanes gives this claim (`req.max_records` from every lane, and no
/// step of the linger's, without a linger), and the soonest a lingering tail must be looked at
/// again. Reads only: no row is locked for a tail that waits.
async fn lane_takes<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    busy: &[(String, String)],
    req: &ClaimRequest<'_>,
    linger: Duration,
) -> StoreResult<(Vec<LaneTake>, Option<Duration>)> {
    let mut takes = vec![
        LaneTake {
            take: req.max_records,
            alone: false,
        };
        busy.len()
    ];
    if linger.is_zero() || busy.is_empty() {
        return Ok((takes, None));
    }
    let batch_size = req.limits.batch_size.max(1);
    let fills = db.lane_fill(tx, busy, linger::RECENT_BATCHES).await?;
    let flowing: Vec<usize> = fills
        .iter()
        .enumerate()
        .filter(|(_, recent)| linger::flowing(recent, linger, batch_size))
        .map(|(i, _)| i)
        .collect();
    if flowing.is_empty() {
        return Ok((takes, None));
    }
    // Two batches' worth tells a tail from a deep backlog; counting further would cost as much
    // as the claim itself when the outbox is full.
    let cap = (2 * batch_size).min(req.max_records.max(batch_size));
    let lanes: Vec<(String, String)> = flowing.iter().map(|&i| busy[i].clone()).collect();
    let backlogs = db.lane_backlog(tx, &lanes, cap).await?;
    let mut lingering: Option<Duration> = None;
    for (&i, backlog) in flowing.iter().zip(backlogs) {
        // A deep backlog is claimed as without a linger, by every replica at once, and so are
        // batches of one row (nothing to split): only a shallow tail is worth taking alone.
        takes[i].alone = backlog.due < cap && batch_size > 1;
        if let Decision::Tail { full, wait } = linger::decide(backlog, linger, batch_size, cap) {
            takes[i].take = full.min(req.max_records);
            lingering = Some(lingering.map_or(wait, |w| w.min(wait)));
        }
    }
    Ok((takes, lingering))
}

/// The later rows of the heads whose patch may merge with them (`default`-only updates), when
/// the claim coalesces at all.
async fn take_followers<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    heads: &[CandidateRow],
    req: &ClaimRequest<'_>,
) -> StoreResult<Vec<CandidateRow>> {
    if !req.limits.coalesce || req.limits.max_coalesce <= 1 {
        return Ok(Vec::new());
    }
    let wanted: Vec<&CandidateRow> = heads
        .iter()
        .filter(|h| h.has_later && h.may_coalesce())
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    db.followers(tx, &wanted, req).await
}
