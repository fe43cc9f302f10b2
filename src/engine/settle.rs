//! What each verdict does to its batch: one function per arm of [`BatchVerdict`], chosen in
//! [`verdict`] (the engine's one retry decision, like Vector's `RetryLogic`).
//!
//! | verdict | the batch | its rows |
//! |---|---|---|
//! | answered ([`answered`]) | ends `done`, written by the recorder | each takes its item's outcome |
//! | retry ([`retry`]) | deferred: same key, same bytes, a due time | stay in flight |
//! | auth refused ([`auth_refused`]) | deferred by the probe interval; the team pauses | stay in flight |
//! | unreadable 2xx ([`unreadable`]) | deferred, each send counting; never released | `dead` once out of attempts |
//! | rejected whole ([`rejected`]) | split into two halves under new keys | carried by the halves |
//! | key mismatch ([`key_mismatch`]) | released | back to `retrying`, new keys |
//! | worn out / past `retry.give_up_after` ([`worn_out`], [`give_up`]) | released (or ended, if answered 2xx) | `retrying`, or `dead` past the limit |
//!
//! **Invariant:** a key the API answered 2xx is never released: such a batch is deferred or
//! ended as `unreadable_response`, never given up to new keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::Shared;
use super::holdings::Held;
use super::recorder::must_write;
use super::team::Team;
use super::worker::Sent;
use crate::batch;
use crate::classify::{Anomalies, BatchVerdict};
use crate::health::Health;
use crate::model::{ItemOutcome, Operation, RowState, codes};
use crate::store::{AttemptRecord, BatchEnd, DeferBatch, FinishBatch, LeasedBatch, RowUpdate};

/// Settles a sent batch as its verdict asks. The halves of a batch rejected whole go to
/// `halves`; an answered batch goes to the recorder; any other is let go when this returns.
pub(super) async fn verdict(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    held: Held,
    verdict: BatchVerdict,
    sent: &Sent,
    halves: &mut Vec<Held>,
) {
    let batch = held.batch();
    match verdict {
        BatchVerdict::Answered {
            outcomes,
            anomalies,
        } => {
            let attempt = sent.attempt("answered", None);
            answered(shared, team, held, outcomes, &anomalies, attempt).await;
        }
        BatchVerdict::Retry {
            code,
            retry_after,
            slow_everyone,
        } => {
            let wait = Wait {
                retry_after,
                slow_everyone,
                throttled_run: sent.throttled_run,
            };
            let attempt = sent.attempt(&code, sent.detail.clone());
            retry(shared, team, batch, &code, wait, attempt).await;
        }
        BatchVerdict::AuthRefused { status } => {
            let attempt = sent.attempt(&format!("http_{status}"), None);
            auth_refused(shared, team, batch, attempt).await;
        }
        BatchVerdict::Unreadable { detail, .. } => {
            let attempt = sent.attempt(codes::UNREADABLE_RESPONSE, Some(detail));
            unreadable(shared, team, batch, attempt).await;
        }
        BatchVerdict::Rejected { status, message } => {
            let code = format!("http_{status}");
            let attempt = sent.attempt(&code, Some(message.clone()));
            rejected(shared, team, held, &code, message, attempt, halves).await;
        }
        BatchVerdict::KeyMismatch => {
            let attempt = sent.attempt("idempotency_key_mismatch", None);
            key_mismatch(shared, team, batch, attempt).await;
        }
    }
}

/// What an unanswered send says about when to try again.
struct Wait {
    /// The server's own delay (`retry-after-ms`, `retry-after`), uncapped.
    retry_after: Option<Duration>,
    /// The delay holds back every batch of the team, not only this one.
    slow_everyone: bool,
    /// 429s in a row for the team, this one included (0: not a 429).
    throttled_run: u32,
}

/// Whether the batch's oldest row has been failing for longer than `retry.give_up_after`:
/// then the batch is not deferred again, and its rows past the limit go dead.
fn past_give_up(shared: &Shared, batch: &LeasedBatch) -> bool {
    batch.oldest_row_age() >= shared.cfg.give_up_after
}

/// The attempt count of the batch's next send.
fn next_attempt(attempts: i32) -> u32 {
    u32::try_from(attempts).unwrap_or(0).saturating_add(1)
}

