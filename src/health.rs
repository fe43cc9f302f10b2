//! Liveness, readiness and progress counters shared by the engine, the telemetry endpoints, the
//! demo's progress bar and systemd's watchdog.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds of the main loop's last turn.
    last_tick_ms: AtomicU64,
    db_ok: AtomicBool,
    credentials_refused: AtomicBool,
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

    pub fn set_credentials_refused(&self, refused: bool) {
        let was = self.credentials_refused.swap(refused, Ordering::Relaxed);
        if was != refused {
            metrics::gauge!("prism_sync_credentials_refused").set(if refused { 1.0 } else { 0.0 });
        }
    }

    pub fn credentials_refused(&self) -> bool {
        self.credentials_refused.load(Ordering::Relaxed)
    }

    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
