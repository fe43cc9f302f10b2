//! The fleet's statements on SQLite. Every write goes through the store's one writer, under
//! its gate, like the claims and outcome writes it queues with. Times are text in the outbox's
//! format, compared as text and measured with `julianday`.

use std::time::Duration;

use sqlx::Row;

use super::SqliteStore;
use crate::store::StoreResult;
use crate::store::fleet::{ReplicaBeat, ReplicaView, ThrottlePause, teams_of};

/// The database's clock as stored.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}
/// Seconds from the database's now until a stored time (negative: past).
macro_rules! seconds_until {
    ($col:literal) => {
        concat!("(julianday(", $col, ") - julianday('now')) * 86400.0")
    };
}

impl SqliteStore {
    /// Runs one write statement that returns a row, on the writer under the gate.
    async fn write_returning<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> StoreResult<sqlx::sqlite::SqliteRow> {
        let _gate = self.write_gate.lock().await;
        Ok(query.fetch_one(&self.writer).await?)
    }

    pub(crate) async fn heartbeat_replica(
        &self,
        beat: &ReplicaBeat<'_>,
        teams: &str,
        forget_after: Option<Duration>,
    ) -> StoreResult<()> {
        self.write_one(
            sqlx::query(concat!(
                "INSERT INTO prism_replicas
                   (owner, host, pid, version, heartbeat_seconds, batches_held, teams)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (owner) DO UPDATE SET last_seen_at = ",
                now!(),
                ", heartbeat_seconds = excluded.heartbeat_seconds,
                   batches_held = excluded.batches_held, teams = excluded.teams"
            ))
            .bind(beat.owner)
            .bind(beat.host)
            .bind(i64::from(beat.pid))
            .bind(beat.version)
            .bind(beat.heartbeat.as_secs_f64())
            .bind(i64::try_from(beat.batches_held).unwrap_or(i64::MAX))
            .bind(teams),
        )
        .await?;
        if let Some(after) = forget_after {
            self.write_one(
                sqlx::query(concat!(
                    "DELETE FROM prism_replicas WHERE ",
                    seconds_until!("last_seen_at"),
                    " < -?1"
                ))
                .bind(after.as_secs_f64()),
            )
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn deregister_replica(&self, owner: &str) -> StoreResult<()> {
        self.write_one(sqlx::query("DELETE FROM prism_replicas WHERE owner = ?1").bind(owner))
            .await?;
        Ok(())
    }

    pub(crate) async fn replicas(&self) -> StoreResult<Vec<ReplicaView>> {
        let rows = sqlx::query(concat!(
            "SELECT owner, host, pid, version, started_at, -",
            seconds_until!("last_seen_at"),
            ", heartbeat_seconds, batches_held, teams
             FROM prism_replicas ORDER BY started_at, owner"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaView {
                    owner: r.try_get(0)?,
                    host: r.try_get(1)?,
                    pid: r.try_get(2)?,
                    version: r.try_get(3)?,
                    started_at: r.try_get(4)?,
                    last_seen_seconds: r.try_get::<f64, _>(5)?.max(0.0),
                    heartbeat_seconds: r.try_get(6)?,
                    batches_held: r.try_get(7)?,
                    silent: false,
                    teams: teams_of(&r.try_get::<String, _>(8)?),
                })
            })
            .collect()
    }

    /// Moves the team's next free slot `span` seconds on (from now if it lies in the past),
    /// unless the team is paused; returns (seconds until the reserved span ends, seconds the
    /// pause still runs, the database's now in seconds since the Unix epoch).
    pub(crate) async fn reserve_send_slots(
        &self,
        team: &str,
        span: f64,
    ) -> StoreResult<(f64, f64, f64)> {
        let row = self
            .write_returning(
                sqlx::query(concat!(
                    "INSERT INTO prism_team_gates (team_id, next_send_at)
                     VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('%+.3f seconds', ?2)))
                     ON CONFLICT (team_id) DO UPDATE SET next_send_at = CASE
                       WHEN COALESCE(prism_team_gates.paused_until, '') > ",
                    now!(),
                    " THEN prism_team_gates.next_send_at
                       ELSE strftime('%Y-%m-%dT%H:%M:%fZ', max(prism_team_gates.next_send_at, ",
                    now!(),
                    "), printf('%+.3f seconds', ?2)) END
                     RETURNING ",
                    seconds_until!("next_send_at"),
                    ", COALESCE(",
                    seconds_until!("paused_until"),
                    ", 0.0), (julianday('now') - 2440587.5) * 86400.0"
                ))
                .bind(team)
                .bind(span),
            )
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    pub(crate) async fn share_throttle(&self, team: &str, delay: f64) -> StoreResult<()> {
        self.write_one(
            sqlx::query(
                "INSERT INTO prism_team_gates (team_id, paused_until)
                 VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('%+.3f seconds', ?2)))
                 ON CONFLICT (team_id) DO UPDATE SET paused_until =
                   max(COALESCE(prism_team_gates.paused_until, ''), excluded.paused_until)",
            )
            .bind(team)
            .bind(delay),
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn throttle_pauses(&self) -> StoreResult<Vec<ThrottlePause>> {
        let rows = sqlx::query(concat!(
            "SELECT team_id, ",
            seconds_until!("paused_until"),
            " FROM prism_team_gates WHERE paused_until > ",
            now!(),
            " ORDER BY team_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ThrottlePause {
                    team: r.try_get(0)?,
                    remaining_seconds: r.try_get::<f64, _>(1)?.max(0.0),
                })
            })
            .collect()
    }
}
