//! What the operator commands read from and hand to the store: typed views of rows, batches,
//! counts and audit entries, and the filters that choose rows. The statements behind them are in
//! `store/sqlite/ops.rs` and `store/postgres/ops.rs`; `ops/` decides, renders and asks.
//!
//! Text an application wrote (record ids, types, teams, patches on SQLite) is read lossily: an
//! operator must be able to see a row whatever bytes it holds.

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{ObjectType, Operation, RowState};

/// Rows counted by (object type, state, team, operation), as stored.
#[derive(Debug, Clone)]
pub struct StateCount {
    pub object_type: String,
    pub state: String,
    /// As stored (`''`: the configured default team).
    pub team_id: String,
    pub operation: String,
    pub rows: i64,
}

/// Dead rows of one error code.
#[derive(Debug, Clone)]
pub struct DeadCodeCount {
    /// `unknown` for a dead row without a code.
    pub code: String,
    pub rows: i64,
    pub sample_message: Option<String>,
}

/// A stored batch that is still `open` (waiting, or leased and on the wire).
#[derive(Debug, Clone, Serialize)]
pub struct OpenBatch {
    pub id: String,
    pub idempotency_key: String,
    /// As the store returns it, the stored `team_id`; `status` shows `default` for `''`.
    pub team: String,
    pub object_type: String,
    pub operation: String,
    pub items: i64,
    pub rows: i64,
    pub attempts: i64,
    pub age_seconds: f64,
    pub lease_owner: Option<String>,
    /// The lease has lapsed (its owner died, or let it go without clearing its name): nobody
    /// is sending it until a replica leases it again.
    pub lease_lapsed: bool,
    pub next_attempt_in_seconds: f64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

/// One operator action in `prism_audit`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    /// The action's filter and notes, as JSON text.
    pub filter: String,
    pub rows: i64,
}

/// One outbox row with everything `inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RowView {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub operation: String,
    /// As stored: empty for the configured default team.
    pub team_id: String,
    pub state: String,
    pub attempts: i64,
    pub enqueued_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub completed_at: Option<String>,
    pub batch_id: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    /// The first 64 KiB of the patch.
    pub patch: Option<String>,
}

/// One HTTP try of a batch.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub attempt: i64,
    pub owner: String,
    pub finished_at: String,
    pub http_status: Option<i64>,
    pub outcome: String,
    pub detail: Option<String>,
    pub replay: bool,
    pub duration_ms: i64,
}

/// One stored batch with its attempts and rows.
#[derive(Debug, Clone, Serialize)]
pub struct BatchView {
    pub id: String,
    pub idempotency_key: String,
    pub object_type: String,
    pub operation: String,
    /// As stored: empty for the configured default team.
    pub team_id: String,
    pub state: String,
    pub attempts: i64,
    pub item_count: i64,
    pub row_count: i64,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<String>,
    pub parent_id: Option<String>,
    pub children: Vec<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    /// The exact request bytes (as JSON when they are, else as text).
    pub body: serde_json::Value,
    pub http_attempts: Vec<AttemptView>,
    pub rows: Vec<RowView>,
}

impl BatchView {
    /// The stored request bytes as `inspect` shows them: JSON when they parse, else as text.
    pub(crate) fn body_value(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
        })
    }

    /// The row ids a batch's stored items name.
    pub(crate) fn row_ids(items_json: &str) -> Vec<i64> {
        let items: Vec<crate::batch::BatchItem> =
            serde_json::from_str(items_json).unwrap_or_default();
        items.iter().flat_map(|i| i.rows.iter().copied()).collect()
    }
}

/// One validated change to insert into the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub record_id: Uuid,
    pub patch: String,
    pub object_type: ObjectType,
    pub operation: Operation,
    /// `''`: the configured default team.
    pub team_id: String,
}

impl Change {
    /// An update of a contact of the default team.
    pub fn update(record_id: Uuid, patch: String) -> Change {
        Change {
            record_id,
            patch,
            object_type: ObjectType::Contact,
            operation: Operation::Update,
            team_id: String::new(),
        }
    }
}

/// Which outbox rows an operator command means. Every criterion given must hold; an empty list
/// or `None` does not restrict.
#[derive(Debug, Clone, Default)]
pub struct RowFilter {
    /// The states to take (empty: any state).
    pub states: Vec<RowState>,
    pub ids: Vec<i64>,
    pub batch: Option<Uuid>,
    pub error_code: Option<String>,
    pub record_id: Option<Uuid>,
    pub object_type: Option<ObjectType>,
    /// `team_id` values as stored (`''` is the default team).
    pub teams: Vec<String>,
    pub operation: Option<Operation>,
    /// Enqueued at or after.
    pub since: Option<OffsetDateTime>,
    /// Enqueued before.
    pub until: Option<OffsetDateTime>,
    /// `last_error_message` contains this text (ASCII letters in any case).
    pub message_contains: Option<String>,
}

/// A page of rows: those with an id above `after_id`, in id order, at most `limit`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Page {
    pub after_id: i64,
    /// `None`: every row.
    pub limit: Option<u64>,
}

/// One outbox row as lists and exports show it (no patch: contact data stays out of them).
#[derive(Debug, Clone, Serialize)]
pub struct RowSummary {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub operation: String,
    /// As stored: empty for the configured default team.
    pub team_id: String,
    pub state: String,
    pub attempts: i64,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub enqueued_at: String,
    pub completed_at: Option<String>,
    pub batch_id: Option<String>,
}

/// A newer, not dead, row of a record that a replay judges against.
#[derive(Debug, Clone)]
pub struct NewerRow {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub team_id: String,
    pub operation: String,
    /// As read; in a write transaction on Postgres, a row someone else holds locked reads as
    /// `in_flight` (its outcome is being written or it is being claimed right now).
    pub state: String,
    /// The stored patch bytes (`None`: unreadable).
    pub patch: Option<Vec<u8>>,
}

/// Terminal rows to purge: those in `states` finished before `cutoff`.
#[derive(Debug, Clone, Copy)]
pub struct PurgeCut<'a> {
    /// `succeeded` and/or `dead`.
    pub states: &'a [&'static str],
    /// In the form the engine stores (SQLite text; an RFC 3339 time on Postgres).
    pub cutoff: &'a str,
}

/// The audit entry of one purge: written with its first deletion, grown with each after.
#[derive(Debug, Clone)]
pub struct PurgeAudit {
    pub actor: String,
    /// The entry, once written.
    pub id: Option<i64>,
    /// JSON text with a `batches` count that grows too.
    pub filter: String,
}
