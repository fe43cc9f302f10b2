//! `prism-sync status`: what is pending, stuck, in flight and dead, and why.
//!
//! Exit codes (for scripts and cron checks): 0 healthy; 3 dead rows exist; 4 something is stuck
//! (oldest unfinished row older than `--stuck-after`, or a batch key older than 20h); 1 error;
//! 2 bad usage. "Stuck" wins over "dead".

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use super::{human_age, table};
use crate::model::RowState;
use crate::store::{Store, StoreError, StoreKind};

pub const EXIT_DEAD: u8 = 3;
pub const EXIT_STUCK: u8 = 4;
/// A batch key this old is within four hours of the server's 24 h idempotency window.
const KEY_AGE_STUCK_SECONDS: f64 = 20.0 * 3600.0;

#[derive(Debug, Clone, Serialize)]
pub struct InFlightBatch {
    pub id: String,
    pub idempotency_key: String,
    /// `default` for the configured default team.
    pub team: String,
    pub object_type: String,
    pub operation: String,
    pub items: i64,
    pub rows: i64,
    pub attempts: i64,
    pub age_seconds: f64,
    pub lease_owner: Option<String>,
    pub next_attempt_in_seconds: f64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadCode {
    pub rows: i64,
    pub sample_message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub filter: String,
    pub rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub database: String,
    pub rows: BTreeMap<String, i64>,
    pub rows_by_object_type: BTreeMap<String, BTreeMap<String, i64>>,
    /// By team id; `default` holds the rows with an empty `team_id` (the configured team).
    pub rows_by_team: BTreeMap<String, BTreeMap<String, i64>>,
    pub rows_by_operation: BTreeMap<String, BTreeMap<String, i64>>,
    pub dead_by_error_code: BTreeMap<String, i64>,
    pub dead_codes: BTreeMap<String, DeadCode>,
    pub oldest_pending_age_seconds: f64,
    pub rows_held_back: i64,
    pub batches_in_flight: i64,
    pub oldest_batch_key_age_seconds: f64,
    pub in_flight: Vec<InFlightBatch>,
    pub recent_audit: Vec<AuditEntry>,
    /// Teams and lanes an operator paused (`prism-sync pause`), for every replica.
    pub paused: Vec<crate::store::Pause>,
    /// The registered `run` processes (see `fleet.rs`), silent ones flagged.
    pub replicas: Vec<crate::store::fleet::ReplicaView>,
}

impl StatusReport {
    pub fn exit_code(&self, stuck_after_seconds: f64) -> u8 {
        let stuck = self.oldest_pending_age_seconds > stuck_after_seconds
            || self.oldest_batch_key_age_seconds > KEY_AGE_STUCK_SECONDS;
        if stuck {
            EXIT_STUCK
        } else if self.rows.get("dead").copied().unwrap_or(0) > 0 {
            EXIT_DEAD
        } else {
            0
        }
    }
}

macro_rules! fetch_all {
    ($store:expr, $sqlite:expr, $pg:expr) => {
        match $store.sqlx_kind() {
            StoreKind::Sqlite(pool) => sqlx::query($sqlite)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(AnyRow::Sqlite)
                .collect::<Vec<_>>(),
            StoreKind::Postgres(pool) => sqlx::query($pg)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(AnyRow::Postgres)
                .collect::<Vec<_>>(),
        }
    };
}

/// A row from either engine, read by column index.
pub(crate) enum AnyRow {
    Sqlite(sqlx::sqlite::SqliteRow),
    Postgres(sqlx::postgres::PgRow),
}

impl AnyRow {
    pub fn text(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        match self {
            AnyRow::Sqlite(r) => r.try_get(i),
            AnyRow::Postgres(r) => r.try_get(i),
        }
    }
    pub fn int(&self, i: usize) -> Result<Option<i64>, sqlx::Error> {
        match self {
            AnyRow::Sqlite(r) => r.try_get(i),
            AnyRow::Postgres(r) => r.try_get(i),
        }
    }
    /// Text that may not be valid UTF-8 (SQLite stores whatever an application wrote).
    pub fn lossy(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        match self {
            AnyRow::Sqlite(r) => Ok(r
                .try_get::<Option<Vec<u8>>, _>(i)?
                .map(|b| String::from_utf8_lossy(&b).into_owned())),
            AnyRow::Postgres(r) => r.try_get(i),
        }
    }
    pub fn float(&self, i: usize) -> Result<Option<f64>, sqlx::Error> {
        match self {
            AnyRow::Sqlite(r) => r.try_get(i),
            AnyRow::Postgres(r) => r.try_get(i),
        }
    }
}

pub async fn status(store: &Store) -> Result<StatusReport, StoreError> {
    let mut rows: BTreeMap<String, i64> = RowState::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut by_type: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut by_team: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut by_operation: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let counted = fetch_all!(
        store,
        "SELECT CAST(object_type AS BLOB), state, count(*), CAST(team_id AS BLOB), CAST(operation AS BLOB)
         FROM prism_outbox GROUP BY 1, 2, 4, 5",
        "SELECT object_type, state, count(*), team_id, operation
         FROM prism_outbox GROUP BY 1, 2, 4, 5"
    );
    for r in &counted {
        let (t, s, n) = (
            r.lossy(0)?.unwrap_or_default(),
            r.text(1)?.unwrap_or_default(),
            r.int(2)?.unwrap_or(0),
        );
        let team = super::team_name(&r.lossy(3)?.unwrap_or_default()).to_owned();
        let operation = r.lossy(4)?.unwrap_or_default();
        *rows.entry(s.clone()).or_default() += n;
        *by_type.entry(t).or_default().entry(s.clone()).or_default() += n;
        *by_team
            .entry(team)
            .or_default()
            .entry(s.clone())
            .or_default() += n;
        *by_operation
            .entry(operation)
            .or_default()
            .entry(s)
            .or_default() += n;
    }
    let mut dead_codes = BTreeMap::new();
    let dead = fetch_all!(
        store,
        "SELECT COALESCE(last_error_code, 'unknown'), count(*), max(last_error_message)
         FROM prism_outbox WHERE state = 'dead' GROUP BY 1",
        "SELECT COALESCE(last_error_code, 'unknown'), count(*), max(last_error_message)
         FROM prism_outbox WHERE state = 'dead' GROUP BY 1"
    );
    for r in &dead {
        dead_codes.insert(
            r.text(0)?.unwrap_or_default(),
            DeadCode {
                rows: r.int(1)?.unwrap_or(0),
                sample_message: r.text(2)?,
            },
        );
    }
    let gauges = store.gauges().await?;
    let in_flight = fetch_all!(
        store,
        "SELECT id, idempotency_key, object_type, item_count, row_count, attempts,
                (julianday('now') - julianday(created_at)) * 86400.0, lease_owner,
                max(0.0, (julianday(next_attempt_at) - julianday('now')) * 86400.0), last_status, last_error,
                team_id, operation
         FROM prism_batches WHERE state = 'open' ORDER BY created_at LIMIT 20",
        "SELECT id::text, idempotency_key, object_type, item_count::bigint, row_count::bigint, attempts::bigint,
                extract(epoch FROM now() - created_at)::float8, lease_owner,
                greatest(0, extract(epoch FROM next_attempt_at - now()))::float8, last_status::bigint, last_error,
                team_id, operation
         FROM prism_batches WHERE state = 'open' ORDER BY created_at LIMIT 20"
    )
    .iter()
    .map(|r| {
        Ok(InFlightBatch {
            id: r.text(0)?.unwrap_or_default(),
            idempotency_key: r.text(1)?.unwrap_or_default(),
            team: super::team_name(&r.text(11)?.unwrap_or_default()).to_owned(),
            object_type: r.text(2)?.unwrap_or_default(),
            operation: r.text(12)?.unwrap_or_default(),
            items: r.int(3)?.unwrap_or(0),
            rows: r.int(4)?.unwrap_or(0),
            attempts: r.int(5)?.unwrap_or(0),
            age_seconds: r.float(6)?.unwrap_or(0.0),
            lease_owner: r.text(7)?,
            next_attempt_in_seconds: r.float(8)?.unwrap_or(0.0),
            last_status: r.int(9)?,
            last_error: r.text(10)?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let recent_audit = fetch_all!(
        store,
        "SELECT at, actor, action, filter, rows FROM prism_audit ORDER BY id DESC LIMIT 5",
        "SELECT at::text, actor, action, filter::text, rows FROM prism_audit ORDER BY id DESC LIMIT 5"
    )
    .iter()
    .map(|r| {
        Ok(AuditEntry {
            at: r.text(0)?.unwrap_or_default(),
            actor: r.text(1)?.unwrap_or_default(),
            action: r.text(2)?.unwrap_or_default(),
            filter: r.text(3)?.unwrap_or_default(),
            rows: r.int(4)?.unwrap_or(0),
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(StatusReport {
        database: store.kind().to_owned(),
        rows,
        rows_by_object_type: by_type,
        rows_by_team: by_team,
        rows_by_operation: by_operation,
        dead_by_error_code: dead_codes
            .iter()
            .map(|(k, v)| (k.clone(), v.rows))
            .collect(),
        dead_codes,
        oldest_pending_age_seconds: gauges.oldest_pending_age_seconds,
        rows_held_back: gauges.rows_held_back,
        batches_in_flight: gauges.batches_in_flight,
        oldest_batch_key_age_seconds: gauges.oldest_batch_key_age_seconds,
        in_flight,
        recent_audit,
        paused: store.pauses().await?,
        replicas: store.replicas().await?,
    })
}

/// The readable view.
pub fn render(report: &StatusReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let n = |s: &str| report.rows.get(s).copied().unwrap_or(0);
    let total: i64 = report.rows.values().sum();
    writeln!(
        out,
        "prism-sync status ({} outbox, {total} rows)",
        report.database
    )?;
    writeln!(out)?;
    let mut rows = Vec::new();
    let mut groups: Vec<(String, &BTreeMap<String, i64>)> = report
        .rows_by_object_type
        .iter()
        .map(|(t, states)| (t.clone(), states))
        .collect();
    // Deletes and teams get their own lines only when there is more than one of them.
    if report.rows_by_operation.len() > 1 {
        groups.extend(
            report
                .rows_by_operation
                .iter()
                .map(|(o, states)| (format!("operation {o}"), states)),
        );
    }
    if report.rows_by_team.len() > 1 {
        groups.extend(
            report
                .rows_by_team
                .iter()
                .map(|(t, states)| (format!("team {t}"), states)),
        );
    }
    for (group, states) in groups {
        let g = |s: &str| states.get(s).copied().unwrap_or(0).to_string();
        rows.push(vec![
            group,
            g("pending"),
            g("in_flight"),
            g("retrying"),
            g("succeeded"),
            g("dead"),
        ]);
    }
    rows.push(vec![
        "all".into(),
        n("pending").to_string(),
        n("in_flight").to_string(),
        n("retrying").to_string(),
        n("succeeded").to_string(),
        n("dead").to_string(),
    ]);
    table(
        out,
        &[
            "object type",
            "pending",
            "in flight",
            "retrying",
            "succeeded",
            "dead",
        ],
        &rows,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  oldest unfinished change: {}",
        human_age(report.oldest_pending_age_seconds)
    )?;
    writeln!(
        out,
        "  rows waiting on an older row of their record: {}",
        report.rows_held_back
    )?;
    writeln!(out, "  batches in flight: {}", report.batches_in_flight)?;
    if !report.paused.is_empty() {
        writeln!(out)?;
        super::pause::render(&report.paused, out)?;
    }
    if !report.in_flight.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = report
            .in_flight
            .iter()
            .map(|b| {
                vec![
                    b.id.clone(),
                    if b.team == "default" {
                        format!("{} {}", b.object_type, b.operation)
                    } else {
                        format!("{} {} ({})", b.object_type, b.operation, b.team)
                    },
                    format!("{}/{}", b.items, b.rows),
                    b.attempts.to_string(),
                    human_age(b.age_seconds),
                    if b.lease_owner.is_some() {
                        "sending".into()
                    } else {
                        format!("in {}", human_age(b.next_attempt_in_seconds))
                    },
                    b.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            out,
            &[
                "batch",
                "what",
                "items/rows",
                "attempts",
                "age",
                "next",
                "last error",
            ],
            &rows,
        )?;
    }
    crate::fleet::top::render_replicas(&report.replicas, out)?;
    if !report.dead_codes.is_empty() {
        writeln!(out)?;
        writeln!(out, "  dead rows by error code:")?;
        let rows: Vec<Vec<String>> = report
            .dead_codes
            .iter()
            .map(|(code, d)| {
                vec![
                    code.clone(),
                    d.rows.to_string(),
                    d.sample_message.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(out, &["code", "rows", "sample message"], &rows)?;
        writeln!(out)?;
        writeln!(
            out,
            "  see one: prism-sync inspect ROW_ID; requeue after fixing the cause: prism-sync replay --error-code CODE --dry-run"
        )?;
    }
    if !report.recent_audit.is_empty() {
        writeln!(out)?;
        writeln!(out, "  recent operator actions:")?;
        let rows: Vec<Vec<String>> = report
            .recent_audit
            .iter()
            .map(|a| {
                vec![
                    a.at.clone(),
                    a.actor.clone(),
                    a.action.clone(),
                    a.rows.to_string(),
                    // A replay's filter lists every row it rebased (with the original patch) or
                    // left dead; `--json` and `prism_audit` carry all of it.
                    crate::batch::truncate(&a.filter, 100),
                ]
            })
            .collect();
        table(out, &["at", "actor", "action", "rows", "filter"], &rows)?;
    }
    Ok(())
}
