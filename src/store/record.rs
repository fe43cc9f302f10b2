//! The outcome write, once for both engines: a group of batch ends committed in one transaction
//! (one fsync for many batches), each batch fenced on its own lease ("set state if running").
//! The statements are the engine's ([`Dialect`]).

use std::collections::HashSet;

use super::dialect::Dialect;
use super::{FinishBatch, StoreResult};

/// Writes `batches` in one transaction; per batch, whether it was still ours (`false`: nothing
/// of it was written).
///
/// A batch ended twice in one group is written in rounds: each round holds the next end of each
/// batch, so a later end meets the fence as the earlier one left it, as when written one after
/// the other.
pub(super) async fn finish_batches<D: Dialect>(
    db: &D,
    batches: &[FinishBatch],
) -> StoreResult<Vec<bool>> {
    let mut tx = db.begin().await?;
    let mut written = vec![false; batches.len()];
    for round in rounds(batches) {
        let ends: Vec<&FinishBatch> = round.iter().map(|&i| &batches[i]).collect();
        for (&i, ok) in round.iter().zip(write_round(db, &mut tx, &ends).await?) {
            written[i] = ok;
        }
    }
    crash_point!("mid_outcomes");
    db.commit(tx).await?;
    Ok(written)
}

/// The group split into rounds of distinct batches (indices into `batches`), in order: the
/// first end of each batch, then the second, …
fn rounds(batches: &[FinishBatch]) -> Vec<Vec<usize>> {
    let mut rounds = Vec::new();
    let mut left: Vec<usize> = (0..batches.len()).collect();
    while !left.is_empty() {
        let mut seen = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) = left
            .into_iter()
            .partition(|&i| seen.insert(batches[i].batch_id));
        rounds.push(round);
        left = later;
    }
    rounds
}

/// The ends of distinct batches, fenced together: which of them are still open and leased to
/// their writer (`false`, and nothing written, for the others). On Postgres each step is one
/// statement whatever the round's size (each statement is a round trip: a group of eight
/// batches written batch by batch took 24).
async fn write_round<D: Dialect>(
    db: &D,
    tx: &mut D::Tx,
    batches: &[&FinishBatch],
) -> StoreResult<Vec<bool>> {
    // In id order, so that two processes fencing overlapping groups (a lease taken over while
    // its first owner was still writing) lock the batch rows in the same order.
    let mut order: Vec<&FinishBatch> = batches.to_vec();
    order.sort_unstable_by_key(|f| f.batch_id);
    let fenced = db.fence(tx, &order).await?;
    let ours: Vec<&FinishBatch> = order
        .into_iter()
        .filter(|f| fenced.contains(&f.batch_id))
        .collect();
    if !ours.is_empty() {
        db.write_attempts(tx, &ours).await?;
        if ours.iter().any(|f| !f.rows.is_empty()) {
            db.write_rows(tx, &ours).await?;
        }
        // A split's children carry its rows from here on, under new keys.
        for f in ours.iter().filter(|f| !f.children.is_empty()) {
            db.insert_batches(tx, &f.children, &f.owner, f.lease, Some(f.batch_id))
                .await?;
            db.mark_in_flight(tx, &f.children, None).await?;
        }
    }
    Ok(batches
        .iter()
        .map(|f| fenced.contains(&f.batch_id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An end of batch `batch` (its rows and outcome do not matter to the rounds).
    fn end_of(batch: u128) -> FinishBatch {
        let fresh = crate::batch::NewBatch {
            id: uuid::Uuid::from_u128(batch),
            idempotency_key: "k".into(),
            team: String::new(),
            object_type: crate::model::ObjectType::Contact,
            operation: crate::model::Operation::Update,
            body: Vec::new(),
            items: Vec::new(),
        };
        FinishBatch::all_succeeded(&super::super::LeasedBatch::fresh(fresh), "me")
    }

    #[test]
    fn a_group_of_distinct_batches_is_written_in_one_round() {
        let group = [end_of(3), end_of(1), end_of(2)];
        assert_eq!(rounds(&group), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn a_batch_ended_twice_has_its_second_end_in_the_next_round_in_group_order() {
        let group = [end_of(1), end_of(1), end_of(0), end_of(1), end_of(0)];
        assert_eq!(rounds(&group), vec![vec![0, 2], vec![1, 4], vec![3]]);
    }

    #[test]
    fn an_empty_group_has_no_rounds() {
        assert!(rounds(&[]).is_empty());
    }
}
