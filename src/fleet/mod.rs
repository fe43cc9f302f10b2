//! The replicas of one database act as one fleet.
//!
//! - **Registry.** Each `run` process registers in `prism_replicas` and heartbeats (one UPSERT
//!   every `fleet.heartbeat`, by the database's clock) with what it holds; a clean stop
//!   deregisters; `status` and `top` list the entries and flag the silent ones.
//! - **Shared ceiling.** A team's `max_requests_per_second` holds for the whole fleet: a
//!   [`TeamGate`] reserves a few send slots at a time from the team's row in
//!   `prism_team_gates` (a token bucket kept as its next free slot, moved on by the database's
//!   clock), so the database is asked about once per chunk, not per request. Without slots
//!   (the database unreachable) nothing is sent: the ceiling is never exceeded.
//! - **Shared pause.** A 429's pause is written to the same row; every replica learns it on
//!   its next reservation or within a second from [`run`]'s poll, and waits it out too.

pub mod top;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::Store;
use crate::store::fleet::{ReplicaBeat, SlotGrant, TeamLoad};

/// How often a replica reads the fleet's pauses (besides learning them when it reserves).
const PAUSE_POLL: Duration = Duration::from_secs(1);
/// Entries silent this long are deleted every this many heartbeats (not on every one: the
/// DELETE scans the registry).
const PRUNE_EVERY_BEATS: u64 = 12;

/// One team's share of the fleet: its request ceiling and its server-requested pause, both
/// kept in the database so that every replica obeys them.
#[derive(Debug)]
pub struct TeamGate {
    store: Store,
    team: String,
    /// One request per this, fleet-wide; `None`: no ceiling (the pause still holds).
    interval: Option<Duration>,
    /// Slots reserved per database round trip: about a tenth of a second's worth, so that the
    /// burst a replica can hold back stays small.
    chunk: u32,
    /// Slots this replica reserved and has not used. Locked across a reservation, so that one
    /// replica's workers reserve one chunk at a time.
    slots: tokio::sync::Mutex<Slots>,
    /// The fleet's pause for this team as last read from the database.
    paused_until: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Slots {
    times: VecDeque<Instant>,
    /// Reservations failed in a row (database unreachable).
    failures: u32,
    /// Where the database's clock lies on this process's.
    clock: Option<ClockAnchor>,
}

/// How long a clock anchor is trusted before a slower reading may replace it (clocks drift
/// apart by parts per million: microseconds in this time).
const ANCHOR_MAX_AGE: Duration = Duration::from_secs(10);

/// One reading of the database's clock against this process's: the database read `db` (seconds
/// since the Unix epoch) at about `local`, the middle of a round trip of `rtt` (so within
/// `rtt / 2` of it). The reading with the shortest round trip lately is kept, so that slots are
/// placed by the database's clock within about half a quiet round trip, however late a
/// particular answer arrives. Placed by the answer's arrival instead, a slow answer (a busy
/// server or host) put a replica's slots late, on top of the next replica's: 25 and 26 requests
/// in one second under a ceiling of 20 (`tests/fleet.rs`).
#[derive(Debug, Clone, Copy)]
struct ClockAnchor {
    local: Instant,
    db: f64,
    rtt: Duration,
}

impl ClockAnchor {
    /// Takes a reading (the round trip from `sent` to `received`, during which the database's
    /// clock read `db`) and returns when, on this process's clock, the database's read `db`.
    fn place(
        anchor: &mut Option<ClockAnchor>,
        sent: Instant,
        received: Instant,
        db: f64,
    ) -> Instant {
        let rtt = received.saturating_duration_since(sent);
        let reading = ClockAnchor {
            local: sent + rtt / 2,
            db,
            rtt,
        };
        let kept = match *anchor {
            Some(a) if a.rtt < rtt && a.local.elapsed() < ANCHOR_MAX_AGE => a,
            _ => reading,
        };
        let at = kept.at(db);
        // The database read `db` during the round trip: a placement outside it (beyond the
        // anchor's own uncertainty) means a clock moved; start again from this reading.
        let slack = kept.rtt;
        if at + slack < sent || at > received + slack {
            *anchor = Some(reading);
            return reading.local;
        }
        *anchor = Some(kept);
        at
    }

