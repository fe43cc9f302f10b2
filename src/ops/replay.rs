//! `prism-sync replay`: an operator puts `dead` rows (and, if asked, rows waiting to retry) back
//! to `pending`, attempts reset, to travel in new batches under new keys, in their original
//! order. In-flight rows are never touched. Every replay is written to `prism_audit`.
//!
//! Replay never puts a record back to older values: a row whose record has a newer change that
//! already succeeded is rebased or left dead as superseded ([`super::supersede`]).

use std::collections::HashMap;

use futures_util::TryStreamExt;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::status::AnyRow;
use super::supersede::{self, NewerChange, Verdict};
use crate::model::{ObjectType, Operation};
use crate::store::{OpsTx, Store, StoreError, StoreKind};

/// Which rows to replay. At least one criterion (or `all`) is required.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayFilter {
    pub ids: Vec<i64>,
    pub batch: Option<Uuid>,
    pub error_code: Option<String>,
    pub record_id: Option<Uuid>,
    pub object_type: Option<ObjectType>,
    /// `team_id` values as stored (`''` is the default team); empty: any team.
    pub teams: Vec<String>,
    pub operation: Option<Operation>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    pub include_retrying: bool,
    pub all: bool,
}

impl ReplayFilter {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.batch.is_none()
            && self.error_code.is_none()
            && self.record_id.is_none()
            && self.object_type.is_none()
            && self.teams.is_empty()
            && self.operation.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && !self.all
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "choose the rows to replay: --id, --batch, --error-code, --record-id, --object-type, --team, --operation, --since/--until, or --all"
    )]
    NoFilter,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReplayError {
    fn from(e: sqlx::Error) -> Self {
        ReplayError::Store(e.into())
    }
}

const WHERE_SQLITE: &str = " WHERE (state = 'dead' OR (?1 AND state = 'retrying'))
    AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))
    AND (?3 IS NULL OR batch_id = ?3)
    AND (?4 IS NULL OR last_error_code = ?4)
    AND (?5 IS NULL OR lower(record_id) = ?5)
    AND (?6 IS NULL OR object_type = ?6)
    AND (?7 IS NULL OR enqueued_at >= ?7)
    AND (?8 IS NULL OR enqueued_at < ?8)
    AND (?9 IS NULL OR team_id IN (SELECT value FROM json_each(?9)))
    AND (?10 IS NULL OR operation = ?10)";

const WHERE_PG: &str = " WHERE (state = 'dead' OR ($1 AND state = 'retrying'))
    AND ($2::bigint[] IS NULL OR id = ANY($2))
    AND ($3::uuid IS NULL OR batch_id = $3)
    AND ($4::text IS NULL OR last_error_code = $4)
    AND ($5::uuid IS NULL OR record_id = $5)
    AND ($6::text IS NULL OR object_type = $6)
    AND ($7::timestamptz IS NULL OR enqueued_at >= $7)
    AND ($8::timestamptz IS NULL OR enqueued_at < $8)
    AND ($9::text[] IS NULL OR team_id = ANY($9))
    AND ($10::text IS NULL OR operation = $10)";

macro_rules! bind_filter {
    (sqlite, $q:expr, $f:expr) => {
        $q.bind($f.include_retrying)
            .bind((!$f.ids.is_empty()).then(|| serde_json::to_string(&$f.ids).expect("serialises")))
            .bind($f.batch.map(|b| b.to_string()))
            .bind($f.error_code.clone())
            .bind($f.record_id.map(|r| r.to_string()))
            .bind($f.object_type.map(|t| t.as_str()))
            .bind($f.since.map(super::sqlite_time))
            .bind($f.until.map(super::sqlite_time))
            .bind(
                (!$f.teams.is_empty())
                    .then(|| serde_json::to_string(&$f.teams).expect("serialises")),
            )
            .bind($f.operation.map(|o| o.as_str()))
    };
    (pg, $q:expr, $f:expr) => {
        $q.bind($f.include_retrying)
            .bind((!$f.ids.is_empty()).then(|| $f.ids.clone()))
            .bind($f.batch)
            .bind($f.error_code.clone())
            .bind($f.record_id)
            .bind($f.object_type.map(|t| t.as_str()))
            .bind($f.since)
            .bind($f.until)
            .bind((!$f.teams.is_empty()).then(|| $f.teams.clone()))
            .bind($f.operation.map(|o| o.as_str()))
    };
}