/// The batch's key must not be sent again (`why`): an answered key ends its rows as
/// `unreadable_response`, any other is released.
pub(super) async fn worn_out(shared: &Shared, team: &Team, batch: &LeasedBatch, why: &str) {
    if batch.answered {
        end_unreadable(shared, team, batch, why).await;
    } else {
        release(shared, team, batch, why).await;
    }
}

/// The batch was not answered (connection error, timeout, 408, 409, 429, 5xx): re-send the
/// same bytes under the same key later. A 429 burns no attempt; its pause grows with each 429
/// in a row for the team. Past `retry.give_up_after` the batch is given up instead.
async fn retry(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    wait: Wait,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    let past = past_give_up(shared, batch);
    if past && !batch.answered {
        give_up(shared, team, batch, code, attempt).await;
        return;
    }
    let next = next_attempt(batch.attempts);
    let throttled = wait.throttled_run > 0;
    let delay = match wait.retry_after {
        Some(d) => team.client.cap_delay(d),
        None if throttled => cfg.retry.throttled(wait.throttled_run, rand::random()),
        None => cfg.retry.jittered(next),
    };
    if wait.slow_everyone {
        // Only this team's client: another team's key has its own rate limit.
        team.client.slow_down(delay);
    }
    info!(code = %code, retry_in = ?delay, attempt = next, throttled_run = wait.throttled_run, detail = attempt.detail.as_deref().unwrap_or(""), "batch not answered; it will be re-sent with the same key");
    metrics::counter!("prism_sync_batches_total", "result" => "retry").increment(1);
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: delay,
        // A key the API answered 2xx is never given up to new keys: past the limit its every
        // send counts, so that `batch.max_attempts` ends it (as `unreadable_response`).
        count_attempt: !throttled || past,
        attempt,
    };
    let _ = must_write("deferring a batch", || shared.store.defer_batch(&d)).await;
    shared.look_again_in(d.retry_in);
}

/// 401/403: pause the team's sends (no attempts burned) and probe its key on an interval.
async fn auth_refused(shared: &Shared, team: &Team, batch: &LeasedBatch, attempt: AttemptRecord) {
    let cfg = &shared.cfg;
    if !team.refused() {
        error!(team = %team.id, status = ?attempt.http_status, probe_every = ?cfg.auth_probe_interval, "the API refuses the team's key: pausing its sends (no attempts are used) and probing; other teams go on");
    }
    team.set_refused(true, &shared.health, &shared.teams, cfg.auth_probe_interval);
    // A key rotated in its file (a Kubernetes Secret's mounted file changes in place) is what
    // the next probe sends.
    team.client.reload_key();
    metrics::counter!("prism_sync_batches_total", "result" => "auth_refused").increment(1);
    let past = past_give_up(shared, batch);
    if past && !batch.answered {
        let code = attempt.outcome.clone();
        give_up(shared, team, batch, &code, attempt).await;
        return;
    }
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: cfg.auth_probe_interval,
        count_attempt: past,
        attempt,
    };
    let _ = must_write("deferring a refused batch", || shared.store.defer_batch(&d)).await;
    shared.look_again_in(d.retry_in);
}

/// A 2xx whose body could not be read: the API applied the request, so the same bytes go
/// again under the same key (the API replays its answer, which may be readable this time),
/// counting an attempt; the key is never released. Once the batch is out of attempts
/// (`batch.max_attempts`, which also bounds it past `retry.give_up_after`) its rows go dead as
/// `unreadable_response`.
async fn unreadable(shared: &Shared, team: &Team, batch: &LeasedBatch, attempt: AttemptRecord) {
    let cfg = &shared.cfg;
    let next = next_attempt(batch.attempts);
    warn!(
        attempt = next,
        detail = attempt.detail.as_deref().unwrap_or(""),
        "the API answered 2xx but its answer cannot be read; re-sending under the same key"
    );
    if next >= cfg.batch_max_attempts {
        let why = "the batch's answers stayed unreadable";
        end_unreadable(shared, team, batch, why).await;
        return;
    }
    metrics::counter!("prism_sync_batches_total", "result" => "retry").increment(1);
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: cfg.retry.jittered(next),
        count_attempt: true,
        attempt,
    };
    let _ = must_write("deferring an unreadable batch", || {
        shared.store.defer_batch(&d)
    })
    .await;
    shared.look_again_in(d.retry_in);
}