    /// When, on this process's clock, the database's clock reads `db`.
    fn at(&self, db: f64) -> Instant {
        let offset = db - self.db;
        if offset >= 0.0 {
            self.local + Duration::from_secs_f64(offset)
        } else {
            self.local
                .checked_sub(Duration::from_secs_f64(-offset))
                .unwrap_or(self.local)
        }
    }
}

/// What a sender must do before its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Send now.
    Go,
    /// Wait this long, then ask again (a fleet pause, or no slot could be reserved).
    Wait(Duration),
}

impl TeamGate {
    /// A gate for `team`; `max_requests_per_second` 0 means no ceiling.
    pub fn new(store: Store, team: &str, max_requests_per_second: f64) -> TeamGate {
        let limited = max_requests_per_second > 0.0 && max_requests_per_second.is_finite();
        TeamGate {
            store,
            team: team.to_owned(),
            interval: limited.then(|| Duration::from_secs_f64(1.0 / max_requests_per_second)),
            chunk: chunk_for(max_requests_per_second),
            slots: tokio::sync::Mutex::new(Slots::default()),
            paused_until: Mutex::new(None),
        }
    }

    pub fn team(&self) -> &str {
        &self.team
    }

    /// How much longer the fleet's pause of this team runs, if it does.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().expect("pause lock"))?;
        until.checked_duration_since(Instant::now())
    }

    /// Takes a pause the database reported (`remaining` seconds from now).
    fn learn_pause(&self, remaining: f64) {
        if remaining <= 0.0 || !remaining.is_finite() {
            return;
        }
        let until = Instant::now() + Duration::from_secs_f64(remaining.min(86_400.0));
        let mut paused = self.paused_until.lock().expect("pause lock");
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// Tells every replica to hold the team's sends back for `delay` (a 429's pause). Written
    /// in the background: the caller pauses itself at once; a failed write is logged, and the
    /// other replicas then learn of the API's pushback from their own 429s.
    pub fn share_pause(self: &Arc<Self>, delay: Duration) {
        self.learn_pause(delay.as_secs_f64());
        let gate = self.clone();
        tokio::spawn(async move {
            if let Err(e) = gate.store.share_throttle(&gate.team, delay).await {
                warn!(team = %gate.team, error = %e, "could not share the API's pause with the other replicas");
            }
        });
    }

    /// Waits for this request's send slot under the fleet-wide ceiling. `Go` once it is time;
    /// `Wait` when the team is paused or no slot could be had (then nothing may be sent).
    pub async fn take_turn(&self) -> Turn {
        if let Some(pause) = self.paused_for() {
            return Turn::Wait(pause);
        }
        let Some(interval) = self.interval else {
            return Turn::Go;
        };
        let slot = {
            let mut slots = self.slots.lock().await;
            let now = Instant::now();
            // A slot left unused for more than an interval is dropped: sending on it late would
            // bunch this replica's requests up against the next replica's slots.
            while slots.times.front().is_some_and(|t| *t + interval < now) {
                slots.times.pop_front();
            }
            if slots.times.is_empty() {
                match self.reserve(interval, &mut slots).await {
                    Ok(()) => {}
                    Err(wait) => return Turn::Wait(wait),
                }
            }
            slots.times.pop_front()
        };
        match slot {
            Some(at) => {
                tokio::time::sleep_until(at.into()).await;
                // A pause learnt while waiting wins over the slot (which is then lost).
                match self.paused_for() {
                    Some(pause) => Turn::Wait(pause),
                    None => Turn::Go,
                }
            }
            None => Turn::Wait(interval),
        }
    }

    /// Reserves the next chunk of slots into `slots`; `Err(wait)` when the team is paused or
    /// the database could not be asked.
    async fn reserve(&self, interval: Duration, slots: &mut Slots) -> Result<(), Duration> {
        let sent = Instant::now();
        match self
            .store
            .reserve_send_slots(&self.team, self.chunk, interval)
            .await
        {
            Ok(SlotGrant::Granted {
                count,
                first_in,
                db_now,
            }) => {
                if slots.failures > 0 {
                    info!(team = %self.team, "request slots can be reserved again: sending");
                }
                slots.failures = 0;
                metrics::counter!("prism_sync_fleet_slot_reservations_total").increment(1);
                // The slots lie on the database's clock: placed by it, not by when the answer
                // came, so that a slow answer does not push them onto other replicas' slots.
                // Slots already past when it came are dropped by `take_turn` (more than an
                // interval late) or used at once.
                let db_at = ClockAnchor::place(&mut slots.clock, sent, Instant::now(), db_now);
                let first = db_at + Duration::from_secs_f64(first_in);
                slots.times.extend((0..count).map(|k| first + interval * k));
                Ok(())
            }
            Ok(SlotGrant::Paused { remaining }) => {
                self.learn_pause(remaining);
                Err(self.paused_for().unwrap_or(interval))
            }
            Err(e) => {
                slots.failures += 1;
                let wait = crate::backoff::RetryPolicy {
                    base_delay: Duration::from_millis(100),
                    max_delay: Duration::from_secs(5),
                }
                .ceiling(slots.failures);
                if slots.failures == 1 {
                    warn!(team = %self.team, error = %e, "cannot reserve request slots from the database: holding this team's sends until it answers (the fleet-wide ceiling is never exceeded)");
                } else {
                    debug!(team = %self.team, error = %e, retry_in = ?wait, "still cannot reserve request slots");
                }
                Err(wait)
            }
        }
    }
}