/// One selected row, as the preview lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub state: String,
    pub attempts: i64,
    pub last_error_code: Option<String>,
    pub enqueued_at: String,
    /// `as is`, `rebased` or `superseded` (left dead).
    pub replay_as: &'static str,
}

/// A row replayed without the `default` keys newer applied changes set.
#[derive(Debug, Clone, Serialize)]
pub struct Rebased {
    pub id: i64,
    pub record_id: String,
    pub dropped_keys: Vec<String>,
    /// The newer rows, already succeeded, that set them.
    pub newer_rows: Vec<i64>,
    /// What is stored and sent instead (contact data: kept out of the preview).
    #[serde(skip)]
    pub patch: Map<String, Value>,
    /// The patch before the rebase, kept in the audit entry.
    #[serde(skip)]
    pub original_patch: Value,
}

/// A row left `dead` because replaying it would put its record back to older values.
#[derive(Debug, Clone, Serialize)]
pub struct Superseded {
    pub id: i64,
    pub record_id: String,
    pub reason: String,
}

/// What a replay of the selected rows does, row by row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayPlan {
    /// Rows that go back to `pending` as they are.
    pub as_is: u64,
    pub rebased: Vec<Rebased>,
    pub superseded: Vec<Superseded>,
    /// The first selected rows, for the preview.
    pub sample: Vec<Candidate>,
    #[serde(skip)]
    as_is_ids: Vec<i64>,
    /// Every selected row.
    pub selected: u64,
}

impl ReplayPlan {
    /// Rows that go back to `pending` (as they are or rebased).
    pub fn to_requeue(&self) -> u64 {
        self.as_is + self.rebased.len() as u64
    }
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    /// Rows back to `pending` (rows claimed by a daemon meanwhile are left alone).
    pub replayed: u64,
    #[serde(flatten)]
    pub plan: ReplayPlan,
}

/// The audit entry's `filter`: the filter, and what the replay rebased (with each original
/// patch, the one place it is kept) or left dead.
#[derive(Serialize)]
struct AuditNote<'a> {
    #[serde(flatten)]
    filter: &'a ReplayFilter,
    rebased: Vec<AuditRebase<'a>>,
    superseded: &'a [Superseded],
}

#[derive(Serialize)]
struct AuditRebase<'a> {
    id: i64,
    dropped_keys: &'a [String],
    newer_rows: &'a [i64],
    original_patch: &'a Value,
}

/// A selected row, as the plan needs it.
struct Selected {
    id: i64,
    lane: RecordLane,
    operation: String,
}

/// One record in one lane: changes of a record are ordered within (team, object type). The
/// record id is compared as stored, exactly as the claim's order guard compares it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RecordLane {
    record_id: String,
    object_type: String,
    team: String,
}

/// The newer, not dead, rows of each selected record, in id order.
type NewerRows = HashMap<RecordLane, Vec<NewerChange>>;

/// What a replay of the filter's rows would do now, the first `limit` of them listed.
pub async fn preview(
    store: &Store,
    f: &ReplayFilter,
    limit: usize,
) -> Result<ReplayPlan, ReplayError> {
    if f.is_empty() {
        return Err(ReplayError::NoFilter);
    }
    // A read transaction: one consistent view of the rows and their records' newer changes.
    match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => plan_sqlite(&mut *pool.begin().await?, f, limit).await,
        StoreKind::Postgres(pool) => {
            let mut tx = pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            plan_pg(&mut tx, f, limit, false).await
        }
    }
}

/// Requeues the selected rows (rebased where newer changes of their records applied, superseded
/// ones left dead) and writes the audit entry, in one transaction. Returns how many rows went
/// back to pending.
pub async fn apply(store: &Store, f: &ReplayFilter, actor: &str) -> Result<u64, ReplayError> {
    Ok(replay(store, f, actor, 0).await?.replayed)
}

