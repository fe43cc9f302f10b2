//! The operator commands' side of [`Store`]: typed reads and writes over [`super::views`], each
//! written once per engine (`sqlite/ops.rs`, `postgres/ops.rs`). `ops/` holds no SQL.
//!
//! **Architecture invariant: one SQLite writer.** Every operator write on SQLite runs on the
//! store's one writer connection, under its gate, queued with the daemon's claims and outcome
//! writes: [`OpsTx`]'s writes refuse a read transaction, and the pool is only ever read.

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use super::views::{
    AuditEntry, BatchView, Change, DeadCodeCount, NewerRow, OpenBatch, Page, PurgeAudit, PurgeCut,
    RowFilter, RowSummary, RowView, StateCount,
};
use super::{Store, StoreError, StoreResult, postgres, sqlite};
use crate::model::RowState;

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Rows counted by object type, state, team and operation.
    pub async fn count_rows(&self) -> StoreResult<Vec<StateCount>> {
        dispatch!(self, s => s.count_rows().await)
    }

    /// Dead rows by error code, each with one of its messages.
    pub async fn dead_codes(&self) -> StoreResult<Vec<DeadCodeCount>> {
        dispatch!(self, s => s.dead_codes().await)
    }

    /// The oldest `limit` open batches.
    pub async fn open_batches(&self, limit: u32) -> StoreResult<Vec<OpenBatch>> {
        dispatch!(self, s => s.open_batches(limit).await)
    }

    /// Operator actions, newest first: at most `limit`, those older than `before_id` if given.
    pub async fn audit_entries(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> StoreResult<Vec<AuditEntry>> {
        dispatch!(self, s => s.audit_entries(limit, before_id).await)
    }

    /// One outbox row.
    pub async fn row(&self, id: i64) -> StoreResult<Option<RowView>> {
        dispatch!(self, s => s.row(id).await)
    }

    /// One stored batch with its attempts, children and rows.
    pub async fn batch(&self, id: Uuid) -> StoreResult<Option<BatchView>> {
        dispatch!(self, s => s.batch(id).await)
    }

    /// The rows `filter` names, in id order, one page of them.
    pub async fn find_rows(&self, filter: &RowFilter, page: Page) -> StoreResult<Vec<RowSummary>> {
        dispatch!(self, s => s.find_rows(filter, page).await)
    }

    /// Each patch's size in bytes as the daemon's claim will measure it: the length of the patch
    /// column's text. SQLite keeps the text as written; Postgres keeps `jsonb`, whose text differs
    /// from what was written (spaces after `:` and `,`, numbers and keys normalised), so Postgres
    /// itself is asked, without writing anything.
    pub async fn stored_patch_bytes(&self, patches: &[&str]) -> StoreResult<Vec<usize>> {
        match self {
            Store::Sqlite(_) => Ok(patches.iter().map(|p| p.len()).collect()),
            Store::Postgres(s) => s.stored_patch_bytes(patches).await,
        }
    }

    /// Inserts changes in order, in one transaction.
    pub async fn insert_changes(&self, changes: &[Change]) -> StoreResult<()> {
        dispatch!(self, s => s.insert_changes(changes).await)
    }

    /// The database's clock minus `older_than`, in the form the engine stores times.
    pub async fn purge_cutoff(&self, older_than: Duration) -> StoreResult<String> {
        dispatch!(self, s => s.purge_cutoff(older_than).await)
    }

    /// What a purge of `cut` would delete now: rows by state, and finished batches older than
    /// the cutoff that no row would refer to any more.
    pub async fn purge_counts(&self, cut: PurgeCut<'_>) -> StoreResult<(Vec<(String, i64)>, i64)> {
        dispatch!(self, s => s.purge_counts(cut).await)
    }

    /// Up to `limit` ids of rows `cut` names, read now: a hint for
    /// [`Store::delete_finished_rows`], which checks each again.
    pub async fn finished_before(&self, cut: PurgeCut<'_>, limit: i64) -> StoreResult<Vec<i64>> {
        dispatch!(self, s => s.finished_before(cut, limit).await)
    }

    /// Deletes those of `ids` that are still terminal, in `cut`'s states and finished before its
    /// cutoff (checked on the row as the `DELETE` finds it: a row replayed meanwhile stays), in
    /// one transaction with the audit entry. Returns how many went.
    pub async fn delete_finished_rows(
        &self,
        cut: PurgeCut<'_>,
        ids: &[i64],
        audit: &mut PurgeAudit,
    ) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        dispatch!(self, s => s.delete_finished_rows(cut, ids, audit).await)
    }

    /// Deletes up to `limit` finished batches older than `cutoff` that no row refers to, and
    /// their attempts, in one transaction with the audit entry.
    pub async fn delete_orphan_batches(
        &self,
        cutoff: &str,
        limit: i64,
        audit: &mut PurgeAudit,
    ) -> StoreResult<u64> {
        dispatch!(self, s => s.delete_orphan_batches(cutoff, limit, audit).await)
    }

    /// A read transaction for an operator's preview: one consistent view, nothing written.
    pub async fn begin_ops_read(&self) -> StoreResult<OpsTx> {
        Ok(OpsTx(match self {
            Store::Sqlite(s) => Tx::SqliteRead(s.pool().begin().await?),
            Store::Postgres(s) => Tx::Postgres {
                tx: s.begin_read_only().await?,
                write: false,
            },
        }))
    }

    /// A write transaction for an operator's change: on SQLite on the store's one writer
    /// connection, queued with the daemon's writes; on Postgres a pool transaction that holds
    /// the claim gate (no claim runs until it commits; it waits up to 10 s for the claims in
    /// progress, then gives up having changed nothing) and in which the rows read are locked
    /// without waiting (rows others hold are left out).
    pub async fn begin_ops_write(&self) -> StoreResult<OpsTx> {
        Ok(OpsTx(match self {
            Store::Sqlite(s) => Tx::SqliteWrite(s.begin_write().await?),
            Store::Postgres(s) => Tx::Postgres {
                tx: s.begin_ops_write().await?,
                write: true,
            },
        }))
    }
}

