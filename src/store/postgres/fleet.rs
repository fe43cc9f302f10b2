//! The fleet's statements on Postgres: each one statement, on the pool. A reservation locks
//! its team's gate row for the length of one UPDATE, so replicas take their slots in turn.

use std::time::Duration;

use sqlx::Row;

use super::PgStore;
use crate::store::StoreResult;
use crate::store::fleet::{ReplicaBeat, ReplicaView, ThrottlePause, teams_of};

impl PgStore {
    pub(crate) async fn heartbeat_replica(
        &self,
        beat: &ReplicaBeat<'_>,
        teams: &str,
        forget_after: Option<Duration>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO prism_replicas
               (owner, host, pid, version, heartbeat_seconds, batches_held, teams)
             VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
             ON CONFLICT (owner) DO UPDATE SET last_seen_at = now(),
               heartbeat_seconds = EXCLUDED.heartbeat_seconds,
               batches_held = EXCLUDED.batches_held, teams = EXCLUDED.teams",
        )
        .bind(beat.owner)
        .bind(beat.host)
        .bind(i64::from(beat.pid))
        .bind(beat.version)
        .bind(beat.heartbeat.as_secs_f64())
        .bind(i64::try_from(beat.batches_held).unwrap_or(i64::MAX))
        .bind(teams)
        .execute(&self.pool)
        .await?;
        if let Some(after) = forget_after {
            sqlx::query(
                "DELETE FROM prism_replicas WHERE last_seen_at < now() - make_interval(secs => $1)",
            )
            .bind(after.as_secs_f64())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn deregister_replica(&self, owner: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM prism_replicas WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn replicas(&self) -> StoreResult<Vec<ReplicaView>> {
        let rows = sqlx::query(
            "SELECT owner, host, pid, version,
                    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    extract(epoch FROM now() - last_seen_at)::float8, heartbeat_seconds,
                    batches_held, teams::text
             FROM prism_replicas ORDER BY started_at, owner",
        )
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
    /// pause still runs).
    pub(crate) async fn reserve_send_slots(
        &self,
        team: &str,
        span: f64,
    ) -> StoreResult<(f64, f64, f64)> {
        let row = sqlx::query(
            "INSERT INTO prism_team_gates AS g (team_id, next_send_at)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (team_id) DO UPDATE SET next_send_at = CASE
               WHEN g.paused_until > now() THEN g.next_send_at
               ELSE greatest(g.next_send_at, now()) + make_interval(secs => $2) END
             RETURNING extract(epoch FROM next_send_at - now())::float8,
                       COALESCE(extract(epoch FROM paused_until - now()), 0)::float8,
                       extract(epoch FROM now())::float8",
        )
        .bind(team)
        .bind(span)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    pub(crate) async fn share_throttle(&self, team: &str, delay: f64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO prism_team_gates AS g (team_id, paused_until)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (team_id) DO UPDATE SET
               paused_until = greatest(g.paused_until, EXCLUDED.paused_until)",
        )
        .bind(team)
        .bind(delay)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn throttle_pauses(&self) -> StoreResult<Vec<ThrottlePause>> {
        let rows = sqlx::query(
            "SELECT team_id, extract(epoch FROM paused_until - now())::float8
             FROM prism_team_gates WHERE paused_until > now() ORDER BY team_id",
        )
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
