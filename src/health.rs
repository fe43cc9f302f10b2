//! Liveness, readiness and progress counters shared by the engine, the telemetry endpoints, the
//! demo's progress bar and systemd's watchdog.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds of the main loop's last turn.
    last_tick_ms: AtomicU64,
    db_ok: AtomicBool,
    credentials_refused: AtomicBool,
    /// The teams whose key the API refuses now, so that `/readyz` can name them.
    refused_teams: Mutex<Vec<String>>,
    pub rows_succeeded: AtomicU64,
    pub rows_retried: AtomicU64,
    pub rows_dead: AtomicU64,
    pub sends: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    pub fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the main loop last turned (`None` before the first turn).
    pub fn since_tick(&self) -> Option<Duration> {
        match self.last_tick_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }

    pub fn set_db_ok(&self, ok: bool) {
        self.db_ok.store(ok, Ordering::Relaxed);
    }

    pub fn db_ok(&self) -> bool {
        self.db_ok.load(Ordering::Relaxed)
    }

    /// Records which teams' keys the API refuses now (none: every key is accepted).
    pub fn set_refused_teams<'t>(&self, teams: impl IntoIterator<Item = &'t str>) {
        let teams: Vec<String> = teams.into_iter().map(str::to_owned).collect();
        let refused = !teams.is_empty();
        *self.refused_teams.lock().expect("refused teams lock") = teams;
        let was = self.credentials_refused.swap(refused, Ordering::Relaxed);
        if was != refused {
            metrics::gauge!("prism_sync_credentials_refused").set(if refused { 1.0 } else { 0.0 });
        }
    }

    pub fn credentials_refused(&self) -> bool {
        self.credentials_refused.load(Ordering::Relaxed)
    }

    /// The teams whose key the API refuses now.
    pub fn refused_teams(&self) -> Vec<String> {
        self.refused_teams
            .lock()
            .expect("refused teams lock")
            .clone()
    }

    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
