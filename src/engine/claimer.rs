//! The claimer: leases due stored batches (retries, lapsed leases) and claims new rows, and
//! keeps each team's buffer of up to `max_in_flight` ready batches, refilling it once it is
//! half empty, so that claims are large and a worker never waits for one. A team whose key is
//! refused, or whose buffer is full, is left out of claims and leases (a refused team gets one
//! probe batch at a time), so it never holds the others back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Shared;
use super::team::Team;
use crate::backoff::RetryPolicy;
use crate::health::Health;
use crate::model::codes;
use crate::store::{ClaimRequest, DueRequest, Lane, LeasedBatch, StoreError};

/// How often a claim also looks for rows outside every lane (unknown team or object type).
const STRAYS_EVERY: Duration = Duration::from_secs(30);

/// The claim loop: one round per wake-up (a batch moved on, a `NOTIFY`, a key accepted again)
/// or poll interval, until `shutdown`.
pub(super) async fn run(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let mut db_failures: u32 = 0;
    let mut strays_due = Instant::now();
    loop {
        shared.health.tick();
        if shutdown.is_cancelled() {
            return;
        }
        let strays = Instant::now() >= strays_due;
        let mut batches = Vec::new();
        let filled = fill(shared, strays, &mut batches).await;
        let found = batches.len();
        for batch in batches {
            dispatch(shared, batch);
        }
        let strays_ended = match filled {
            Ok(n) => n,
            Err(e) => {
                db_failures += 1;
                wait_for_database(shared, &e, db_failures, shutdown).await;
                continue;
            }
        };
        if db_failures > 0 {
            info!("database reachable again");
        }
        db_failures = 0;
        shared.health.set_db_ok(true);
        if strays {
            // A stray's later rows of the same record wait for it (per-record order), so a
            // sweep that ended strays is followed by another at once, until one ends none: a
            // chain of N strays ends in N rounds, not N × STRAYS_EVERY.
            strays_due = if strays_ended > 0 {
                Instant::now()
            } else {
                Instant::now() + STRAYS_EVERY
            };
        }
        if found > 0 && shared.teams.iter().any(|t| wants_work(shared, t)) {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {},
            _ = shared.wake.notified() => {},
            _ = tokio::time::sleep(next_look(shared)) => {},
        }
    }
}

/// Notes when the soonest lane a claim left lingering must be looked at again (`None`: no
/// lane lingers).
fn note_lingering(shared: &Shared, lingering: Option<Duration>) {
    *shared
        .lingering_until
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = lingering.map(|d| Instant::now() + d);
}

/// How long an idle claimer sleeps: the poll interval, or less when a lingering tail comes due
/// sooner, so that it goes on time and never waits for ever. The note is used once: the next
/// claim notes again what still lingers, and a round that claimed nothing cannot spin on it.
fn next_look(shared: &Shared) -> Duration {
    let until = shared
        .lingering_until
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match until {
        Some(at) => shared
            .cfg
            .poll_interval
            .min(at.saturating_duration_since(Instant::now())),
        None => shared.cfg.poll_interval,
    }
}

/// After a failed claim round: nothing new is sent until the database is back; the wait grows
/// with the failures in a row.
async fn wait_for_database(
    shared: &Shared,
    e: &StoreError,
    failures: u32,
    shutdown: &CancellationToken,
) {
    shared.health.set_db_ok(false);
    let wait = RetryPolicy {
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(10),
    }
    .ceiling(failures);
    warn!(error = %e, retry_in = ?wait, "cannot claim work: the database is unavailable; nothing new is sent until it is back");
    tokio::select! {
        _ = tokio::time::sleep(wait) => {},
        _ = shutdown.cancelled() => {},
    }
}

/// Free places in the team's buffer.
fn room(shared: &Shared, team: &Team) -> usize {
    team.max_in_flight
        .saturating_sub(shared.holdings.buffered(team.index))
}

/// Whether the claimer should fetch more for `team`: its key is accepted, the API has not asked
/// it to pause (a 429 storm does not turn its whole backlog into waiting batches), and at least
/// half of its buffer is free.
fn wants_work(shared: &Shared, team: &Team) -> bool {
    !team.refused()
        && !team.client.is_paused()
        && room(shared, team) >= team.max_in_flight.div_ceil(2)
}

/// Hands a leased batch to its team's workers. A batch of a team this process does not know
/// (configuration changed since it was stored) cannot happen: claims and leases ask only for
/// known teams.
fn dispatch(shared: &Shared, batch: LeasedBatch) {
    let Some(team) = shared.team_of.get(&batch.team) else {
        error!(batch_id = %batch.id, team = %batch.team, "leased a batch of an unknown team; its lease lapses");
        return;
    };
    team.buffer(shared.holdings.buffer(batch, team.index));
}

