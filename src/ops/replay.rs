//! `prism-sync replay`: an operator puts `dead` rows (and, if asked, rows waiting to retry) back
//! to `pending`, attempts reset, to travel in new batches under new keys, in their original
//! order. In-flight rows are never touched. Every replay is written to `prism_audit`.
//!
//! Replay never puts a record back to older values: a row whose record has a newer change that
//! already succeeded is rebased or left dead as superseded ([`super::supersede`]).

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use super::supersede::{self, NewerChange, Verdict};
use crate::model::{ObjectType, Operation, RowState};
use crate::store::views::{NewerRow, RowFilter, RowSummary};
use crate::store::{OpsTx, Store, StoreError};

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

    /// The states a replay takes rows from: `dead`, and `retrying` if asked.
    fn states(&self) -> Vec<RowState> {
        if self.include_retrying {
            vec![RowState::Dead, RowState::Retrying]
        } else {
            vec![RowState::Dead]
        }
    }

    /// The rows this filter names, as the store reads them.
    pub fn rows(&self) -> RowFilter {
        RowFilter {
            states: self.states(),
            ids: self.ids.clone(),
            batch: self.batch,
            error_code: self.error_code.clone(),
            record_id: self.record_id,
            object_type: self.object_type,
            teams: self.teams.clone(),
            operation: self.operation,
            since: self.since,
            until: self.until,
            message_contains: None,
        }
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
    /// The ids of every selected row: what a confirmed replay may touch.
    #[serde(skip)]
    selected_ids: Vec<i64>,
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

/// The newer rows of each selected record that are not dead, and the dead ones answered 2xx
/// (`unreadable_response`, read as succeeded), in id order.
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
    let mut tx = store.begin_ops_read().await?;
    let plan = plan(&mut tx, f, limit, None).await?;
    tx.commit().await?;
    Ok(plan)
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
    replay_in(store, f, actor, limit, None).await
}

/// [`replay`] of the rows `previewed` showed, and only those: a row that came to match the
/// filter after the operator saw the preview (a row that died meanwhile) is left as it is. The
/// judgement is made again (newer changes may have been applied since).
pub async fn replay_previewed(
    store: &Store,
    f: &ReplayFilter,
    previewed: &ReplayPlan,
    actor: &str,
    limit: usize,
) -> Result<ReplayOutcome, ReplayError> {
    let only: HashSet<i64> = previewed.selected_ids.iter().copied().collect();
    replay_in(store, f, actor, limit, Some(&only)).await
}

async fn replay_in(
    store: &Store,
    f: &ReplayFilter,
    actor: &str,
    limit: usize,
    only: Option<&HashSet<i64>>,
) -> Result<ReplayOutcome, ReplayError> {
    if f.is_empty() {
        return Err(ReplayError::NoFilter);
    }
    // The plan is made inside the write transaction: on SQLite under the write lock, on
    // Postgres with the selected rows and their records' newer rows locked (rows others hold
    // are left out or count as in flight), and the claims held back (the claim gate), so no
    // claim or outcome write changes them between the judgement and the update.
    let mut tx = store.begin_ops_write().await?;
    let plan = plan(&mut tx, f, limit, only).await?;
    let replayed = requeue(&mut tx, f, &plan, actor).await?;
    tx.commit().await?;
    Ok(ReplayOutcome { replayed, plan })
}

/// Reads the selected rows (of `only`, when given), the newer changes of their records and the
/// patches that need judging, and decides row by row.
async fn plan(
    tx: &mut OpsTx,
    f: &ReplayFilter,
    limit: usize,
    only: Option<&HashSet<i64>>,
) -> Result<ReplayPlan, ReplayError> {
    let rows = tx.select_rows(&f.rows()).await?;
    let mut selected = Vec::with_capacity(rows.len());
    let mut sample = Vec::new();
    for r in rows {
        if only.is_some_and(|only| !only.contains(&r.id)) {
            continue;
        }
        take_selected(r, limit, &mut selected, &mut sample);
    }
    let Some(oldest) = selected.first().map(|s| s.id) else {
        return Ok(ReplayPlan::default());
    };
    let records: Vec<&str> = selected.iter().map(|s| s.lane.record_id.as_str()).collect();
    let newer = newer_rows(tx.newer_rows(&records, oldest).await?);
    let contested = contested(&selected, &newer);
    let patches = tx.patches(&contested).await?;
    Ok(decide(selected, sample, &newer, &patches))
}

