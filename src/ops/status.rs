//! `prism-sync status`: what is pending, stuck, in flight and dead, and why.
//!
//! Exit codes (for scripts and cron checks): 0 healthy; 3 dead rows exist; 4 something is stuck
//! (oldest unfinished row older than `--stuck-after`, or a batch key older than 20h); 1 error;
//! 2 bad usage. "Stuck" wins over "dead".

use std::collections::BTreeMap;

use serde::Serialize;

use super::{human_age, table};
use crate::model::RowState;
use crate::store::{Store, StoreError};

pub const EXIT_DEAD: u8 = 3;
pub const EXIT_STUCK: u8 = 4;
/// A batch key this old is within four hours of the server's 24 h idempotency window.
const KEY_AGE_STUCK_SECONDS: f64 = 20.0 * 3600.0;

/// An open batch as `status` lists it (`team`: `default` for the configured default team).
pub use crate::store::views::OpenBatch as InFlightBatch;

#[derive(Debug, Clone, Serialize)]
pub struct DeadCode {
    pub rows: i64,
    pub sample_message: Option<String>,
}

pub use crate::store::views::AuditEntry;

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

pub async fn status(store: &Store) -> Result<StatusReport, StoreError> {
    let mut rows: BTreeMap<String, i64> = RowState::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut by_type: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut by_team: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut by_operation: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for c in store.count_rows().await? {
        let team = super::team_name(&c.team_id).to_owned();
        *rows.entry(c.state.clone()).or_default() += c.rows;
        for (group, key) in [
            (&mut by_type, c.object_type),
            (&mut by_team, team),
            (&mut by_operation, c.operation),
        ] {
            *group
                .entry(key)
                .or_default()
                .entry(c.state.clone())
                .or_default() += c.rows;
        }
    }
    let dead_codes: BTreeMap<String, DeadCode> = store
        .dead_codes()
        .await?
        .into_iter()
        .map(|d| {
            (
                d.code,
                DeadCode {
                    rows: d.rows,
                    sample_message: d.sample_message,
                },
            )
        })
        .collect();
    let gauges = store.gauges().await?;
    let mut in_flight = store.open_batches(20).await?;
    for b in &mut in_flight {
        b.team = super::team_name(&b.team).to_owned();
    }
    let recent_audit = store.audit_entries(5, None).await?;
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

/// `prism-sync status`'s command line.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// An unfinished change older than this counts as stuck (exit code 4).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub stuck_after: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusCommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// `prism-sync status`: the report as a table or JSON; returns the exit code (see the module).
pub async fn run(
    store: &Store,
    args: &StatusArgs,
    out: &mut impl std::io::Write,
) -> Result<u8, StatusCommandError> {
    let report = status(store).await?;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        )?;
    } else {
        render(&report, out)?;
    }
    Ok(report.exit_code(args.stuck_after.as_secs_f64()))
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
    render_in_flight(report, out)?;
    crate::fleet::top::render_replicas(&report.replicas, out)?;
    render_dead_codes(report, out)?;
    render_recent_audit(report, out)
}

/// The open batches, oldest first.
fn render_in_flight(report: &StatusReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
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
                    if let Some(owner) = b.lease_owner.as_ref().filter(|_| b.lease_lapsed) {
                        format!("lease lapsed ({owner})")
                    } else if b.lease_owner.is_some() {
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
    Ok(())
}

/// Dead rows by error code, with what to do next.
fn render_dead_codes(report: &StatusReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
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
    Ok(())
}

/// The last operator actions.
fn render_recent_audit(
    report: &StatusReport,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
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
