//! A team's workers: each takes a batch from its team's buffer, sends its stored bytes under
//! the team's key and concurrency limit, classifies the answer and hands the verdict to
//! [`super::settle`], then takes the next batch. A worker never waits for a claim or for an
//! answered batch's outcome write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use super::holdings::Held;
use super::settle;
use super::team::{Buffer, Team};
use crate::classify::{self, BatchVerdict, Exchange};
use crate::concurrency::Signal;
use crate::health::Health;
use crate::store::{AttemptRecord, LeasedBatch};

/// Sends the team's batches from its buffer until shutdown. After shutdown it takes no new
/// batch: those left in the buffer stay stored and are sent by the next start.
pub(super) async fn run(
    shared: Arc<Shared>,
    team: Arc<Team>,
    buffer: Buffer,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            b = async { buffer.lock().await.recv().await } => b,
        };
        let Some(held) = next else { return };
        // A place in the buffer is free: the claimer may refill it while this batch is sent.
        let held = held.take_up();
        let batch = held.batch();
        let span = info_span!("batch", batch_id = %batch.id, key = %batch.idempotency_key);
        work_through(&shared, &team, held).instrument(span).await;
    }
}

/// Sends one batch (and, when it is rejected whole, its halves) until each has a final or a
/// deferred state in the database, or is handed to the recorder.
async fn work_through(shared: &Arc<Shared>, team: &Arc<Team>, first: Held) {
    let mut queue = vec![first];
    while let Some(held) = queue.pop() {
        send_and_settle(shared, team, held, &mut queue).await;
    }
}

/// What one send came back with, besides its verdict: what every attempt record carries.
pub(super) struct Sent {
    pub(super) status: Option<u16>,
    pub(super) replay: bool,
    /// The transport or reading failure, when there was one.
    pub(super) detail: Option<String>,
    pub(super) took: Duration,
    /// 429s in a row for the team, this answer included (0: not a 429).
    pub(super) throttled_run: u32,
}

impl Sent {
    fn of(exchange: &Exchange, took: Duration, team: &Team) -> Sent {
        let (status, replay, detail) = match exchange {
            Exchange::Answered(a) => (Some(a.status), a.replay, None),
            Exchange::Unreadable {
                status,
                kind,
                detail,
            } => (
                Some(*status),
                false,
                Some(format!("{}: {detail}", kind.code())),
            ),
            Exchange::Failed { kind, detail } => {
                (None, false, Some(format!("{}: {detail}", kind.code())))
            }
        };
        if replay {
            metrics::counter!("prism_sync_idempotent_replays_total").increment(1);
        }
        let throttled_run = status.map_or(0, |s| team.observe_status(s));
        Sent {
            status,
            replay,
            detail,
            took,
            throttled_run,
        }
    }

    /// The attempt record of this send, with the verdict's `outcome` code.
    pub(super) fn attempt(&self, outcome: &str, detail: Option<String>) -> AttemptRecord {
        AttemptRecord {
            http_status: self.status,
            outcome: outcome.to_owned(),
            detail,
            replay: self.replay,
            duration: self.took,
        }
    }
}

/// Sends one batch and settles what its answer asks for. The halves of a batch rejected whole
/// go to `halves`, to be sent next by this worker.
async fn send_and_settle(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    held: Held,
    halves: &mut Vec<Held>,
) {
    // The pauses as of at most one poll interval ago (one small read, shared with the claim
    // rounds): an idle claimer's rounds are further apart than that, and a batch buffered
    // before a pause must still go back unsent. A failed read is logged, and the pauses as
    // last read hold (a batch exists only once they have been read).
    let _ = shared.pauses.refresh(&shared.store).await;
    if lane_paused(shared, team, held.batch()) {
        hand_back(shared, held.batch()).await;
        return;
    }
    if let Some(why) = worn_out(shared, held.batch()) {
        settle::worn_out(shared, team, held.batch(), why).await;
        return;
    }
    let Some((exchange, took)) = send(shared, team, held.batch()).await else {
        hand_back(shared, held.batch()).await;
        return;
    };
    crash_point!("after_response");
    let sent = Sent::of(&exchange, took, team);
    let verdict = classify::classify(&exchange, &held.batch().items, &shared.cfg.codes);
    if !matches!(verdict, BatchVerdict::AuthRefused { .. }) && sent.status.is_some() {
        resume_if_refused(shared, team);
    }
    let kept = match (&exchange, &verdict) {
        (Exchange::Answered(a), BatchVerdict::Answered { .. }) if shared.cfg.keep_responses => {
            Some((a, held.batch().id, held.batch().items.clone()))
        }
        _ => None,
    };
    settle::verdict(shared, team, held, verdict, &sent, halves).await;
    if let Some((answer, batch, items)) = kept {
        crate::responses::keep(&shared.store, &answer.body, batch, &items).await;
    }
}