fn take_selected(
    r: RowSummary,
    limit: usize,
    selected: &mut Vec<Selected>,
    sample: &mut Vec<Candidate>,
) {
    if sample.len() < limit {
        sample.push(Candidate {
            id: r.id,
            record_id: r.record_id.clone(),
            object_type: r.object_type.clone(),
            state: r.state,
            attempts: r.attempts,
            last_error_code: r.last_error_code,
            enqueued_at: r.enqueued_at,
            replay_as: "as is",
        });
    }
    selected.push(Selected {
        id: r.id,
        lane: RecordLane {
            record_id: r.record_id,
            object_type: r.object_type,
            team: r.team_id,
        },
        operation: r.operation,
    });
}

/// The newer rows as per-record lists, in id order.
fn newer_rows(rows: Vec<NewerRow>) -> NewerRows {
    let mut newer = NewerRows::new();
    for r in rows {
        let lane = RecordLane {
            record_id: r.record_id,
            object_type: r.object_type,
            team: r.team_id,
        };
        newer.entry(lane).or_default().push(NewerChange {
            id: r.id,
            operation: r.operation,
            state: r.state,
            patch: r.patch,
        });
    }
    newer
}

/// The newer rows of `s`'s record (not dead, or dead but answered 2xx: see [`newer_rows`]).
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
        selected_ids: selected.iter().map(|s| s.id).collect(),
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
async fn requeue(
    tx: &mut OpsTx,
    f: &ReplayFilter,
    plan: &ReplayPlan,
    actor: &str,
) -> Result<u64, ReplayError> {
    let rebased: Vec<(i64, String)> = plan
        .rebased
        .iter()
        .map(|r| (r.id, serde_json::to_string(&r.patch).expect("serialises")))
        .collect();
    let changed = tx.requeue(&plan.as_is_ids, &rebased, &f.states()).await?;
    tx.audit(actor, "replay", &audit_note(f, plan), changed)
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

/// `prism-sync replay`'s command line.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub rows: super::select::RowSelection,
    /// Also requeue rows waiting to retry (their attempts are reset).
    #[arg(long)]
    pub include_retrying: bool,
    /// Every dead row (needed when no other filter is given).
    #[arg(long)]
    pub all: bool,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Who is replaying, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
    /// One JSON object on stdout (the preview and the question, if asked, go to stderr).
    #[arg(long)]
    pub json: bool,
}

impl ReplayArgs {
    /// The filter these arguments name; `default_team` is `micro.team_id`.
    pub fn filter(&self, default_team: &str) -> ReplayFilter {
        let r = &self.rows;
        ReplayFilter {
            ids: r.ids.clone(),
            batch: r.batch,
            error_code: r.error_code.clone(),
            record_id: r.record_id,
            object_type: r.object_type,
            teams: r.teams(default_team),
            operation: r.operation,
            since: r.since,
            until: r.until,
            include_retrying: self.include_retrying,
            all: self.all,
        }
    }

    pub fn options(&self) -> ReplayOptions {
        ReplayOptions {
            dry_run: self.dry_run,
            yes: self.yes,
            json: self.json,
            actor: super::actor(self.actor.as_deref()),
        }
    }
}

/// `prism-sync replay` from its command line; the exit code as [`command`] returns it.
pub async fn run(
    store: &Store,
    args: &ReplayArgs,
    default_team: &str,
    out: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, ReplayCommandError> {
    let filter = args.filter(default_team);
    let options = args.options();
    command(store, &filter, &options, out, &mut std::io::stderr(), input).await
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
    // Only the rows the operator was shown (and agreed to): a row that died after the preview
    // waits for a replay of its own.
    let done = replay_previewed(store, f, &plan, &o.actor, 0).await?;
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