/// An operator command's transaction: reads that choose rows and writes that change them,
/// committed together. From [`Store::begin_ops_read`] (writes refused) or
/// [`Store::begin_ops_write`].
pub struct OpsTx(Tx);

enum Tx {
    SqliteRead(sqlx::Transaction<'static, sqlx::Sqlite>),
    SqliteWrite(sqlite::WriteTx),
    Postgres {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        write: bool,
    },
}

/// A write asked of a read transaction: a bug in the caller, refused before any SQL runs.
fn read_only() -> StoreError {
    StoreError::Invalid("an operator's read transaction cannot write".into())
}

impl OpsTx {
    /// The rows `filter` names, in id order. In a write transaction on Postgres each is locked
    /// without waiting: a row someone else holds (being claimed right now) is left out.
    pub async fn select_rows(&mut self, filter: &RowFilter) -> StoreResult<Vec<RowSummary>> {
        match &mut self.0 {
            Tx::SqliteRead(tx) => sqlite::ops::select_rows(tx, filter, Page::default()).await,
            Tx::SqliteWrite(tx) => sqlite::ops::select_rows(tx, filter, Page::default()).await,
            Tx::Postgres { tx, write } => {
                postgres::ops::select_rows(tx, filter, Page::default(), *write).await
            }
        }
    }

    /// The rows of `records` with an id above `after_id` that are not dead, in id order, and the
    /// dead ones the API most likely applied (`unreadable_response`: it answered 2xx, the body
    /// could not be read), which read as `succeeded`. In a write transaction on Postgres they
    /// are locked without waiting (rows in flight are not locked; they read as `in_flight`),
    /// and a row someone else holds reads as `in_flight`: its outcome is not known.
    pub async fn newer_rows(
        &mut self,
        records: &[&str],
        after_id: i64,
    ) -> StoreResult<Vec<NewerRow>> {
        match &mut self.0 {
            Tx::SqliteRead(tx) => sqlite::ops::newer_rows(tx, records, after_id).await,
            Tx::SqliteWrite(tx) => sqlite::ops::newer_rows(tx, records, after_id).await,
            Tx::Postgres { tx, write } => {
                postgres::ops::newer_rows(tx, records, after_id, *write).await
            }
        }
    }