/// Whether an operator paused the lane of `batch` (or its whole team) since it was leased.
fn lane_paused(shared: &Shared, team: &Team, batch: &LeasedBatch) -> bool {
    let default = team.keys.iter().any(String::is_empty);
    shared
        .pauses
        .lane_paused(&team.id, default, batch.object_type)
}

/// Gives a batch of a lane paused since it was leased back to the store unsent (same key, same
/// due time, no attempt): it is leased again, by any replica, once the pause is lifted. If the
/// write fails, its lease lapses on its own. The caller drops its hold on it.
async fn hand_back(shared: &Shared, batch: &LeasedBatch) {
    info!(batch_id = %batch.id, team = %batch.team, object_type = %batch.object_type, "paused by an operator: the batch goes back unsent");
    if let Err(e) = shared.store.hand_back(&shared.cfg.owner, batch.id).await {
        warn!(batch_id = %batch.id, error = %e, "could not give a paused batch back; its lease lapses on its own");
    }
}

/// Why the batch's key must not be sent again (`batch.max_attempts` used up, or the key near
/// the server's idempotency window), if it must not.
fn worn_out(shared: &Shared, batch: &LeasedBatch) -> Option<&'static str> {
    let cfg = &shared.cfg;
    if batch.attempts >= i32::try_from(cfg.batch_max_attempts).unwrap_or(i32::MAX) {
        Some("the batch failed batch.max_attempts times under its key")
    } else if batch.key_age >= cfg.max_key_age {
        Some("the batch's key is near the server's 24h idempotency window")
    } else {
        None
    }
}

/// Any answer other than 401/403 means the team's key is accepted again.
fn resume_if_refused(shared: &Shared, team: &Team) {
    if !team.refused() {
        return;
    }
    info!(team = %team.id, "the API accepts the team's key again: resuming");
    let probe = shared.cfg.auth_probe_interval;
    team.set_refused(false, &shared.health, &shared.teams, probe);
    shared.wake.notify_one();
}

/// One send of the batch's stored bytes under its key, within the team's concurrency limit,
/// which learns from the answer, once the team's 429 pause and request ceiling let it go. With
/// how long the request took (its waits for a turn left out). `None`: an operator paused the
/// batch's lane while it waited for its turn; it was not sent.
async fn send(shared: &Shared, team: &Team, batch: &LeasedBatch) -> Option<(Exchange, Duration)> {
    let _slot = team.concurrency.acquire().await;
    loop {
        team.client.wait_turn().await;
        // The waits above can be long (a concurrency slot behind slow requests, a 429's pause
        // of up to `http.max_retry_after`, the request ceiling): an operator's pause that came
        // meanwhile still holds the batch back, and nothing goes out later than one poll
        // interval after it. A failed read is logged, and the pauses as last read hold.
        let _ = shared.pauses.refresh(&shared.store).await;
        if lane_paused(shared, team, batch) {
            return None;
        }
        // That read is a database round trip: a 429 answered to another batch of the team
        // meanwhile has paused it, and this batch waits its turn again rather than go out
        // inside the pause.
        if !team.client.is_paused() {
            break;
        }
    }
    // Right before the request, after every wait: a process killed here leaves a stored batch
    // that was never sent.
    crash_point!("before_send");
    Health::count(&shared.health.sends, 1);
    let started = Instant::now();
    let exchange = team
        .client
        .send_to(
            batch.object_type,
            batch.operation,
            &batch.idempotency_key,
            batch.body.clone(),
        )
        .await;
    let took = started.elapsed();
    team.concurrency.observe(match &exchange {
        Exchange::Answered(a) if a.status == 429 || a.status == 503 => Signal::Pushback,
        Exchange::Answered(a) if a.status < 500 => Signal::Fine,
        Exchange::Unreadable { .. } => Signal::Fine,
        Exchange::Failed {
            kind: classify::TransportFailure::Timeout,
            ..
        } => Signal::Pushback,
        _ => Signal::Neutral,
    });
    Some((exchange, took))
}