/// [`apply`], with the plan it carried out (`limit` rows listed in its sample).
pub async fn replay(
    store: &Store,
    f: &ReplayFilter,
    actor: &str,
    limit: usize,
) -> Result<ReplayOutcome, ReplayError> {
    if f.is_empty() {
        return Err(ReplayError::NoFilter);
    }
    // The plan is made inside the write transaction: on SQLite under the write lock, on
    // Postgres with the selected rows and their records' newer rows locked (rows others hold
    // are left out or count as in flight), so no claim or outcome write changes them between
    // the judgement and the update.
    let mut tx = store.begin_ops_write().await?;
    let (replayed, plan) = match &mut tx {
        OpsTx::Sqlite(tx) => {
            let plan = plan_sqlite(tx, f, limit).await?;
            (requeue_sqlite(tx, f, &plan, actor).await?, plan)
        }
        OpsTx::Postgres(tx) => {
            let plan = plan_pg(tx, f, limit, true).await?;
            (requeue_pg(tx, f, &plan, actor).await?, plan)
        }
    };
    tx.commit().await?;
    Ok(ReplayOutcome { replayed, plan })
}

async fn plan_sqlite(
    c: &mut SqliteConnection,
    f: &ReplayFilter,
    limit: usize,
) -> Result<ReplayPlan, ReplayError> {
    let mut selected = Vec::new();
    let mut sample = Vec::new();
    {
        let mut rows = bind_filter!(
            sqlite,
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), state, attempts,
                        last_error_code, enqueued_at, CAST(team_id AS BLOB), CAST(operation AS BLOB)
                 FROM prism_outbox{WHERE_SQLITE} ORDER BY id"
            ))),
            f
        )
        .fetch(&mut *c);
        while let Some(row) = rows.try_next().await? {
            take_selected(&AnyRow::Sqlite(row), limit, &mut selected, &mut sample)?;
        }
    }
    let Some(oldest) = selected.first().map(|s| s.id) else {
        return Ok(ReplayPlan::default());
    };
    let records: Vec<&str> = selected.iter().map(|s| s.lane.record_id.as_str()).collect();
    let newer = sqlx::query(
        "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), CAST(team_id AS BLOB),
                CAST(operation AS BLOB), state, CAST(patch AS BLOB)
         FROM prism_outbox
         WHERE record_id IN (SELECT value FROM json_each(?1)) AND id > ?2 AND state <> 'dead'
         ORDER BY id",
    )
    .bind(serde_json::to_string(&records).expect("serialises"))
    .bind(oldest)
    .fetch_all(&mut *c)
    .await?;
    let newer = newer_rows(newer.into_iter().map(AnyRow::Sqlite))?;
    let contested = contested(&selected, &newer);
    let patches = sqlx::query(
        "SELECT id, CAST(patch AS BLOB) FROM prism_outbox WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(serde_json::to_string(&contested).expect("serialises"))
    .fetch_all(&mut *c)
    .await?;
    let patches = id_patches(patches.into_iter().map(AnyRow::Sqlite))?;
    Ok(decide(selected, sample, &newer, &patches))
}

