//! The claimer: leases due stored batches (retries, lapsed leases) and claims new rows, and
//! keeps each team's buffer of ready batches (four per worker on Postgres, two on SQLite:
//! [`super::team::buffer_per_worker`], and at most `sync.max_buffer_bytes` of them), refilling
//! it once half of it is free, so that claims are large and a worker never waits for one. A
//! claim takes rows only up to its round's share of the free bytes ([`ByteBudget`]). A team
//! whose key is refused, or whose buffer is full, is left out of claims and leases (a refused
//! team gets one probe batch at a time), so it never holds the others back. Up to
//! `sync.claims_in_flight` claim rounds run at once while there is a backlog, each for its
//! share of the free room (set aside in [`super::holdings::Holdings`] before it claims, so
//! buffers never overfill).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Shared;
use super::holdings::{Reserved, Room};
use super::team::Team;
use crate::backoff::RetryPolicy;
use crate::batch::ByteBudget;
use crate::health::Health;
use crate::model::codes;
use crate::store::{ClaimRequest, DueRequest, Lane, LeasedBatch, StoreError};

/// How often a claim also looks for rows outside every lane (unknown team or object type).
const STRAYS_EVERY: Duration = Duration::from_secs(30);

/// What one claim round may do, settled when it starts.
struct Round {
    /// It sweeps strays and stranded batches (one round at a time does).
    strays: bool,
    /// It probes the refused teams' keys (one round at a time does).
    probe: bool,
    /// Its share of the teams' free buffer room, set aside until its batches are buffered.
    share: Reserved,
}

/// What a round that ended tells the loop.
struct RoundEnd {
    strays: bool,
    probe: bool,
    /// Batches it leased or claimed (all of them buffered by now).
    found: usize,
    /// What its claim saw, or why the round failed.
    filled: Result<Filled, StoreError>,
}

/// What a round's [`fill`] saw besides the batches it took.
#[derive(Debug, Default, Clone, Copy)]
struct Filled {
    /// Strays (rows of no lane) that went dead.
    strays_ended: usize,
    /// A lane it claimed from held a row waiting to be claimed, taken or not
    /// ([`crate::store::ClaimOutcome::waiting`]).
    waiting: bool,
}

/// How a round that ended went, for the loop.
#[derive(Debug, Clone, Copy)]
struct Seen {
    found: usize,
    waiting: bool,
}

/// The claim loop: rounds start on a wake-up (a batch moved on, a `NOTIFY`, a key accepted
/// again) or the poll interval, until `shutdown`. While rounds find work, up to
/// `sync.claims_in_flight` of them run at once (one while any team's key is refused), each
/// claiming for its share of the teams' free buffer room, so the next claim is under way while
/// the previous one's transaction commits; an idle loop runs one round at a time. A failed
/// round lets the others end, then waits for the database. At shutdown the rounds in flight
/// are awaited, so every batch they claimed is buffered (or, once the workers have stopped,
/// left to its lease).
pub(super) async fn run(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let mut rounds = FuturesUnordered::new();
    let mut db_failures: u32 = 0;
    let mut strays_due = Instant::now();
    // A round in flight sweeps strays; a round in flight probes refused keys.
    let (mut sweeping, mut probing) = (false, false);
    // The last round that ended found work (at start: assume a backlog).
    let mut busy = true;
    let mut due = true;
    // Rounds in a row that found nothing: an idle claimer that listens polls less often.
    let mut empty_rounds: u32 = 0;
    loop {
        shared.health.tick();
        if shutdown.is_cancelled() {
            break;
        }
        if due {
            due = false;
            let width = if shared.teams.iter().any(|t| t.refused()) {
                1
            } else if busy {
                shared.claims_in_flight
            } else {
                1
            };
            while rounds.len() < width {
                let lone = rounds.is_empty();
                let share = share_of_room(shared, width - rounds.len());
                // Beyond the first, a round starts only to claim; the first also looks after
                // refused keys, strays and pauses when there is nothing to claim.
                if share.is_empty() && !lone {
                    break;
                }
                let strays = !sweeping && Instant::now() >= strays_due;
                let probe = !probing;
                let empty = share.is_empty();
                sweeping |= strays;
                probing |= probe;
                rounds.push(round(
                    shared,
                    Round {
                        strays,
                        probe,
                        share,
                    },
                ));
                if empty {
                    break;
                }
            }
        }
        let end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => continue,
            Some(end) = rounds.next(), if !rounds.is_empty() => end,
            _ = shared.wake.notified() => {
                due = true;
                continue;
            }
            _ = tokio::time::sleep(next_look(shared, empty_rounds)) => {
                looked(shared);
                due = true;
                continue;
            }
        };
        let seen = match ended(end, &mut sweeping, &mut probing, &mut strays_due) {
            Ok(seen) => seen,
            Err(e) => {
                // The other rounds end first (their batches are buffered); then nothing new
                // is claimed until the database answers again.
                while let Some(other) = rounds.next().await {
                    let _ = ended(other, &mut sweeping, &mut probing, &mut strays_due);
                }
                db_failures += 1;
                wait_for_database(shared, &e, db_failures, shutdown).await;
                due = true;
                continue;
            }
        };
        if db_failures > 0 {
            info!("database reachable again");
        }
        db_failures = 0;
        shared.health.set_db_ok(true);
        busy = seen.found > 0;
        empty_rounds = idle_rounds(empty_rounds, seen);
        due = busy && shared.teams.iter().any(|t| wants_work(shared, t));
    }
    // Shutdown: no new round; those in flight end, and their batches are buffered.
    while let Some(end) = rounds.next().await {
        let _ = ended(end, &mut sweeping, &mut probing, &mut strays_due);
    }
}