/// Takes due stored batches first (retries, lapsed leases), then claims new rows for what is
/// left of each team's free room, into `batches`. A team whose key is refused gets one probe at
/// a time (see [`probe_refused`]) and no other claims. Batches leased before a step failed stay
/// in `batches`: they are ours, and dropping them would leave them waiting for their lease to
/// lapse. Returns how many strays (rows of no lane) went dead.
async fn fill(
    shared: &Shared,
    strays: bool,
    batches: &mut Vec<LeasedBatch>,
) -> Result<usize, StoreError> {
    let cfg = &shared.cfg;
    shared.pauses.refresh(&shared.store).await;
    probe_refused(shared, batches).await?;
    if strays {
        end_stranded(shared).await?;
    }
    let open: Vec<&Arc<Team>> = shared
        .teams
        .iter()
        .filter(|t| wants_work(shared, t) && !paused(shared, t))
        .collect();
    if open.is_empty() && !strays {
        return Ok(0);
    }
    let keys: Vec<String> = open.iter().flat_map(|t| t.keys.iter().cloned()).collect();
    let (lanes, skip_lanes) = lanes_of(shared, &open);
    let free: usize = open.iter().map(|t| room(shared, t)).sum();
    let due = shared
        .store
        .lease_due_batches(&DueRequest {
            owner: &cfg.owner,
            lease: cfg.lease,
            limit: free,
            teams: &keys,
            skip_lanes: &skip_lanes,
        })
        .await?;
    let left = free.saturating_sub(due.len());
    batches.extend(due);
    if left > 0 || strays {
        let max_records = left.max(1) * cfg.limits.batch_size;
        let (claimed, strays_ended) =
            claim(shared, &lanes, max_records, strays, cfg.linger).await?;
        batches.extend(claimed);
        return Ok(strays_ended);
    }
    Ok(0)
}

/// A refused team with nothing unanswered gets one probe of its key: a stored batch of its
/// re-sent under its key or, when it has none, one new batch every probe interval.
async fn probe_refused(shared: &Shared, batches: &mut Vec<LeasedBatch>) -> Result<(), StoreError> {
    let cfg = &shared.cfg;
    for team in shared
        .teams
        .iter()
        .filter(|t| t.refused() && !paused(shared, t))
    {
        if shared.holdings.unanswered(team.index) > 0 {
            continue;
        }
        let (lanes, skip_lanes) = lanes_of(shared, &[team]);
        let probe = shared
            .store
            .lease_due_batches(&DueRequest {
                owner: &cfg.owner,
                lease: cfg.lease,
                limit: 1,
                teams: &team.keys,
                skip_lanes: &skip_lanes,
            })
            .await?;
        if probe.is_empty() && team.take_probe(cfg.auth_probe_interval) {
            // A probe goes at once: it asks whether the key is accepted again.
            let probe = claim(shared, &lanes, cfg.limits.batch_size, false, Duration::ZERO);
            batches.extend(probe.await?.0);
        }
        batches.extend(probe);
    }
    Ok(())
}

/// Whether an operator paused `team` as a whole (`prism-sync pause --team`).
fn paused(shared: &Shared, team: &Team) -> bool {
    shared
        .pauses
        .team_paused(&team.id, team.keys.iter().any(String::is_empty))
}

/// The lanes of `teams` to claim from, and apart from them those an operator paused (left out
/// of claims and of due leases).
fn lanes_of(shared: &Shared, teams: &[&Arc<Team>]) -> (Vec<Lane>, Vec<Lane>) {
    let (mut open, mut held) = (Vec::new(), Vec::new());
    for team in teams {
        let default = team.keys.iter().any(String::is_empty);
        for lane in Lane::all_of(team.keys.iter().map(String::as_str)) {
            if shared
                .pauses
                .lane_paused(&team.id, default, lane.object_type)
            {
                held.push(lane);
            } else {
                open.push(lane);
            }
        }
    }
    (open, held)
}

/// Claims new rows of `lanes` (and, with `strays`, rows of no lane, which go dead) into stored
/// batches leased to us; also returns how many strays went dead (an unknown team or object
/// type: no lane holds such a row). A flowing lane's partial tail may wait `linger` to fill
/// (see [`crate::linger`]); when one does, the soonest is noted for [`next_look`].
async fn claim(
    shared: &Shared,
    lanes: &[Lane],
    max_records: usize,
    strays: bool,
    linger: Duration,
) -> Result<(Vec<LeasedBatch>, usize), StoreError> {
    let cfg = &shared.cfg;
    let started = Instant::now();
    let claimed = shared
        .store
        .claim_filled(
            &ClaimRequest {
                owner: &cfg.owner,
                lease: cfg.lease,
                max_records,
                limits: cfg.limits,
                lanes,
                teams: &shared.team_set,
                strays,
            },
            linger,
        )
        .await?;
    if !linger.is_zero() {
        note_lingering(shared, claimed.lingering);
    }
    metrics::histogram!("prism_sync_db_duration_seconds", "op" => "claim")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("prism_sync_batches_claimed_total").increment(claimed.batches.len() as u64);
    crash_point!("after_claim");
    for dead in &claimed.dead {
        warn!(row = dead.id, code = dead.code, reason = %dead.message, "row cannot be sent: dead");
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(1);
        metrics::counter!("prism_sync_item_errors_total", "code" => dead.code).increment(1);
    }
    Health::count(&shared.health.rows_dead, claimed.dead.len() as u64);
    let strays_ended = claimed
        .dead
        .iter()
        .filter(|d| d.code == codes::UNKNOWN_TEAM || d.code == codes::INVALID_OBJECT_TYPE)
        .count();
    Ok((claimed.batches, strays_ended))
}

/// Ends the open batches of teams no longer configured (see
/// [`crate::store::Store::end_stranded_batches`]).
async fn end_stranded(shared: &Shared) -> Result<(), StoreError> {
    let dead = shared.store.end_stranded_batches(&shared.team_set).await?;
    if dead > 0 {
        warn!(
            rows = dead,
            "stored batches of a team that is no longer configured: their rows are dead as unknown_team (replay them once the team is back)"
        );
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_item_errors_total", "code" => codes::UNKNOWN_TEAM)
            .increment(dead);
        Health::count(&shared.health.rows_dead, dead);
    }
    Ok(())
}