async fn plan_pg(
    c: &mut PgConnection,
    f: &ReplayFilter,
    limit: usize,
    lock: bool,
) -> Result<ReplayPlan, ReplayError> {
    // Never waits for a row lock: a claim holds its heads while it waits for their followers'
    // locks, so waiting here could deadlock with it. A selected row someone holds is being
    // claimed right now (it is about to be in flight): it is not replayed.
    let skip_locked = if lock { " FOR UPDATE SKIP LOCKED" } else { "" };
    let mut selected = Vec::new();
    let mut sample = Vec::new();
    {
        let mut rows = bind_filter!(
            pg,
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, record_id::text, object_type, state, attempts::bigint, last_error_code,
                        enqueued_at::text, team_id, operation
                 FROM prism_outbox{WHERE_PG} ORDER BY id{skip_locked}"
            ))),
            f
        )
        .fetch(&mut *c);
        while let Some(row) = rows.try_next().await? {
            take_selected(&AnyRow::Postgres(row), limit, &mut selected, &mut sample)?;
        }
    }
    let Some(oldest) = selected.first().map(|s| s.id) else {
        return Ok(ReplayPlan::default());
    };
    let records: Vec<&str> = selected.iter().map(|s| s.lane.record_id.as_str()).collect();
    let newer = sqlx::query(
        "SELECT id, record_id::text, object_type, team_id, operation, state, patch::text
         FROM prism_outbox
         WHERE record_id = ANY($1::text[]::uuid[]) AND id > $2 AND state <> 'dead'
         ORDER BY id",
    )
    .bind(&records)
    .bind(oldest)
    .fetch_all(&mut *c)
    .await?;
    let mut newer = newer_rows(newer.into_iter().map(AnyRow::Postgres))?;
    if lock {
        lock_newer(c, &mut newer).await?;
    }
    let contested = contested(&selected, &newer);
    let patches = sqlx::query("SELECT id, patch::text FROM prism_outbox WHERE id = ANY($1)")
        .bind(&contested)
        .fetch_all(&mut *c)
        .await?;
    let patches = id_patches(patches.into_iter().map(AnyRow::Postgres))?;
    Ok(decide(selected, sample, &newer, &patches))
}

/// Locks the records' newer rows, without waiting, and reads their state again as locked: a
/// claim skips them (SKIP LOCKED) until this transaction ends, and by then the replayed rows
/// hold them back. A row someone else holds is being claimed or its outcome written right now
/// (or it is gone): its outcome is not known, so it counts as in flight.
async fn lock_newer(c: &mut PgConnection, newer: &mut NewerRows) -> Result<(), sqlx::Error> {
    let ids: Vec<i64> = newer.values().flatten().map(|n| n.id).collect();
    let locked: HashMap<i64, String> = sqlx::query_as(
        "SELECT id, state FROM prism_outbox WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
    )
    .bind(&ids)
    .fetch_all(&mut *c)
    .await?
    .into_iter()
    .collect();
    for n in newer.values_mut().flatten() {
        n.state = locked
            .get(&n.id)
            .cloned()
            .unwrap_or_else(|| "in_flight".into());
    }
    Ok(())
}

/// Reads one selected row (`id, record, type, state, attempts, code, enqueued, team, operation`).
fn take_selected(
    r: &AnyRow,
    limit: usize,
    selected: &mut Vec<Selected>,
    sample: &mut Vec<Candidate>,
) -> Result<(), sqlx::Error> {
    let s = Selected {
        id: r.int(0)?.unwrap_or(0),
        lane: RecordLane {
            record_id: r.lossy(1)?.unwrap_or_default(),
            object_type: r.lossy(2)?.unwrap_or_default(),
            team: r.lossy(7)?.unwrap_or_default(),
        },
        operation: r.lossy(8)?.unwrap_or_default(),
    };
    if sample.len() < limit {
        sample.push(Candidate {
            id: s.id,
            record_id: s.lane.record_id.clone(),
            object_type: s.lane.object_type.clone(),
            state: r.text(3)?.unwrap_or_default(),
            attempts: r.int(4)?.unwrap_or(0),
            last_error_code: r.text(5)?,
            enqueued_at: r.text(6)?.unwrap_or_default(),
            replay_as: "as is",
        });
    }
    selected.push(s);
    Ok(())
}

/// Reads `id, record, type, team, operation, state, patch` rows into per-record lists.
fn newer_rows(rows: impl Iterator<Item = AnyRow>) -> Result<NewerRows, sqlx::Error> {
    let mut newer = NewerRows::new();
    for r in rows {
        let lane = RecordLane {
            record_id: r.lossy(1)?.unwrap_or_default(),
            object_type: r.lossy(2)?.unwrap_or_default(),
            team: r.lossy(3)?.unwrap_or_default(),
        };
        newer.entry(lane).or_default().push(NewerChange {
            id: r.int(0)?.unwrap_or(0),
            operation: r.lossy(4)?.unwrap_or_default(),
            state: r.text(5)?.unwrap_or_default(),
            patch: patch_bytes(&r, 6)?,
        });
    }
    Ok(newer)
}

