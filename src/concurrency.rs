//! Adaptive request concurrency (AIMD), in the spirit of Vector's adaptive request concurrency:
//! the number of requests on the wire grows by one per window of successful answers and halves
//! when the API pushes back (429, 503, a timeout), never above `sync.max_in_flight` nor below 1.
//!
//! It is per process: with several replicas each backs off on its own pushback, so together
//! they converge on what the API accepts without coordinating through the database.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct AdaptiveLimit {
    state: Mutex<State>,
    freed: Notify,
    max: usize,
    /// The team's `team` label, where `telemetry.team_label` gives per-team metrics (each team
    /// its own limit, and its own series of `prism_sync_concurrency_limit`).
    team: Option<String>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_use: usize,
}

/// What an answer says about the API's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An answer without pushback.
    Fine,
    /// 429, 503 or a timeout: too much.
    Pushback,
    /// Anything else (an error that says nothing about load).
    Neutral,
}

/// A request slot; dropping it frees the slot.
pub struct Slot<'a> {
    owner: &'a AdaptiveLimit,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.owner.state.lock().expect("limit lock").in_use -= 1;
        self.owner.freed.notify_waiters();
    }
}

impl AdaptiveLimit {
    pub fn new(max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        AdaptiveLimit {
            state: Mutex::new(State {
                limit: max as f64,
                in_use: 0,
            }),
            freed: Notify::new(),
            max,
            team: None,
        }
    }

    /// Labels the limit's gauge with `team` (see [`AdaptiveLimit::team`]).
    pub fn for_team(mut self, team: Option<String>) -> AdaptiveLimit {
        self.team = team;
        self
    }

    /// The current limit, rounded down.
    pub fn limit(&self) -> usize {
        self.state.lock().expect("limit lock").limit as usize
    }

    /// Waits for a slot under the current limit.
    pub async fn acquire(&self) -> Slot<'_> {
        loop {
            let freed = self.freed.notified();
            {
                let mut s = self.state.lock().expect("limit lock");
                if s.in_use < (s.limit as usize).max(1) {
                    s.in_use += 1;
                    return Slot { owner: self };
                }
            }
            freed.await;
        }
    }

    /// Adjusts the limit after an answer.
    pub fn observe(&self, signal: Signal) {
        let mut s = self.state.lock().expect("limit lock");
        match signal {
            Signal::Fine => s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(self.max as f64),
            Signal::Pushback => s.limit = (s.limit / 2.0).max(1.0),
            Signal::Neutral => {}
        }
        match &self.team {
            Some(team) => metrics::gauge!("prism_sync_concurrency_limit", "team" => team.clone())
                .set(s.limit.floor()),
            None => metrics::gauge!("prism_sync_concurrency_limit").set(s.limit.floor()),
        }
        drop(s);
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_halves_and_success_grows_back_by_one_per_window() {
        let l = AdaptiveLimit::new(8);
        assert_eq!(l.limit(), 8);
        l.observe(Signal::Pushback);
        assert_eq!(l.limit(), 4);
        l.observe(Signal::Pushback);
        l.observe(Signal::Pushback);
        l.observe(Signal::Pushback);
        assert_eq!(l.limit(), 1, "never below one");
        for _ in 0..1 {
            l.observe(Signal::Fine);
        }
        assert_eq!(l.limit(), 2, "one window of successes at limit 1 adds one");
        for _ in 0..3 {
            l.observe(Signal::Fine);
        }
        assert_eq!(
            l.limit(),
            3,
            "about a window (two to three answers) at limit 2 adds one more"
        );
        for _ in 0..1000 {
            l.observe(Signal::Fine);
        }
        assert_eq!(l.limit(), 8, "never above the configured maximum");
        l.observe(Signal::Neutral);
        assert_eq!(l.limit(), 8);
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_wait_for_a_slot() {
        let l = AdaptiveLimit::new(2);
        l.observe(Signal::Pushback);
        let first = l.acquire().await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), l.acquire()).await;
        assert!(
            waiting.is_err(),
            "a second request waits while the limit is one"
        );
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), l.acquire()).await;
        assert!(second.is_ok());
    }
}