/// Sets aside the share of the teams' free buffer room for a round that starts while
/// `slots - 1` more may still start: of each team that wants work, its free room divided among
/// the slots (rounded up). Empty when no team wants work.
fn share_of_room(shared: &Shared, slots: usize) -> Reserved {
    let open: Vec<bool> = shared
        .teams
        .iter()
        .map(|t| may_claim(t) && !paused(shared, t))
        .collect();
    let teams = &shared.teams;
    shared.holdings.reserve(
        |team| teams[team].buffer_size(),
        |team, room| {
            if open[team] && teams[team].wants_refill(room) {
                Room {
                    places: room.places.div_ceil(slots.max(1)),
                    bytes: room.bytes.div_ceil(slots.max(1)),
                }
            } else {
                Room::default()
            }
        },
    )
}

/// One claim round: [`fill`] for its share, then its batches go to their teams' buffers, then
/// its share of the room is let go (the buffered batches take their places).
async fn round(shared: &Shared, round: Round) -> RoundEnd {
    let mut batches = Vec::new();
    let filled = fill(shared, &round, &mut batches).await;
    let found = batches.len();
    for batch in batches {
        dispatch(shared, batch);
    }
    drop(round.share);
    RoundEnd {
        strays: round.strays,
        probe: round.probe,
        found,
        filled,
    }
}

/// Takes note of a round that ended: whether a sweep or a probe is still in flight and when
/// strays are next due. Returns what it found, or its failure.
fn ended(
    end: RoundEnd,
    sweeping: &mut bool,
    probing: &mut bool,
    strays_due: &mut Instant,
) -> Result<Seen, StoreError> {
    if end.probe {
        *probing = false;
    }
    if end.strays {
        *sweeping = false;
    }
    let seen = |filled: &Filled| Seen {
        found: end.found,
        waiting: filled.waiting,
    };
    match end.filled {
        Ok(filled) if end.strays => {
            // A stray's later rows of the same record wait for it (per-record order), so a
            // sweep that ended strays is followed by another at once, until one ends none: a
            // chain of N strays ends in N rounds, not N × STRAYS_EVERY.
            *strays_due = if filled.strays_ended > 0 {
                Instant::now()
            } else {
                Instant::now() + STRAYS_EVERY
            };
            Ok(seen(&filled))
        }
        Ok(filled) => Ok(seen(&filled)),
        // A failed sweep is due again at once (`strays_due` unchanged).
        Err(e) => Err(e),
    }
}

impl Shared {
    /// Notes that the claimer must look again within `wait` at the latest: a lane a claim left
    /// lingering, or a retry this process wrote, comes due then. Rounds and workers overlap,
    /// so the soonest of their notes is kept, until the claimer's timer reaches it ([`looked`]).
    pub(super) fn look_again_in(&self, wait: Duration) {
        let at = Instant::now() + wait;
        let mut until = self.look_again_at.lock().unwrap_or_else(|e| e.into_inner());
        *until = Some(until.map_or(at, |noted| noted.min(at)));
    }
}