fn id_patches(rows: impl Iterator<Item = AnyRow>) -> Result<HashMap<i64, Vec<u8>>, sqlx::Error> {
    let mut patches = HashMap::new();
    for r in rows {
        if let (Some(id), Some(patch)) = (r.int(0)?, patch_bytes(&r, 1)?) {
            patches.insert(id, patch);
        }
    }
    Ok(patches)
}

/// A stored patch as bytes (SQLite keeps whatever an application wrote).
fn patch_bytes(r: &AnyRow, i: usize) -> Result<Option<Vec<u8>>, sqlx::Error> {
    match r {
        AnyRow::Sqlite(r) => r.try_get(i),
        AnyRow::Postgres(r) => Ok(r.try_get::<Option<String>, _>(i)?.map(String::into_bytes)),
    }
}

/// The newer rows of `s`'s record that are not dead.
fn newer_than<'n>(s: &Selected, newer: &'n NewerRows) -> &'n [NewerChange] {
    let all = newer.get(&s.lane).map(Vec::as_slice).unwrap_or_default();
    let first = all.partition_point(|n| n.id <= s.id);
    &all[first..]
}

/// The selected rows whose record has a newer change applied or in flight: only their patches
/// are needed (the rest go as they are).
fn contested(selected: &[Selected], newer: &NewerRows) -> Vec<i64> {
    selected
        .iter()
        .filter(|s| {
            newer_than(s, newer)
                .iter()
                .any(|n| n.state == "succeeded" || n.state == "in_flight")
        })
        .map(|s| s.id)
        .collect()
}

fn decide(
    selected: Vec<Selected>,
    mut sample: Vec<Candidate>,
    newer: &NewerRows,
    patches: &HashMap<i64, Vec<u8>>,
) -> ReplayPlan {
    let mut plan = ReplayPlan {
        selected: selected.len() as u64,
        ..ReplayPlan::default()
    };
    for s in selected {
        let patch = patches.get(&s.id).map(Vec::as_slice);
        let verdict = match patch {
            None => Verdict::AsIs,
            Some(patch) => supersede::judge(&s.operation, patch, newer_than(&s, newer)),
        };
        let label = match verdict {
            Verdict::AsIs => {
                plan.as_is_ids.push(s.id);
                "as is"
            }
            Verdict::Rebased {
                patch: rebased,
                dropped_keys,
                newer_rows,
            } => {
                plan.rebased.push(Rebased {
                    id: s.id,
                    record_id: s.lane.record_id,
                    dropped_keys,
                    newer_rows,
                    patch: rebased,
                    original_patch: patch
                        .and_then(|p| serde_json::from_slice(p).ok())
                        .unwrap_or_default(),
                });
                "rebased"
            }
            Verdict::Superseded { reason } => {
                plan.superseded.push(Superseded {
                    id: s.id,
                    record_id: s.lane.record_id,
                    reason,
                });
                "superseded"
            }
        };
        if let Some(c) = sample.iter_mut().find(|c| c.id == s.id) {
            c.replay_as = label;
        }
    }
    plan.as_is = plan.as_is_ids.len() as u64;
    plan.sample = sample;
    plan
}

