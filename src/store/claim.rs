//! The claim, once for both engines: take due rows lane by lane in per-record order, plan their
//! batches, store them leased to the claimer and put their rows in flight, all in one
//! transaction (stored before sent). The statements are the engine's ([`Dialect`]).

use super::dialect::Dialect;
use super::{ClaimOutcome, ClaimRequest, LeasedBatch, StoreResult};
use crate::batch::{self, CandidateRow};

/// Claims due rows, stores their batches and leases them to `req.owner`; malformed rows go dead
/// in the same transaction. Nothing is written when there is nothing to take.
pub(super) async fn claim<D: Dialect>(db: &D, req: &ClaimRequest<'_>) -> StoreResult<ClaimOutcome> {
    let mut tx = db.begin().await?;
    let heads = take_heads(db, &mut tx, req).await?;
    if heads.is_empty() {
        db.rollback(tx).await?;
        return Ok(ClaimOutcome::default());
    }
    let followers = take_followers(db, &mut tx, &heads, req).await?;
    let chains = batch::record_chains(heads, followers);
    let plan = batch::plan_batches(chains, req.limits, req.teams);
    db.insert_batches(&mut tx, &plan.batches, req.owner, req.lease, None)
        .await?;
    db.mark_in_flight(&mut tx, &plan.batches).await?;
    if !plan.dead.is_empty() {
        db.mark_dead(&mut tx, &plan.dead).await?;
    }
    db.commit(tx).await?;
    Ok(ClaimOutcome {
        batches: plan.batches.into_iter().map(LeasedBatch::fresh).collect(),
        dead: plan.dead,
    })
}

/// The claim's heads: one row from each busy lane in turn (`fair_share`), up to the claim's
/// size, with the strays as one more lane when the claim asks for them.
async fn take_heads<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    req: &ClaimRequest<'_>,
) -> StoreResult<Vec<CandidateRow>> {
    // Which of the lanes hold waiting rows at all: one index probe each, one statement.
    let busy = db.busy_lanes(tx, req.lanes).await?;
    let mut per_lane = Vec::with_capacity(busy.len() + 1);
    for lane in &busy {
        per_lane.push(db.lane_heads(tx, lane, req).await?);
    }
    if req.strays {
        // Rows no lane holds (an unknown team or object type): a scan of every waiting row, so
        // the engine asks for it only now and then. They go dead in this claim.
        per_lane.push(db.strays(tx, req).await?);
    }
    Ok(batch::fair_share(per_lane, req.max_records))
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