    /// The stored patches of `ids`, as bytes.
    pub async fn patches(&mut self, ids: &[i64]) -> StoreResult<HashMap<i64, Vec<u8>>> {
        match &mut self.0 {
            Tx::SqliteRead(tx) => sqlite::ops::patches(tx, ids).await,
            Tx::SqliteWrite(tx) => sqlite::ops::patches(tx, ids).await,
            Tx::Postgres { tx, .. } => postgres::ops::patches(tx, ids).await,
        }
    }

    /// Puts `as_is` rows, and `rebased` rows with their new patch, back to `pending` (attempts
    /// reset; `retry.give_up_after` counts from their next first attempt), those still in one
    /// of `from`. Returns how many went.
    pub async fn requeue(
        &mut self,
        as_is: &[i64],
        rebased: &[(i64, String)],
        from: &[RowState],
    ) -> StoreResult<u64> {
        match &mut self.0 {
            Tx::SqliteRead(_) | Tx::Postgres { write: false, .. } => Err(read_only()),
            Tx::SqliteWrite(tx) => sqlite::ops::requeue(tx, as_is, rebased, from).await,
            Tx::Postgres { tx, .. } => postgres::ops::requeue(tx, as_is, rebased, from).await,
        }
    }

    /// Ends `ids` `dead` with `code` and `message`, those still in one of `from` (never an
    /// in-flight row: its batch owns it). Returns how many went.
    pub async fn discard(
        &mut self,
        ids: &[i64],
        from: &[RowState],
        code: &str,
        message: &str,
    ) -> StoreResult<u64> {
        match &mut self.0 {
            Tx::SqliteRead(_) | Tx::Postgres { write: false, .. } => Err(read_only()),
            Tx::SqliteWrite(tx) => sqlite::ops::discard(tx, ids, from, code, message).await,
            Tx::Postgres { tx, .. } => postgres::ops::discard(tx, ids, from, code, message).await,
        }
    }

    /// Writes an entry to `prism_audit`; `filter` is JSON text. Returns its id.
    pub async fn audit(
        &mut self,
        actor: &str,
        action: &str,
        filter: &str,
        rows: u64,
    ) -> StoreResult<i64> {
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        match &mut self.0 {
            Tx::SqliteRead(_) | Tx::Postgres { write: false, .. } => Err(read_only()),
            Tx::SqliteWrite(tx) => sqlite::ops::audit(tx, actor, action, filter, rows).await,
            Tx::Postgres { tx, .. } => postgres::ops::audit(tx, actor, action, filter, rows).await,
        }
    }

    pub async fn commit(self) -> StoreResult<()> {
        match self.0 {
            Tx::SqliteRead(tx) => tx.commit().await?,
            Tx::SqliteWrite(tx) => tx.commit().await?,
            Tx::Postgres { tx, .. } => tx.commit().await?,
        }
        Ok(())
    }
}

/// Raw database access for the project's own tests and benchmarks, which set up states and read
/// the tables directly. **Test support only**: production code goes through typed [`Store`]
/// methods, and a write through this pool bypasses SQLite's single writer.
#[doc(hidden)]
pub enum RawPool<'a> {
    Sqlite(&'a sqlx::SqlitePool),
    Postgres(&'a sqlx::PgPool),
}

impl Store {
    /// See [`RawPool`]: for tests and benchmarks only.
    #[doc(hidden)]
    pub fn raw_pool_for_tests(&self) -> RawPool<'_> {
        match self {
            Store::Sqlite(s) => RawPool::Sqlite(s.pool()),
            Store::Postgres(s) => RawPool::Postgres(s.pool()),
        }
    }
}