/// Gives every team's client its fleet gate (ceiling and pause shared through `store`);
/// returns the gates, for [`run`] to keep their pauses current.
pub fn join(store: &Store, clients: &mut [crate::engine::TeamClient]) -> Vec<Arc<TeamGate>> {
    clients
        .iter_mut()
        .map(|tc| {
            let gate = Arc::new(TeamGate::new(
                store.clone(),
                tc.client.team_id(),
                tc.client.max_requests_per_second(),
            ));
            tc.client.join_fleet(gate.clone());
            gate
        })
        .collect()
}

/// Slots per reservation: a tenth of a second's worth of the ceiling, at least one.
pub fn chunk_for(max_requests_per_second: f64) -> u32 {
    if max_requests_per_second.is_finite() && max_requests_per_second > 0.0 {
        (max_requests_per_second / 10.0).ceil().clamp(1.0, 1000.0) as u32
    } else {
        1
    }
}

/// What this replica holds right now, for its heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub batches_held: usize,
    pub teams: Vec<TeamLoad>,
}

/// How the registry knows this replica.
#[derive(Debug, Clone)]
pub struct Member {
    pub owner: String,
    pub host: String,
    pub heartbeat: Duration,
    pub forget_after: Duration,
}

impl Member {
    /// The host part of an engine owner name (`host:pid:random`).
    pub fn new(owner: &str, settings: &crate::settings::FleetSettings) -> Member {
        let host = owner.split(':').next().unwrap_or(owner).to_owned();
        Member {
            owner: owner.to_owned(),
            host,
            heartbeat: settings.heartbeat,
            forget_after: settings.forget_after,
        }
    }
}

/// Registers this replica, heartbeats with `load()` every `fleet.heartbeat`, and reads the
/// fleet's pauses into `gates` every second, until `stop`; then deregisters. Database errors
/// are logged and tried again on the next tick: the registry is for people, the engine does
/// not depend on it.
pub async fn run(
    store: Store,
    member: Member,
    load: impl Fn() -> Load + Send + 'static,
    gates: Vec<Arc<TeamGate>>,
    stop: CancellationToken,
) {
    let mut beats: u64 = 0;
    let mut next_beat = Instant::now();
    let mut beat_failed = false;
    loop {
        if Instant::now() >= next_beat {
            let now = load();
            let beat = ReplicaBeat {
                owner: &member.owner,
                host: &member.host,
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION"),
                heartbeat: member.heartbeat,
                batches_held: now.batches_held,
                teams: &now.teams,
            };
            let prune = beats
                .is_multiple_of(PRUNE_EVERY_BEATS)
                .then_some(member.forget_after);
            match store.heartbeat_replica(&beat, prune).await {
                Ok(()) => {
                    beat_failed = false;
                    beats += 1;
                    count_replicas(&store).await;
                }
                Err(e) if !beat_failed => {
                    beat_failed = true;
                    warn!(error = %e, "could not heartbeat in the replica registry; status shows this replica as silent until it can");
                }
                Err(_) => {}
            }
            next_beat += member.heartbeat;
        }
        read_pauses(&store, &gates).await;
        let tick = next_beat
            .saturating_duration_since(Instant::now())
            .min(PAUSE_POLL);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(tick) => {},
        }
    }
    match store.deregister_replica(&member.owner).await {
        Ok(()) => info!(owner = %member.owner, "left the replica registry"),
        Err(e) => {
            warn!(error = %e, "could not leave the replica registry; the entry shows as silent, then is forgotten")
        }
    }
}