/// The `dead` (or, if asked, `retrying`) rows of the plan back to pending, the rebased ones
/// with their new patch; then the audit entry. Rows that left those states meanwhile are kept.
async fn requeue_sqlite(
    c: &mut SqliteConnection,
    f: &ReplayFilter,
    plan: &ReplayPlan,
    actor: &str,
) -> Result<u64, ReplayError> {
    // A replayed row starts afresh: no attempts, and retry.give_up_after counts from its next
    // first attempt.
    const REQUEUE: &str = "UPDATE prism_outbox SET state = 'pending', attempts = 0,
           next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), completed_at = NULL,
           first_attempt_at = NULL";
    const STILL: &str = "(state = 'dead' OR (?2 AND state = 'retrying'))";
    let mut changed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{REQUEUE} WHERE id IN (SELECT value FROM json_each(?1)) AND {STILL}"
    )))
    .bind(serde_json::to_string(&plan.as_is_ids).expect("serialises"))
    .bind(f.include_retrying)
    .execute(&mut *c)
    .await?
    .rows_affected();
    for r in &plan.rebased {
        changed += sqlx::query(sqlx::AssertSqlSafe(format!(
            "{REQUEUE}, patch = ?3 WHERE id = ?1 AND {STILL}"
        )))
        .bind(r.id)
        .bind(f.include_retrying)
        .bind(serde_json::to_string(&r.patch).expect("serialises"))
        .execute(&mut *c)
        .await?
        .rows_affected();
    }
    sqlx::query(
        "INSERT INTO prism_audit (actor, action, filter, rows) VALUES (?1, 'replay', ?2, ?3)",
    )
    .bind(actor)
    .bind(audit_note(f, plan))
    .bind(i64::try_from(changed).unwrap_or(i64::MAX))
    .execute(&mut *c)
    .await?;
    Ok(changed)
}

async fn requeue_pg(
    c: &mut PgConnection,
    f: &ReplayFilter,
    plan: &ReplayPlan,
    actor: &str,
) -> Result<u64, ReplayError> {
    const REQUEUE: &str = "UPDATE prism_outbox SET state = 'pending', attempts = 0,
           next_attempt_at = now(), completed_at = NULL, first_attempt_at = NULL";
    const STILL: &str = "(state = 'dead' OR ($2 AND state = 'retrying'))";
    let mut changed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{REQUEUE} WHERE id = ANY($1) AND {STILL}"
    )))
    .bind(&plan.as_is_ids)
    .bind(f.include_retrying)
    .execute(&mut *c)
    .await?
    .rows_affected();
    for r in &plan.rebased {
        changed += sqlx::query(sqlx::AssertSqlSafe(format!(
            "{REQUEUE}, patch = $3::jsonb WHERE id = $1 AND {STILL}"
        )))
        .bind(r.id)
        .bind(f.include_retrying)
        .bind(serde_json::to_string(&r.patch).expect("serialises"))
        .execute(&mut *c)
        .await?
        .rows_affected();
    }
    sqlx::query(
        "INSERT INTO prism_audit (actor, action, filter, rows) VALUES ($1, 'replay', $2::jsonb, $3)",
    )
    .bind(actor)
    .bind(audit_note(f, plan))
    .bind(i64::try_from(changed).unwrap_or(i64::MAX))
    .execute(&mut *c)
    .await?;
    Ok(changed)
}

fn audit_note(f: &ReplayFilter, plan: &ReplayPlan) -> String {
    let note = AuditNote {
        filter: f,
        rebased: plan
            .rebased
            .iter()
            .map(|r| AuditRebase {
                id: r.id,
                dropped_keys: &r.dropped_keys,
                newer_rows: &r.newer_rows,
                original_patch: &r.original_patch,
            })
            .collect(),
        superseded: &plan.superseded,
    };
    serde_json::to_string(&note).expect("serialises")
}

/// How many rebased and superseded rows the preview and the outcome name one by one.
const EXAMPLES: usize = 5;

pub fn render_preview(plan: &ReplayPlan, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} row(s) would go back to pending (attempts reset, new batches, new keys): {} as they are, {} rebased; {} left dead as superseded:",
        plan.to_requeue(),
        plan.as_is,
        plan.rebased.len(),
        plan.superseded.len()
    )?;
    let table: Vec<Vec<String>> = plan
        .sample
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.object_type.clone(),
                c.record_id.clone(),
                c.state.clone(),
                c.attempts.to_string(),
                c.last_error_code.clone().unwrap_or_default(),
                c.enqueued_at.clone(),
                c.replay_as.to_owned(),
            ]
        })
        .collect();
    super::table(
        out,
        &[
            "row",
            "type",
            "record",
            "state",
            "attempts",
            "last error",
            "enqueued",
            "replay",
        ],
        &table,
    )?;
    if plan.selected > plan.sample.len() as u64 {
        writeln!(
            out,
            "  … and {} more",
            plan.selected - plan.sample.len() as u64
        )?;
    }
    render_rebased_and_superseded(plan, out)
}

