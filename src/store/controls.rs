//! Operator controls and record history: pauses every replica obeys (`prism_pauses`), batches
//! handed back unsent, one record's timeline, and the API's answers kept for it
//! (`prism_responses`, only while `history.keep_responses` is on). The statements are in
//! `sqlite/controls.rs` and `postgres/controls.rs`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreResult};
use crate::batch::BatchItem;
use crate::model::ObjectType;

/// A paused team (`object_type: None`) or lane, as stored in `prism_pauses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pause {
    /// The team as operators name it: `default` for the configured default team.
    pub team: String,
    /// As stored: `''` for the configured default team.
    #[serde(skip)]
    pub team_id: String,
    /// `None`: every object type of the team.
    pub object_type: Option<String>,
    pub actor: String,
    /// When it was paused (RFC 3339, UTC).
    pub since: String,
}

impl Pause {
    pub(crate) fn from_stored(
        team_id: String,
        object_type: String,
        actor: String,
        since: String,
    ) -> Pause {
        Pause {
            team: crate::ops::team_name(&team_id).to_owned(),
            team_id,
            object_type: (!object_type.is_empty()).then_some(object_type),
            actor,
            since,
        }
    }
}

/// What to pause or resume: a whole team, or one lane of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseTarget {
    /// As stored in the outbox: `''` for the configured default team.
    pub team_id: String,
    pub object_type: Option<ObjectType>,
    /// Other stored spellings of the same team that a resume lifts too: for the default team,
    /// its id (`micro.team_id`), under which a pause from a command line that did not know it
    /// as the default was stored, and which the daemons obey as theirs.
    pub also: Vec<String>,
}

impl PauseTarget {
    /// Every stored `team_id` this target names.
    pub(crate) fn team_ids(&self) -> Vec<&str> {
        std::iter::once(self.team_id.as_str())
            .chain(self.also.iter().map(String::as_str))
            .collect()
    }

    /// `prism_pauses.object_type`: `''` for the whole team.
    pub(crate) fn stored_type(&self) -> &'static str {
        self.object_type.map_or("", ObjectType::as_str)
    }

    /// The audit log's `filter` for a pause or resume of this target.
    pub(crate) fn audit_filter(&self) -> String {
        serde_json::json!({
            "team": crate::ops::team_name(&self.team_id),
            "object_type": self.object_type.map(ObjectType::as_str),
        })
        .to_string()
    }
}

/// What the API returned for one record after an `ok`, to keep (`history.keep_responses`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptResponse {
    pub record_id: Uuid,
    pub batch_id: Uuid,
    /// The outbox rows the item carried.
    pub rows: Vec<i64>,
    /// The `record` JSON as the API sent it; `None` when it sent none or it was too large.
    pub record: Option<String>,
}

/// One record's timeline, oldest change first.
#[derive(Debug, Clone, Serialize)]
pub struct RecordHistory {
    pub record_id: String,
    pub changes: Vec<HistoryChange>,
}