/// `prism_sync_fleet_replicas{state="live"|"silent"}`: the registry as this replica sees it
/// (every replica exports the same numbers; alert on the max).
async fn count_replicas(store: &Store) {
    match store.replicas().await {
        Ok(all) => {
            let silent = all.iter().filter(|r| r.silent).count();
            metrics::gauge!("prism_sync_fleet_replicas", "state" => "live")
                .set((all.len() - silent) as f64);
            metrics::gauge!("prism_sync_fleet_replicas", "state" => "silent").set(silent as f64);
        }
        Err(e) => debug!(error = %e, "could not read the replica registry"),
    }
}

async fn read_pauses(store: &Store, gates: &[Arc<TeamGate>]) {
    if gates.is_empty() {
        return;
    }
    match store.throttle_pauses().await {
        Ok(pauses) => {
            for p in pauses {
                for gate in gates.iter().filter(|g| g.team == p.team) {
                    gate.learn_pause(p.remaining_seconds);
                }
            }
        }
        Err(e) => debug!(error = %e, "could not read the fleet's pauses"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_a_tenth_of_a_seconds_worth_and_at_least_one() {
        assert_eq!(chunk_for(20.0), 2);
        assert_eq!(chunk_for(8.0), 1);
        assert_eq!(chunk_for(0.5), 1);
        assert_eq!(chunk_for(1000.0), 100);
        assert_eq!(chunk_for(0.0), 1);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slots_are_placed_by_the_databases_clock_not_by_a_slow_answer() {
        let t0 = Instant::now();
        let mut anchor = None;
        // A quick answer (2 ms): the database's 1000.000 is placed mid-trip.
        let at = ClockAnchor::place(&mut anchor, t0, t0 + ms(2), 1000.0);
        assert_eq!(at, t0 + ms(1));
        // A second later the database reads 1001.000 at 1 ms into a trip whose answer takes
        // 300 ms: placed by the quick reading, not 150 ms (mid-trip) or 300 ms (the answer) late.
        let sent = t0 + ms(1000);
        let at = ClockAnchor::place(&mut anchor, sent, sent + ms(300), 1001.0);
        assert_eq!(at, t0 + ms(1001));
        // The slow reading did not replace the quick one.
        assert_eq!(anchor.map(|a| a.rtt), Some(ms(2)));
        // A quicker one does.
        let sent = t0 + ms(2000);
        let at = ClockAnchor::place(&mut anchor, sent, sent + ms(1), 1002.0005);
        assert_eq!(at, sent + Duration::from_micros(500));
        assert_eq!(anchor.map(|a| a.rtt), Some(ms(1)));
    }

    #[test]
    fn a_clock_that_moved_starts_the_anchor_again() {
        let t0 = Instant::now();
        let mut anchor = None;
        ClockAnchor::place(&mut anchor, t0, t0 + ms(2), 1000.0);
        // The database's clock stepped back 5 s: the anchor would place its reading long before
        // the trip began, so this reading becomes the anchor.
        let sent = t0 + ms(1000);
        let at = ClockAnchor::place(&mut anchor, sent, sent + ms(40), 996.0);
        assert_eq!(at, sent + ms(20));
        assert_eq!(anchor.map(|a| a.db), Some(996.0));
    }
}