/// 400/413/422 for the whole batch: bisect it into two children under new keys (sent at once,
/// by this worker) until the refused item stands alone, then that item goes dead.
async fn rejected(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    held: Held,
    code: &str,
    message: String,
    attempt: AttemptRecord,
    halves: &mut Vec<Held>,
) {
    let batch = held.batch();
    match batch::split_batch(batch.shape(), &batch.body, &batch.items) {
        Ok(Some(children)) => {
            info!(
                status = ?attempt.http_status,
                items = batch.items.len(),
                "batch rejected whole: bisecting to find the item the API refuses"
            );
            metrics::counter!("prism_sync_batches_total", "result" => "bisected").increment(1);
            let f = FinishBatch {
                children: children.to_vec(),
                ..shared
                    .cfg
                    .finish(batch, BatchEnd::Split, Vec::new(), attempt)
            };
            if shared.record(f).await == Some(true) {
                for child in children {
                    halves.push(
                        shared
                            .holdings
                            .work_on(LeasedBatch::fresh(child), team.index),
                    );
                }
            }
        }
        Ok(None) => {
            let dead = ItemOutcome::Dead {
                code: code.to_owned(),
                message,
            };
            let outcomes = vec![dead; batch.items.len()];
            answered(shared, team, held, outcomes, &Anomalies::default(), attempt).await;
        }
        Err(e) => {
            error!(error = %e, "stored batch body cannot be split; releasing its rows");
            release(
                shared,
                team,
                batch,
                "the stored batch could not be bisected",
            )
            .await;
        }
    }
}

/// 409 `idempotency_key_mismatch`: the API holds this key for another body, so the key can
/// never carry these rows; they go to new batches under new keys.
async fn key_mismatch(shared: &Shared, team: &Team, batch: &LeasedBatch, attempt: AttemptRecord) {
    error!(
        "the API says this key was used with another body (idempotency_key_mismatch); releasing the rows to new batches"
    );
    metrics::counter!("prism_sync_key_mismatches_total").increment(1);
    let code = "idempotency_key_mismatch";
    let why = "the API answered 409 idempotency_key_mismatch";
    finish_released(shared, team, batch, code, why, attempt).await;
}

/// The batch's oldest row is past `retry.give_up_after` and the batch failed again: it is not
/// deferred again. Its rows go back as after a release (new batches, new keys), where those
/// past the limit go dead with `code`. (A key the API answered 2xx is never released: such a
/// batch is deferred instead, each send counting, until `batch.max_attempts` ends it.)
async fn give_up(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    attempt: AttemptRecord,
) {
    let why = "the batch kept failing past retry.give_up_after";
    warn!(code, oldest_row_age = ?batch.oldest_row_age(), "{why}: giving up its key");
    finish_released(shared, team, batch, code, why, attempt).await;
}

/// Ends a batch whose key the API answered 2xx (it applied the request) but whose answer could
/// never be read: its rows go dead as `unreadable_response` (the changes were most likely
/// applied; an operator can replay them), and the key is not released to new keys, which
/// would apply them again.
async fn end_unreadable(shared: &Shared, team: &Team, batch: &LeasedBatch, why: &str) {
    error!(
        attempts = batch.attempts,
        "{why}: the API answered 2xx under this key but its answers could not be read; its rows go dead as unreadable_response (most likely applied)"
    );
    let message = format!(
        "{why}: the API answered 2xx (so it applied the change) but its answer could not be read"
    );
    let rows: Vec<RowUpdate> = batch
        .items
        .iter()
        .flat_map(|i| i.rows.iter())
        .map(|id| RowUpdate {
            id: *id,
            state: RowState::Dead,
            code: Some(codes::UNREADABLE_RESPONSE.to_owned()),
            message: Some(message.clone()),
            retry_in: 0.0,
        })
        .collect();
    let dead = rows.len() as u64;
    let attempt = AttemptRecord {
        outcome: codes::UNREADABLE_RESPONSE.into(),
        detail: Some(why.into()),
        ..AttemptRecord::default()
    };
    let f = shared.cfg.finish(batch, BatchEnd::Done, rows, attempt);
    if shared.record(f).await == Some(true) {
        metrics::counter!("prism_sync_batches_total", "result" => "unreadable").increment(1);
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_item_errors_total", "code" => codes::UNREADABLE_RESPONSE)
            .increment(dead);
        Health::count(&shared.health.rows_dead, dead);
        team.count_items(batch.operation, "dead", dead);
    }
}

