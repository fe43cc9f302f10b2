//! The fleet's tables (`prism_replicas`, `prism_team_gates`): the replica registry and each
//! team's shared request ceiling and server-requested pause. The algorithms are in
//! `crate::fleet`; the statements of each engine in `sqlite/fleet.rs` and `postgres/fleet.rs`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Store, StoreResult};

/// What a replica tells the fleet on each heartbeat.
#[derive(Debug, Clone)]
pub struct ReplicaBeat<'a> {
    /// The engine's owner name (`host:pid:random`), as on its batch leases.
    pub owner: &'a str,
    pub host: &'a str,
    pub pid: u32,
    pub version: &'a str,
    /// How often this replica heartbeats: it counts as silent after three of these.
    pub heartbeat: Duration,
    pub batches_held: usize,
    pub teams: &'a [TeamLoad],
}

/// One team as a replica sends for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeamLoad {
    /// The team id (`micro.team_id` for the default team).
    pub team: String,
    /// The adaptive concurrency limit right now (requests on the wire at once).
    pub concurrency: usize,
    pub max_in_flight: usize,
    /// The team's fleet-wide request ceiling as this replica has it configured (0: none).
    pub max_requests_per_second: f64,
}

/// A registered replica, as `status` and `top` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    pub owner: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub last_seen_seconds: f64,
    pub heartbeat_seconds: f64,
    pub batches_held: i64,
    /// Not seen for more than [`SILENT_AFTER_BEATS`] of its heartbeat intervals: it crashed,
    /// hangs or cannot reach the database.
    pub silent: bool,
    pub teams: Vec<TeamLoad>,
}

/// A replica is silent once it missed this many heartbeats.
pub const SILENT_AFTER_BEATS: f64 = 3.0;

impl ReplicaView {
    pub(crate) fn flag_silent(mut self) -> ReplicaView {
        self.silent = self.last_seen_seconds > SILENT_AFTER_BEATS * self.heartbeat_seconds;
        self
    }
}

/// Send slots reserved from a team's shared ceiling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlotGrant {
    /// `count` slots, the first `first_in` seconds from the database's now (0 or more), the
    /// others one interval apart. `db_now` is that now, in seconds since the Unix epoch by the
    /// database's clock, so that a replica can place the slots by the database's clock rather
    /// than by when the answer reached it ([`crate::fleet::TeamGate`]).
    Granted {
        count: u32,
        first_in: f64,
        db_now: f64,
    },
    /// The team is paused (a 429 told some replica to wait) for this many more seconds:
    /// nothing was reserved.
    Paused { remaining: f64 },
}

/// A server-requested pause of a team that is still running.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThrottlePause {
    pub team: String,
    pub remaining_seconds: f64,
}

/// Slot spans are stored with millisecond precision: rounded up, so that rounding never lets
/// the fleet send faster than its ceiling.
pub(crate) fn span_seconds(count: u32, interval: Duration) -> f64 {
    (interval.as_secs_f64() * f64::from(count) * 1000.0).ceil() / 1000.0
}

/// What [`Store::reserve_send_slots`] reads back: when the team's reserved span ends, and how
/// long it stays paused (0 or less: not paused), both in seconds from the database's now,
/// `db_now` (seconds since the Unix epoch).
pub(crate) fn grant(
    count: u32,
    interval: Duration,
    (ends_in, paused_for, db_now): (f64, f64, f64),
) -> SlotGrant {
    if paused_for > 0.0 {
        SlotGrant::Paused {
            remaining: paused_for,
        }
    } else {
        SlotGrant::Granted {
            count,
            first_in: (ends_in - span_seconds(count, interval)).max(0.0),
            db_now,
        }
    }
}

impl Store {
    /// Registers `beat.owner` or refreshes its entry (one UPSERT, `last_seen` from the
    /// database's clock). With `forget_after`, also deletes the entries silent for longer.
    pub async fn heartbeat_replica(
        &self,
        beat: &ReplicaBeat<'_>,
        forget_after: Option<Duration>,
    ) -> StoreResult<()> {
        let teams = serde_json::to_string(beat.teams).unwrap_or_else(|_| "[]".into());
        match self {
            Store::Sqlite(s) => s.heartbeat_replica(beat, &teams, forget_after).await,
            Store::Postgres(s) => s.heartbeat_replica(beat, &teams, forget_after).await,
        }
    }