/// The rounds in a row that found nothing to do, after one that saw `seen`. A round that took
/// nothing while rows wait (another replica's claim locked them, their records' earlier rows
/// are in flight, or their retry is not yet due) counts as busy: no NOTIFY tells of such a row
/// becoming claimable, and a claimer that waited longer than the others for it would leave them
/// nearly all of a fleet's work. Only an outbox with nothing waiting in this claimer's lanes
/// lets the poll stretch.
fn idle_rounds(empty_rounds: u32, seen: Seen) -> u32 {
    if seen.found > 0 || seen.waiting {
        0
    } else {
        empty_rounds.saturating_add(1)
    }
}

/// How long an idle claimer sleeps between polls after `empty_rounds` claim rounds in a row
/// found nothing: `interval`, doubled with each such round up to `idle` while a `LISTEN` wakes
/// it on every committed change (`listening`), and `interval` otherwise (SQLite, or a lost
/// listener connection: nothing else would tell it of new rows).
fn poll_wait(interval: Duration, idle: Duration, empty_rounds: u32, listening: bool) -> Duration {
    if !listening {
        return interval;
    }
    let doubled = interval.saturating_mul(1u32 << empty_rounds.min(16));
    doubled.min(idle.max(interval))
}

/// How long the claimer waits for a wake-up: the poll wait, or less when a lingering tail or
/// a retry comes due sooner, so that it goes on time and never waits for ever.
fn next_look(shared: &Shared, empty_rounds: u32) -> Duration {
    let cfg = &shared.cfg;
    let listening = shared.listening.load(std::sync::atomic::Ordering::Relaxed);
    let wait = poll_wait(
        cfg.poll_interval,
        cfg.poll_idle_interval,
        empty_rounds,
        listening,
    );
    let until = *shared
        .look_again_at
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match until {
        Some(at) => wait.min(at.saturating_duration_since(Instant::now())),
        None => wait,
    }
}