/// Gives up a batch's key without sending it again: its rows go back to be re-batched under new
/// keys (safe: per-record order still holds and PATCH values are absolute).
async fn release(shared: &Shared, team: &Team, batch: &LeasedBatch, why: &str) {
    warn!(attempts = batch.attempts, key_age = ?batch.key_age, "{why}: releasing its rows to new batches");
    let attempt = AttemptRecord {
        outcome: "released".into(),
        detail: Some(why.into()),
        ..AttemptRecord::default()
    };
    finish_released(shared, team, batch, codes::BATCH_RELEASED, why, attempt).await;
}

/// Writes a released batch's end: each row goes back to `retrying` with `code`, or `dead` once
/// its item has used up `retry.max_attempts`.
async fn finish_released(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    why: &str,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    let mut rows = Vec::with_capacity(batch.row_count());
    let mut dead = 0u64;
    for item in &batch.items {
        let tries = next_attempt(item.attempts);
        // Each release counts as a try, so a batch that can never be answered ends its rows
        // `dead` after retry.max_attempts instead of circling forever.
        let state = if tries >= cfg.codes.max_attempts {
            RowState::Dead
        } else {
            RowState::Retrying
        };
        for id in &item.rows {
            if state == RowState::Dead {
                dead += 1;
            }
            rows.push(RowUpdate {
                id: *id,
                state,
                code: Some(code.to_owned()),
                message: Some(why.to_owned()),
                retry_in: cfg.retry.jittered(tries).as_secs_f64(),
            });
        }
    }
    let f = cfg.finish(batch, BatchEnd::Released, rows, attempt);
    if shared.record(f).await == Some(true) {
        let retried = batch.row_count() as u64 - dead;
        metrics::counter!("prism_sync_batches_total", "result" => "released").increment(1);
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_items_total", "outcome" => "retried").increment(retried);
        Health::count(&shared.health.rows_dead, dead);
        Health::count(&shared.health.rows_retried, retried);
        team.count_items(batch.operation, "dead", dead);
        team.count_items(batch.operation, "retried", retried);
    }
}

/// Rows of an answered batch by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    succeeded: u64,
    retried: u64,
    dead: u64,
}

/// Records an answered batch: every row takes its item's outcome. The write is queued for the
/// recorder and this worker moves on; the batch stays held (its lease extended) until the
/// write lands, and the recorder then counts it ([`Answered::settle`]).
async fn answered(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    held: Held,
    mut outcomes: Vec<ItemOutcome>,
    anomalies: &Anomalies,
    attempt: AttemptRecord,
) {
    if anomalies.any() {
        warn!(
            missing = anomalies.missing,
            duplicate = anomalies.duplicate,
            unknown = anomalies.unknown,
            summary_mismatch = anomalies.summary_mismatch,
            "the API's answer does not match the batch; missing items are retried in new batches"
        );
    }
    let batch = held.batch();
    if batch.operation == Operation::Delete {
        forgive_gone_records(&mut outcomes);
    }
    let (rows, tally) = row_updates(shared, batch, &outcomes);
    let f = shared.cfg.finish(batch, BatchEnd::Done, rows, attempt);
    let codes = outcomes
        .iter()
        .filter_map(|o| match o {
            ItemOutcome::Retry { code, .. } | ItemOutcome::Dead { code, .. } => {
                Some(crate::telemetry::code_label(&shared.cfg.codes, code))
            }
            ItemOutcome::Succeeded => None,
        })
        .collect();
    crash_point!("before_outcomes");
    let held = held.into_recording().await;
    // Queued before this worker returns: the recorder drains its queue before the engine stops,
    // so an answered batch is recorded even when SIGTERM arrives meanwhile.
    let answered = Answered {
        items: held.batch().items.len(),
        held,
        team: Arc::clone(team),
        health: Arc::clone(&shared.health),
        tally,
        codes,
        queued_at: Instant::now(),
        span: tracing::Span::current(),
    };
    shared.record_answered(f, answered);
}

