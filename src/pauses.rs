//! The operators' pauses as one engine obeys them: read from `prism_pauses` at most once per
//! poll interval (one small query), so that every replica leaves a paused team or lane out of
//! its claims, its leases of due batches and its sends within one poll interval of
//! `prism-sync pause`, and takes it up again as soon after `resume`.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::model::ObjectType;
use crate::store::{Pause, Store, StoreError};

/// The pauses in force as last read, and when to read them again.
pub struct PauseBoard {
    every: Duration,
    /// Export `prism_sync_paused{team, object_type}` (telemetry.team_label is on).
    labelled: bool,
    state: Mutex<Board>,
}

#[derive(Default)]
struct Board {
    read_at: Option<Instant>,
    pauses: Vec<Pause>,
    /// Label pairs exported so far: a lifted pause drops to 0 rather than lingering at 1.
    exported: BTreeSet<(String, String)>,
    /// The last read failed (logged once until a read succeeds again).
    failing: bool,
    /// A read has succeeded: before that the board knows nothing, and nothing may be claimed
    /// or leased on it (a paused lane would look open).
    known: bool,
}

impl PauseBoard {
    pub fn new(every: Duration, labelled: bool) -> PauseBoard {
        metrics::describe_gauge!(
            "prism_sync_pauses",
            "Teams and lanes an operator paused (prism-sync pause), for every replica."
        );
        metrics::describe_gauge!(
            "prism_sync_paused",
            "1 while this team (object_type=\"all\") or lane is paused (while telemetry.team_label is on)."
        );
        metrics::gauge!("prism_sync_pauses").set(0.0);
        PauseBoard {
            every,
            labelled,
            state: Mutex::new(Board::default()),
        }
    }

    /// Reads the pauses again unless they were read (or a read began) less than a poll interval
    /// ago. A failed read keeps the last known pauses (the claim that follows meets the same
    /// database), is logged once per outage, and is returned, for a caller that cannot act
    /// without the pauses ([`PauseBoard::known`]).
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let due = {
            let mut board = self.state.lock().expect("pause lock");
            let due = board.read_at.is_none_or(|at| at.elapsed() >= self.every);
            // Once the pauses have been read, one reader at a time: the claim rounds and the
            // workers that come meanwhile use them as last read (at most a read's time older).
            // Before the first read every caller reads: none may act on an empty board.
            if due && board.read_at.is_some() {
                board.read_at = Some(Instant::now());
            }
            due
        };
        if !due {
            return Ok(());
        }
        match store.pauses().await {
            Ok(pauses) => {
                self.set(pauses);
                Ok(())
            }
            Err(e) => {
                let mut board = self.state.lock().expect("pause lock");
                // Read again after a poll interval, but say so once per outage, not each time.
                // Until one read has succeeded, every caller reads again.
                if board.known {
                    board.read_at = Some(Instant::now());
                }
                if !std::mem::replace(&mut board.failing, true) {
                    warn!(error = %e, "cannot read the operators' pauses; keeping the last known");
                }
                Err(e)
            }
        }
    }

    /// Whether the pauses have been read at least once (see [`PauseBoard::refresh`]).
    pub fn known(&self) -> bool {
        self.state.lock().expect("pause lock").known
    }

    fn set(&self, pauses: Vec<Pause>) {
        let mut board = self.state.lock().expect("pause lock");
        board.read_at = Some(Instant::now());
        board.failing = false;
        board.known = true;
        if board.pauses != pauses {
            for p in pauses.iter().filter(|p| !board.pauses.contains(p)) {
                info!(team = %p.team, object_type = p.object_type.as_deref().unwrap_or("all"), actor = %p.actor, "paused by an operator: nothing of it is sent until it is resumed");
            }
            for p in board.pauses.iter().filter(|p| !pauses.contains(p)) {
                info!(team = %p.team, object_type = p.object_type.as_deref().unwrap_or("all"), "resumed by an operator");
            }
        }
        metrics::gauge!("prism_sync_pauses").set(pauses.len() as f64);
        if self.labelled {
            let now: BTreeSet<(String, String)> = pauses
                .iter()
                .map(|p| {
                    let lane = p.object_type.clone().unwrap_or_else(|| "all".into());
                    (p.team.clone(), lane)
                })
                .collect();
            for (team, lane) in board.exported.iter().chain(now.iter()) {
                let on = now.contains(&(team.clone(), lane.clone()));
                metrics::gauge!("prism_sync_paused", "team" => team.clone(), "object_type" => lane.clone())
                    .set(if on { 1.0 } else { 0.0 });
            }
            board.exported.extend(now);
        }
        board.pauses = pauses;
    }

    /// Whether the team (`id`; `default`: it is `micro.team_id`) is paused as a whole.
    pub fn team_paused(&self, id: &str, default: bool) -> bool {
        let board = self.state.lock().expect("pause lock");
        board
            .pauses
            .iter()
            .any(|p| p.object_type.is_none() && names(p, id, default))
    }

    /// Whether nothing of this lane may be sent: its team or the lane itself is paused.
    pub fn lane_paused(&self, id: &str, default: bool, object_type: ObjectType) -> bool {
        let board = self.state.lock().expect("pause lock");
        board.pauses.iter().any(|p| {
            names(p, id, default)
                && p.object_type
                    .as_deref()
                    .is_none_or(|t| t == object_type.as_str())
        })
    }
}

/// A pause names a team by its id, or (stored as `''`) the default team, whatever its id.
fn names(p: &Pause, id: &str, default: bool) -> bool {
    p.team_id == id || (default && p.team_id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(team_id: &str, object_type: &str) -> Pause {
        Pause::from_stored(team_id.into(), object_type.into(), "ops".into(), "t".into())
    }

    #[test]
    fn a_team_pause_stops_every_lane_of_it_and_a_lane_pause_only_that_lane() {
        let board = PauseBoard::new(Duration::from_millis(50), false);
        board.set(vec![pause("team-b", ""), pause("", "deal")]);
        assert!(board.team_paused("team-b", false));
        assert!(board.lane_paused("team-b", false, ObjectType::Contact));
        assert!(
            !board.team_paused("team-a", true),
            "a lane pause is not a team pause"
        );
        assert!(
            board.lane_paused("team-a", true, ObjectType::Deal),
            "'' names the default team"
        );
        assert!(!board.lane_paused("team-a", true, ObjectType::Contact));
        assert!(
            !board.lane_paused("team-c", false, ObjectType::Deal),
            "only the default team is ''"
        );
        board.set(Vec::new());
        assert!(!board.lane_paused("team-b", false, ObjectType::Contact));
    }
}