/// The timer went off: a note it reached is used up (the round it starts claims what is due
/// and notes again what still lingers), so an empty claim cannot spin on it. When every claim
/// slot is taken no round starts, but the rounds in flight claim and note again; a tail whose
/// note they missed waits at most one more poll wait.
fn looked(shared: &Shared) {
    let mut until = shared
        .look_again_at
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if until.is_some_and(|at| at <= Instant::now()) {
        *until = None;
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

/// Free room in the team's buffer (not taken by a buffered batch nor set aside by a round).
fn room(shared: &Shared, team: &Team) -> Room {
    shared.holdings.room(team.index, team.buffer_size())
}

/// Whether the claimer may fetch for `team` at all: its key is accepted and the API has not
/// asked it to pause (a 429 storm does not turn its whole backlog into waiting batches).
fn may_claim(team: &Team) -> bool {
    !team.refused() && !team.client.is_paused()
}

/// Whether the claimer should fetch more for `team`: it may claim, and at least half of its
/// buffer (places and bytes) is free.
fn wants_work(shared: &Shared, team: &Team) -> bool {
    may_claim(team) && team.wants_refill(room(shared, team))
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
/// left of the round's share of each team's free room, into `batches`. A team whose key is
/// refused gets one probe at a time (see [`probe_refused`], in the one round that probes) and
/// no other claims. Batches leased before a step failed stay in `batches`: they are ours, and
/// dropping them would leave them waiting for their lease to lapse. Returns how many strays
/// (rows of no lane) went dead, and whether the claim saw rows waiting.
async fn fill(
    shared: &Shared,
    round: &Round,
    batches: &mut Vec<LeasedBatch>,
) -> Result<Filled, StoreError> {
    let cfg = &shared.cfg;
    let strays = round.strays;
    let read = shared.pauses.refresh(&shared.store).await;
    if !shared.pauses.known() {
        // The operators' pauses could not be read yet: a paused lane would look open, so
        // nothing is claimed. The read's error is this round's (readiness and the database
        // backoff then say so), not a quiet round.
        read?;
        return Ok(Filled::default());
    }
    if round.probe {
        probe_refused(shared, batches).await?;
    }
    if strays {
        end_stranded(shared).await?;
    }
    let open: Vec<&Arc<Team>> = shared
        .teams
        .iter()
        .filter(|t| round.share.places(t.index) > 0 && may_claim(t) && !paused(shared, t))
        .collect();
    if open.is_empty() && !strays {
        return Ok(Filled::default());
    }
    // Stored batches due again, team by team up to each team's free places: leased together
    // under one limit, a team with many due retries took the whole round's share and filled
    // its buffer past its size while another team's waited for the next round.
    let mut left = 0;
    let mut lanes = Vec::new();
    let mut budget = ByteBudget::default();
    for team in &open {
        let places = round.share.places(team.index);
        let (team_lanes, skip_lanes) = lanes_of(shared, &[team]);
        let due = shared
            .store
            .lease_due_batches(&DueRequest {
                owner: &cfg.owner,
                lease: cfg.lease,
                limit: places,
                teams: &team.keys,
                skip_lanes: &skip_lanes,
            })
            .await?;
        // The due batches' bytes come out of the round's share of the buffer's bytes; the
        // claim takes new rows only up to what is left.
        let bytes = round
            .share
            .bytes(team.index)
            .saturating_sub(due.iter().map(|b| b.body.len()).sum());
        if due.len() < places && bytes > 0 {
            left += places - due.len();
            lanes.extend(team_lanes);
            budget.allow(&team.keys, bytes);
        }
        batches.extend(due);
    }
    if left > 0 || strays {
        let max_records = left.max(1) * cfg.limits.batch_size;
        let (claimed, filled) = claim(
            shared,
            &lanes,
            max_records,
            Some(&budget),
            strays,
            cfg.linger,
        )
        .await?;
        batches.extend(claimed);
        return Ok(filled);
    }
    Ok(Filled::default())
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
            let probe = claim(
                shared,
                &lanes,
                cfg.limits.batch_size,
                None,
                false,
                Duration::ZERO,
            );
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
/// batches leased to us, up to `max_records` heads and each team's bytes in `budget`; also
/// returns how many strays went dead (an unknown team or object type: no lane holds such a
/// row) and whether a lane held rows waiting. A flowing lane's
/// partial tail may wait `linger` to fill (see [`crate::linger`]); when one does, the soonest
/// is noted for [`next_look`].
async fn claim(
    shared: &Shared,
    lanes: &[Lane],
    max_records: usize,
    budget: Option<&ByteBudget>,
    strays: bool,
    linger: Duration,
) -> Result<(Vec<LeasedBatch>, Filled), StoreError> {
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
                max_bytes: budget,
                strays,
            },
            linger,
        )
        .await?;
    if let Some(wait) = claimed.lingering.filter(|_| !linger.is_zero()) {
        shared.look_again_in(wait);
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
    let filled = Filled {
        strays_ended,
        waiting: claimed.waiting,
    };
    Ok((claimed.batches, filled))
}

/// Ends the open batches of teams no longer configured (see
/// [`crate::store::Store::end_stranded_batches`]).
async fn end_stranded(shared: &Shared) -> Result<(), StoreError> {
    // Rows below a lane's floor that no claim reaches (Postgres; rarely, see the call).
    shared.store.audit_floors().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_claimer_that_listens_polls_less_often_up_to_the_idle_interval() {
        let (interval, idle) = (50 * MS, 1000 * MS);
        let waits: Vec<Duration> = (0..8).map(|n| poll_wait(interval, idle, n, true)).collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1000, 1000, 1000].map(|ms| ms * MS),
        );
        // However long it has been idle: no overflow, and never past the idle interval.
        assert_eq!(poll_wait(interval, idle, u32::MAX, true), idle);
    }

    #[test]
    fn only_rounds_that_see_nothing_waiting_count_as_idle() {
        let nothing = Seen {
            found: 0,
            waiting: false,
        };
        let took = Seen {
            found: 2,
            waiting: true,
        };
        let left_waiting = Seen {
            found: 0,
            waiting: true,
        };
        assert_eq!(idle_rounds(0, nothing), 1);
        assert_eq!(idle_rounds(5, nothing), 6);
        assert_eq!(idle_rounds(u32::MAX, nothing), u32::MAX);
        assert_eq!(idle_rounds(5, took), 0);
        // Rows wait that this claimer could not take (locked elsewhere, held back, not due).
        assert_eq!(idle_rounds(5, left_waiting), 0);
    }

    #[test]
    fn without_a_listener_or_with_work_the_claimer_polls_at_the_interval() {
        let (interval, idle) = (50 * MS, 1000 * MS);
        // SQLite, or a lost LISTEN: nothing else tells it of new rows.
        assert_eq!(poll_wait(interval, idle, 10, false), interval);
        // The last round found work.
        assert_eq!(poll_wait(interval, idle, 0, true), interval);
        // An idle interval below the interval counts as the interval.
        assert_eq!(poll_wait(interval, 10 * MS, 10, true), interval);
    }
}
