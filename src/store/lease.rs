//! Leasing stored batches for a (re)send, once for both engines: retries whose time has come and
//! batches whose owner's lease lapsed (it crashed or hung). A stored batch is read back here
//! ([`leased`]) whichever engine stored it. The statements are the engine's ([`Dialect`]).

use std::time::Duration;

use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use super::dialect::Dialect;
use super::{DueRequest, LeasedBatch, MAX_MESSAGE, StoreError, StoreResult, storable};
use crate::batch::BatchItem;
use crate::model::codes;

/// Leases due stored batches to `req.owner` and reads them back. One that cannot be read back
/// must not stop every lease: it ends at once, its rows `dead` as `corrupt_batch`.
pub(super) async fn lease_due_batches<D: Dialect>(
    db: &D,
    req: &DueRequest<'_>,
) -> StoreResult<Vec<LeasedBatch>> {
    let (batches, corrupt) = readable(db.lease_due(req).await?)?;
    for (batch, reason) in corrupt {
        let message = corrupt_message(batch, &reason);
        db.end_batch_dead(batch, codes::CORRUPT_BATCH, &message)
            .await?;
    }
    Ok(batches)
}

/// A stored batch that could not be read back, and why.
type Unreadable = (Uuid, String);

/// Leased batches as read back, and apart from them those that could not be (`id`, why); any
/// other error fails the whole lease.
fn readable(
    leased: Vec<StoreResult<LeasedBatch>>,
) -> StoreResult<(Vec<LeasedBatch>, Vec<Unreadable>)> {
    let (mut ok, mut corrupt) = (Vec::new(), Vec::new());
    for batch in leased {
        match batch {
            Ok(b) => ok.push(b),
            Err(StoreError::CorruptBatch { batch, reason }) => corrupt.push((batch, reason)),
            Err(e) => return Err(e),
        }
    }
    Ok((ok, corrupt))
}

/// Logs a stored batch that cannot be read back (its items or type are not what this binary
/// wrote) and returns the message its rows carry: it cannot be sent again as stored and whether
/// it was applied is unknown, so its rows go `dead` as `corrupt_batch` for an operator to look
/// at and replay.
fn corrupt_message(batch: Uuid, reason: &str) -> String {
    tracing::error!(batch_id = %batch, reason, "a stored batch cannot be read back: its rows go dead as corrupt_batch");
    storable(
        &format!("its stored batch cannot be read: {reason}"),
        MAX_MESSAGE,
    )
}

/// A leased batch as the engine's lease statement returns it (columns `idempotency_key`,
/// `team_id`, `object_type`, `operation`, `body`, `items`, `attempts`, `key_age`, `answered`,
/// `oldest_row_age`), its id `id` as the engine stores it. A type, operation or item list that
/// this binary cannot have written is [`StoreError::CorruptBatch`].
pub(super) fn leased<R>(row: &R, id: Uuid) -> StoreResult<LeasedBatch>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let corrupt = |reason: String| StoreError::CorruptBatch { batch: id, reason };
    let object_type: String = row.try_get("object_type")?;
    let operation: String = row.try_get("operation")?;
    let items: String = row.try_get("items")?;
    let body: Vec<u8> = row.try_get("body")?;
    Ok(LeasedBatch {
        id,
        idempotency_key: row.try_get("idempotency_key")?,
        team: row.try_get("team_id")?,
        object_type: object_type
            .parse()
            .map_err(|e: crate::model::UnknownObjectType| corrupt(e.to_string()))?,
        operation: operation
            .parse()
            .map_err(|e: crate::model::UnknownOperation| corrupt(e.to_string()))?,
        body: body.into(),
        items: serde_json::from_str::<Vec<BatchItem>>(&items)
            .map_err(|e| corrupt(e.to_string()))?,
        attempts: row.try_get("attempts")?,
        key_age: Duration::from_secs_f64(row.try_get::<f64, _>("key_age")?.clamp(0.0, 1e9)),
        answered: row.try_get("answered")?,
        oldest_row_age: Duration::from_secs_f64(
            row.try_get::<f64, _>("oldest_row_age")?.clamp(0.0, 1e11),
        ),
        leased_at: std::time::Instant::now(),
    })
}