/// Names a few rebased rows (which keys newer changes set) and superseded ones (why).
fn render_rebased_and_superseded(
    plan: &ReplayPlan,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    if !plan.rebased.is_empty() {
        writeln!(
            out,
            "rebased (newer changes of the record already set these keys; the rest is sent, the original patch is kept in the audit log):"
        )?;
        for r in plan.rebased.iter().take(EXAMPLES) {
            let by: Vec<String> = r.newer_rows.iter().map(i64::to_string).collect();
            writeln!(
                out,
                "  row {} ({}): drops default.{} (set by row {})",
                r.id,
                r.record_id,
                r.dropped_keys.join(", default."),
                by.join(", ")
            )?;
        }
        more(plan.rebased.len(), out)?;
    }
    if !plan.superseded.is_empty() {
        writeln!(
            out,
            "left dead as superseded (replaying them would put their record back to older values):"
        )?;
        for s in plan.superseded.iter().take(EXAMPLES) {
            writeln!(out, "  row {} ({}): {}", s.id, s.record_id, s.reason)?;
        }
        more(plan.superseded.len(), out)?;
    }
    Ok(())
}

fn more(total: usize, out: &mut impl std::io::Write) -> std::io::Result<()> {
    if total > EXAMPLES {
        writeln!(out, "  … and {} more", total - EXAMPLES)?;
    }
    Ok(())
}

/// How `prism-sync replay` runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub dry_run: bool,
    pub yes: bool,
    pub json: bool,
    pub actor: String,
}

/// `prism-sync replay`: preview, confirmation, replay. With `--json`, stdout carries one JSON
/// object and nothing else: the human preview and the question go to `notes` (stderr).
/// Returns the exit code: 0 done (or nothing to do), 1 not confirmed.
pub async fn command(
    store: &Store,
    f: &ReplayFilter,
    o: &ReplayOptions,
    out: &mut impl std::io::Write,
    notes: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, ReplayCommandError> {
    let plan = preview(store, f, 20).await?;
    if o.dry_run && o.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"would_replay": plan.to_requeue(), "plan": plan})
        )?;
        return Ok(0);
    }
    let mut shown: &mut dyn std::io::Write = if o.json { &mut *notes } else { &mut *out };
    render_preview(&plan, &mut shown)?;
    if o.dry_run {
        writeln!(shown, "dry run: nothing changed")?;
        return Ok(0);
    }
    if plan.to_requeue() == 0 {
        writeln!(shown, "nothing to replay")?;
        if o.json {
            writeln!(out, "{}", serde_json::json!({"replayed": 0, "plan": plan}))?;
        }
        return Ok(0);
    }
    let question = format!("Replay these {} row(s)?", plan.to_requeue());
    if !o.yes && !super::confirm(&question, &mut shown, input)? {
        writeln!(shown, "not confirmed: nothing changed")?;
        return Ok(1);
    }
    let done = replay(store, f, &o.actor, 0).await?;
    if o.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "replayed": done.replayed,
                "as_is": done.plan.as_is,
                "rebased": done.plan.rebased,
                "superseded": done.plan.superseded,
                "actor": o.actor,
            })
        )?;
    } else {
        writeln!(
            out,
            "replayed {} row(s) as {} ({} as they were, {} rebased); they go out in new batches under new keys",
            done.replayed,
            o.actor,
            done.plan.as_is,
            done.plan.rebased.len()
        )?;
        if !done.plan.superseded.is_empty() {
            writeln!(
                out,
                "{} row(s) left dead as superseded",
                done.plan.superseded.len()
            )?;
        }
        render_rebased_and_superseded(&done.plan, out)?;
    }
    Ok(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayCommandError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}