/// One outbox row of the record and everything that carried it.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryChange {
    pub id: i64,
    pub state: String,
    pub object_type: String,
    pub operation: String,
    /// `default` for the configured default team.
    pub team: String,
    pub attempts: i64,
    pub enqueued_at: Option<String>,
    pub completed_at: Option<String>,
    /// The item's last error (the API's code, or prism-sync's own).
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub patch: Option<String>,
    /// Every batch that carried this row, oldest first.
    pub batches: Vec<HistoryBatch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryBatch {
    pub batch_id: String,
    pub idempotency_key: String,
    /// `open`, `done`, `split` or `released`.
    pub state: String,
    pub created_at: Option<String>,
    pub completed_at: Option<String>,
    /// The batch this one was bisected from.
    pub parent_id: Option<String>,
    /// Other records' changes share the batch: how many items it held.
    pub items: usize,
    pub attempts: Vec<HistoryAttempt>,
    /// What the API returned for the record in this batch (kept responses only).
    pub response: Option<StoredResponse>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryAttempt {
    pub attempt: i64,
    /// When the try ended (RFC 3339, UTC).
    pub at: String,
    pub http_status: Option<i64>,
    /// The API replayed its cached answer (`idempotent-replay: true`).
    pub replay: bool,
    pub outcome: String,
    pub detail: Option<String>,
    pub duration_ms: i64,
    pub owner: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredResponse {
    pub stored_at: String,
    /// The record as the API returned it (`null`: none was returned, or it was too large).
    pub record: Option<serde_json::Value>,
}

/// An outbox row of the record, as the engines read it.
#[derive(Debug, Clone)]
pub(crate) struct ChangeRow {
    pub id: i64,
    pub state: String,
    pub object_type: String,
    pub operation: String,
    pub team_id: String,
    pub attempts: i64,
    pub enqueued_at: Option<String>,
    pub completed_at: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub patch: Option<String>,
}

/// A stored batch that may carry the record, as the engines read it.
#[derive(Debug, Clone)]
pub(crate) struct BatchRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub state: String,
    pub created_at: Option<String>,
    pub completed_at: Option<String>,
    pub parent_id: Option<String>,
    pub items: String,
}

/// A kept response as the engines read it: (batch, rows, record, stored at).
pub(crate) type ResponseRow = (Uuid, Vec<i64>, Option<String>, String);

/// The smallest UUIDv7 of `unix_seconds`: batch ids are UUIDv7, so every batch created at or
/// after that time has an id at or above it (in the `uuid` order and in the text order alike),
/// and the primary key bounds the search for a record's batches.
pub(crate) fn first_v7_at(unix_seconds: f64) -> Uuid {
    let ms = (unix_seconds.max(0.0) * 1000.0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Uuid::from_bytes(bytes)
}

/// Batch ids come from the host's clock, enqueue times from the database's: search from this
/// long before the record's first change.
pub(crate) const CLOCK_SLACK: f64 = 3600.0;

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Every pause in force, teams before their lanes. One small read: the engine calls it once
    /// per poll interval, `status` and `top` to show them.
    pub async fn pauses(&self) -> StoreResult<Vec<Pause>> {
        dispatch!(self, s => s.pauses().await)
    }

    /// Pauses a team or lane for every replica and audits it as `actor` (action `pause`), in
    /// one transaction. `false` when it was paused already (nothing changed; still audited).
    pub async fn pause(&self, target: &PauseTarget, actor: &str) -> StoreResult<bool> {
        dispatch!(self, s => s.pause(target, actor).await)
    }

    /// Lifts pauses and audits it as `actor` (action `resume`): a team's resume lifts the team
    /// and each of its lanes, a lane's only that lane. Returns what was lifted.
    pub async fn resume(&self, target: &PauseTarget, actor: &str) -> StoreResult<Vec<Pause>> {
        dispatch!(self, s => s.resume(target, actor).await)
    }

    /// Gives a leased batch back unsent (its team or lane was paused after it was leased): the
    /// lease is dropped and nothing else changes (no attempt counted, same key, same due time),
    /// so any replica may lease it again once the pause is lifted. Fenced on our lease.
    pub async fn hand_back(&self, owner: &str, batch: Uuid) -> StoreResult<bool> {
        dispatch!(self, s => s.hand_back(owner, batch).await)
    }

    /// Keeps what the API returned for records answered `ok` (`history.keep_responses`).
    pub async fn keep_responses(&self, kept: &[KeptResponse]) -> StoreResult<()> {
        if kept.is_empty() {
            return Ok(());
        }
        dispatch!(self, s => s.keep_responses(kept).await)
    }

    /// Deletes kept responses of batches made longer ago than `older_than` (by their UUIDv7
    /// ids, a range of the primary key); returns how many.
    pub async fn purge_responses(&self, older_than: Duration) -> StoreResult<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let before = first_v7_at(now - older_than.as_secs_f64().min(now));
        dispatch!(self, s => s.purge_responses(before).await)
    }

    /// The timeline of `record`: each of its outbox rows in id order, every batch (and key)
    /// that carried it with each HTTP attempt, and the responses kept for it.
    pub async fn record_history(&self, record: Uuid) -> StoreResult<RecordHistory> {
        let (rows, first_enqueued) = dispatch!(self, s => s.history_rows(record).await)?;
        let batches = match first_enqueued {
            Some(t) => {
                let since = first_v7_at(t - CLOCK_SLACK);
                dispatch!(self, s => s.history_batches(record, since).await)?
            }
            None => Vec::new(),
        };
        let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
        let attempts = if ids.is_empty() {
            Vec::new()
        } else {
            dispatch!(self, s => s.history_attempts(&ids).await)?
        };
        let responses = if ids.is_empty() {
            Vec::new()
        } else {
            dispatch!(self, s => s.history_responses(record, &ids).await)?
        };
        Ok(assemble(record, rows, batches, attempts, responses))
    }
}