/// Deleting a record that is already gone is what was asked for: an earlier send of the same
/// change (under a released key), or another system, deleted it first.
fn forgive_gone_records(outcomes: &mut [ItemOutcome]) {
    for outcome in outcomes {
        if matches!(outcome, ItemOutcome::Dead { code, .. } | ItemOutcome::Retry { code, .. } if code == "not_found")
        {
            *outcome = ItemOutcome::Succeeded;
        }
    }
}

/// Every row of `batch` with its item's outcome, and the rows counted by outcome.
fn row_updates(
    shared: &Shared,
    batch: &LeasedBatch,
    outcomes: &[ItemOutcome],
) -> (Vec<RowUpdate>, Tally) {
    let mut rows = Vec::with_capacity(batch.row_count());
    let mut tally = Tally::default();
    for (item, outcome) in batch.items.iter().zip(outcomes) {
        let n = item.rows.len() as u64;
        let (state, code, message, retry_in) = match outcome {
            ItemOutcome::Succeeded => {
                tally.succeeded += n;
                (RowState::Succeeded, None, None, 0.0)
            }
            ItemOutcome::Retry { code, message } => {
                tally.retried += n;
                let next = next_attempt(item.attempts);
                let retry_in = shared.cfg.retry.jittered(next).as_secs_f64();
                (RowState::Retrying, Some(code), Some(message), retry_in)
            }
            ItemOutcome::Dead { code, message } => {
                tally.dead += n;
                (RowState::Dead, Some(code), Some(message), 0.0)
            }
        };
        rows.extend(item.rows.iter().map(|id| RowUpdate {
            id: *id,
            state,
            code: code.cloned(),
            message: message.cloned(),
            retry_in,
        }));
    }
    (rows, tally)
}

/// An answered batch on its way through the recorder: counted once its outcome is written,
/// and let go (dropping its [`Held`]) whatever the write's result.
pub(super) struct Answered {
    held: Held,
    team: Arc<Team>,
    health: Arc<Health>,
    items: usize,
    tally: Tally,
    /// The metric label of each item's error code.
    codes: Vec<String>,
    queued_at: Instant,
    /// The batch's span, so that what the recorder logs about it names the batch.
    span: tracing::Span,
}

impl Answered {
    /// `written`: `Some(true)` written, `Some(false)` another process took the batch over
    /// meanwhile, `None` the database could not be written (the batch stays stored and is
    /// re-sent under its key).
    pub(super) fn settle(self, written: Option<bool>) {
        let _entered = self.span.enter();
        let operation = self.held.batch().operation;
        metrics::histogram!("prism_sync_db_duration_seconds", "op" => "record")
            .record(self.queued_at.elapsed().as_secs_f64());
        let Tally {
            succeeded,
            retried,
            dead,
        } = self.tally;
        match written {
            Some(true) => {
                self.team.count_items(operation, "succeeded", succeeded);
                self.team.count_items(operation, "retried", retried);
                self.team.count_items(operation, "dead", dead);
                crash_point!("after_outcomes");
                self.count_written();
            }
            Some(false) => warn!(
                "batch answered, but another process took it over meanwhile; its outcome is theirs to record"
            ),
            None => {}
        }
    }

    fn count_written(&self) {
        let Tally {
            succeeded,
            retried,
            dead,
        } = self.tally;
        let result = if retried + dead == 0 { "ok" } else { "partial" };
        metrics::counter!("prism_sync_batches_total", "result" => result).increment(1);
        metrics::counter!("prism_sync_items_total", "outcome" => "succeeded").increment(succeeded);
        metrics::counter!("prism_sync_items_total", "outcome" => "retried").increment(retried);
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        for code in &self.codes {
            metrics::counter!("prism_sync_item_errors_total", "code" => code.clone()).increment(1);
        }
        metrics::gauge!("prism_sync_last_progress_timestamp_seconds").set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        Health::count(&self.health.rows_succeeded, succeeded);
        Health::count(&self.health.rows_retried, retried);
        Health::count(&self.health.rows_dead, dead);
        debug!(
            items = self.items,
            rows_succeeded = succeeded,
            rows_retried = retried,
            rows_dead = dead,
            "batch answered"
        );
    }
}