    /// Removes `owner` from the registry (a clean stop).
    pub async fn deregister_replica(&self, owner: &str) -> StoreResult<()> {
        match self {
            Store::Sqlite(s) => s.deregister_replica(owner).await,
            Store::Postgres(s) => s.deregister_replica(owner).await,
        }
    }

    /// The registered replicas, longest running first, silent ones flagged.
    pub async fn replicas(&self) -> StoreResult<Vec<ReplicaView>> {
        let replicas = match self {
            Store::Sqlite(s) => s.replicas().await?,
            Store::Postgres(s) => s.replicas().await?,
        };
        Ok(replicas.into_iter().map(ReplicaView::flag_silent).collect())
    }

    /// Reserves `count` send slots of `team`'s fleet-wide ceiling, one `interval` apart, at the
    /// earliest free time by the database's clock; nothing while the team is paused.
    pub async fn reserve_send_slots(
        &self,
        team: &str,
        count: u32,
        interval: Duration,
    ) -> StoreResult<SlotGrant> {
        let span = span_seconds(count, interval);
        let read = match self {
            Store::Sqlite(s) => s.reserve_send_slots(team, span).await?,
            Store::Postgres(s) => s.reserve_send_slots(team, span).await?,
        };
        Ok(grant(count, interval, read))
    }

    /// Pauses every replica's sends for `team` for `delay` from the database's now (or longer,
    /// if a longer pause is already set).
    pub async fn share_throttle(&self, team: &str, delay: Duration) -> StoreResult<()> {
        match self {
            Store::Sqlite(s) => s.share_throttle(team, delay.as_secs_f64()).await,
            Store::Postgres(s) => s.share_throttle(team, delay.as_secs_f64()).await,
        }
    }

    /// The server-requested pauses still running, by team.
    pub async fn throttle_pauses(&self) -> StoreResult<Vec<ThrottlePause>> {
        match self {
            Store::Sqlite(s) => s.throttle_pauses().await,
            Store::Postgres(s) => s.throttle_pauses().await,
        }
    }
}

/// Reads a `teams` column back; an entry this binary cannot read shows as no teams rather than
/// hiding the replica.
pub(crate) fn teams_of(json: &str) -> Vec<TeamLoad> {
    serde_json::from_str(json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_starts_one_span_before_the_reserved_span_ends() {
        let step = Duration::from_millis(50);
        assert_eq!(
            grant(2, step, (0.3, 0.0, 1e9)),
            SlotGrant::Granted {
                count: 2,
                first_in: 0.3 - 0.1,
                db_now: 1e9
            }
        );
        // The span just reserved from an idle bucket starts now.
        assert_eq!(
            grant(2, step, (0.1, -5.0, 1e9)),
            SlotGrant::Granted {
                count: 2,
                first_in: 0.0,
                db_now: 1e9
            }
        );
        assert_eq!(
            grant(2, step, (0.0, 1.5, 1e9)),
            SlotGrant::Paused { remaining: 1.5 }
        );
    }

    #[test]
    fn spans_round_up_to_the_millisecond() {
        assert_eq!(span_seconds(1, Duration::from_secs_f64(1.0 / 3.0)), 0.334);
        assert_eq!(span_seconds(2, Duration::from_millis(50)), 0.1);
    }

    #[test]
    fn a_replica_is_silent_after_three_missed_heartbeats() {
        let view = |last_seen_seconds| {
            ReplicaView {
                owner: "h:1:x".into(),
                host: "h".into(),
                pid: 1,
                version: "0".into(),
                started_at: String::new(),
                last_seen_seconds,
                heartbeat_seconds: 5.0,
                batches_held: 0,
                silent: false,
                teams: Vec::new(),
            }
            .flag_silent()
        };
        assert!(!view(14.0).silent);
        assert!(view(16.0).silent);
    }
}