/// Puts the pieces of a record's history together: each row gets the batches whose items
/// carried it, each batch its attempts and the response kept for the record in it.
fn assemble(
    record: Uuid,
    rows: Vec<ChangeRow>,
    batches: Vec<BatchRow>,
    attempts: Vec<(Uuid, HistoryAttempt)>,
    responses: Vec<ResponseRow>,
) -> RecordHistory {
    let mut attempts_of: HashMap<Uuid, Vec<HistoryAttempt>> = HashMap::new();
    for (batch, a) in attempts {
        attempts_of.entry(batch).or_default().push(a);
    }
    // Row id → the batches (in id order, which is creation order) whose item carried it.
    let mut carried: HashMap<i64, Vec<HistoryBatch>> = HashMap::new();
    for b in &batches {
        // A batch whose items cannot be read is shown by `inspect --batch`; here it carries
        // nothing that can be attributed.
        let Ok(items) = serde_json::from_str::<Vec<BatchItem>>(&b.items) else {
            continue;
        };
        let Some(item) = items.iter().find(|i| i.record_id == record) else {
            continue;
        };
        let response =
            responses
                .iter()
                .find(|(batch, ..)| *batch == b.id)
                .map(|(_, _, rec, at)| StoredResponse {
                    stored_at: at.clone(),
                    record: rec.as_deref().map(|r| {
                        serde_json::from_str(r).unwrap_or(serde_json::Value::String(r.to_owned()))
                    }),
                });
        let view = HistoryBatch {
            batch_id: b.id.to_string(),
            idempotency_key: b.idempotency_key.clone(),
            state: b.state.clone(),
            created_at: b.created_at.clone(),
            completed_at: b.completed_at.clone(),
            parent_id: b.parent_id.clone(),
            items: items.len(),
            attempts: attempts_of.get(&b.id).cloned().unwrap_or_default(),
            response,
        };
        for row in &item.rows {
            carried.entry(*row).or_default().push(view.clone());
        }
    }
    RecordHistory {
        record_id: record.to_string(),
        changes: rows
            .into_iter()
            .map(|r| HistoryChange {
                batches: carried.remove(&r.id).unwrap_or_default(),
                id: r.id,
                state: r.state,
                object_type: r.object_type,
                operation: r.operation,
                team: crate::ops::team_name(&r.team_id).to_owned(),
                attempts: r.attempts,
                enqueued_at: r.enqueued_at,
                completed_at: r.completed_at,
                last_error_code: r.last_error_code,
                last_error_message: r.last_error_message,
                patch: r.patch,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_v7_of_a_time_sorts_below_every_later_batch_id_and_above_earlier_ones() {
        let t = 1_764_700_000.123;
        let bound = first_v7_at(t);
        let later = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_764_700_000,
            124_000_000,
        ));
        let earlier = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_764_699_999,
            0,
        ));
        assert!(bound <= later && later.to_string() >= bound.to_string());
        assert!(earlier < bound && earlier.to_string() < bound.to_string());
    }

    #[test]
    fn a_history_gives_each_row_the_batches_that_carried_it_with_their_attempts() {
        let record = Uuid::new_v4();
        let other = Uuid::new_v4();
        let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
        let items = |rows: &[i64]| {
            serde_json::to_string(&vec![
                BatchItem {
                    record_id: other,
                    rows: vec![99],
                    attempts: 0,
                },
                BatchItem {
                    record_id: record,
                    rows: rows.to_vec(),
                    attempts: 0,
                },
            ])
            .unwrap()
        };
        let batch = |id: Uuid, rows: &[i64]| BatchRow {
            id,
            idempotency_key: format!("k-{id}"),
            state: "done".into(),
            created_at: None,
            completed_at: None,
            parent_id: None,
            items: items(rows),
        };
        let row = |id: i64, state: &str| ChangeRow {
            id,
            state: state.into(),
            object_type: "contact".into(),
            operation: "update".into(),
            team_id: String::new(),
            attempts: 1,
            enqueued_at: None,
            completed_at: None,
            last_error_code: None,
            last_error_message: None,
            patch: None,
        };
        let attempt = |n: i64, status: i64| HistoryAttempt {
            attempt: n,
            at: String::new(),
            http_status: Some(status),
            replay: false,
            outcome: "answered".into(),
            detail: None,
            duration_ms: 1,
            owner: "me".into(),
        };
        let h = assemble(
            record,
            vec![row(1, "succeeded"), row(2, "succeeded"), row(3, "pending")],
            vec![batch(b1, &[1]), batch(b2, &[1, 2])],
            vec![
                (b1, attempt(1, 503)),
                (b2, attempt(1, 200)),
                (b1, attempt(2, 200)),
            ],
            vec![(b2, vec![1, 2], Some(r#"{"id":"x"}"#.into()), "t".into())],
        );
        assert_eq!(h.changes.len(), 3);
        let first: Vec<&str> = h.changes[0]
            .batches
            .iter()
            .map(|b| b.idempotency_key.as_str())
            .collect();
        assert_eq!(first, [format!("k-{b1}"), format!("k-{b2}")]);
        assert_eq!(h.changes[0].batches[0].attempts.len(), 2);
        assert_eq!(h.changes[0].team, "default");
        assert!(h.changes[0].batches[0].response.is_none());
        assert_eq!(
            h.changes[1].batches[0].response.as_ref().unwrap().record,
            Some(serde_json::json!({"id": "x"}))
        );
        assert!(
            h.changes[2].batches.is_empty(),
            "a waiting row has no batch yet"
        );
    }
}
