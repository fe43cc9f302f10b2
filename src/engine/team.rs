//! A team's lane through the engine: its own client (key, rate ceiling, 429 pause), adaptive
//! concurrency limit, buffer and refusal state, so that one team's refused key or 429 storm
//! holds back only that team.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::holdings::{Held, Room};
use crate::client::MicroClient;
use crate::concurrency::AdaptiveLimit;
use crate::health::Health;
use crate::model::Operation;

/// One Micro team the engine sends for: its client (key, rate limit, 429 pause) and how many
/// of its batches may be on the wire at once.
pub struct TeamClient {
    pub client: MicroClient,
    pub max_in_flight: usize,
    /// The team is the default one (`micro.team_id`): rows with `team_id = ''` are its.
    pub default: bool,
}

/// Ready batches a team's buffer keeps per worker: four on Postgres, two on SQLite. The claimer
/// refills a buffer once half of it is free, so a claim round takes at least half of it (twice
/// `max_in_flight` batches on Postgres) while the workers still have as many to send. On
/// Postgres a claim's latency (its statements' round trips, the floor's move) set the pace:
/// with one per worker, claims were small and the workers emptied the buffer long before the
/// next claim committed. Simulator at 0 ms, 200,000 changes, interleaved with the references
/// (README, "Database cost (Postgres)"): one per worker 17,158 rows/s, two 23,380 (2026-12-07);
/// on another day two 15,555, four 19,633, and 77 against 62 µs of server CPU a change. SQLite
/// gained nothing from four (one writer: claims take turns anyway), and each claim holds its
/// write lock, which an application's insert waits for, the longer the larger it is. Requests
/// on the wire stay `max_in_flight`; `sync.max_buffer_bytes` bounds the buffer in bytes.
pub(super) fn buffer_per_worker(postgres: bool) -> usize {
    if postgres { 4 } else { 2 }
}

/// The size of every team's buffer: ready batches per worker ([`buffer_per_worker`]) and
/// request bytes in all (`sync.max_buffer_bytes`).
#[derive(Debug, Clone, Copy)]
pub(super) struct BufferSize {
    pub(super) per_worker: usize,
    pub(super) bytes: usize,
}

/// The receiving end of a team's buffer, shared by the team's workers.
pub(super) type Buffer = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Held>>>;

pub(super) struct Team {
    pub(super) id: String,
    /// Its place in the engine's list of teams (how [`super::holdings::Holdings`] counts it).
    pub(super) index: usize,
    /// The `team_id` values in the outbox that mean this team (`''` for the default team).
    pub(super) keys: Vec<String>,
    pub(super) client: MicroClient,
    /// How many workers it has.
    pub(super) max_in_flight: usize,
    /// How many ready batches its buffer keeps, and the request bytes they may take in all
    /// (`sync.max_buffer_bytes`).
    buffer: Room,
    pub(super) concurrency: AdaptiveLimit,
    /// The API refuses this team's key: only probes are sent.
    refused: AtomicBool,
    /// When a refused team that has no stored batch to probe with may claim one new batch to
    /// probe its key with (so that a refusal never outlasts the key's repair until a restart).
    next_probe: Mutex<Instant>,
    /// 429s in a row (without a delay of the server's) for this team: each doubles the pause.
    throttled: AtomicU32,
    /// The sending end of the team's buffer.
    queue: mpsc::UnboundedSender<Held>,
    /// The `team` label of the per-team metrics, when they are on.
    label: Option<String>,
}

impl Team {
    /// The team and the receiving end of its buffer; registers its metrics at zero.
    pub(super) fn new(
        tc: TeamClient,
        index: usize,
        labelled: bool,
        buffer: BufferSize,
    ) -> (Team, Buffer) {
        let id = tc.client.team_id().to_owned();
        let (queue, receiver) = mpsc::unbounded_channel();
        let team = Team {
            keys: crate::model::team_id_values(&id, tc.default),
            label: labelled.then(|| id.clone()),
            id,
            index,
            concurrency: AdaptiveLimit::new(tc.max_in_flight)
                .for_team(labelled.then(|| tc.client.team_id().to_owned())),
            max_in_flight: tc.max_in_flight.max(1),
            buffer: Room {
                places: buffer.per_worker.max(1) * tc.max_in_flight.max(1),
                bytes: buffer.bytes.max(1),
            },
            client: tc.client,
            refused: AtomicBool::new(false),
            next_probe: Mutex::new(Instant::now()),
            throttled: AtomicU32::new(0),
            queue,
        };
        team.register_metrics();
        (team, Arc::new(tokio::sync::Mutex::new(receiver)))
    }

    /// How much its buffer keeps ready: [`buffer_per_worker`] batches per worker, of at most
    /// `sync.max_buffer_bytes` in all.
    pub(super) fn buffer_size(&self) -> Room {
        self.buffer
    }

    /// Whether `room` makes its buffer worth refilling: half of its places or more, so that
    /// claims are large, and half of its bytes or more, so that a buffer of large batches is
    /// refilled once a worker has taken them rather than by a trickle of small claims.
    pub(super) fn wants_refill(&self, room: Room) -> bool {
        let size = self.buffer_size();
        room.places >= size.places.div_ceil(2) && room.bytes >= size.bytes.div_ceil(2)
    }

    fn register_metrics(&self) {
        let Some(label) = &self.label else { return };
        for outcome in ["succeeded", "retried", "dead"] {
            for operation in Operation::ALL {
                metrics::counter!("prism_sync_team_items_total", "team" => label.clone(), "operation" => operation.as_str(), "outcome" => outcome)
                    .increment(0);
            }
        }
        metrics::gauge!("prism_sync_team_credentials_refused", "team" => label.clone()).set(0.0);
    }

    /// Puts a leased batch into the team's buffer. The receiver lives as long as the team's
    /// workers; a batch sent after they stopped is let go at once and stays leased until
    /// `drop_leases`.
    pub(super) fn buffer(&self, held: Held) {
        let _ = self.queue.send(held);
    }

    pub(super) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether a refused team may claim a new batch to probe its key with now (then not again
    /// for `every`).
    pub(super) fn take_probe(&self, every: Duration) -> bool {
        let mut next = self.next_probe.lock().expect("probe lock");
        let now = Instant::now();
        if *next > now {
            return false;
        }
        *next = now + every;
        true
    }

    /// Counts an answer with a status toward the team's run of 429s: the pause after a 429
    /// that named no delay grows with the run, and any other answer ends it.
    pub(super) fn observe_status(&self, status: u16) -> u32 {
        if status == 429 {
            self.throttled
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        } else {
            self.throttled.store(0, Ordering::Relaxed);
            0
        }
    }

    /// Counts rows by outcome per team and operation (when the team label is on).
    pub(super) fn count_items(&self, operation: Operation, outcome: &'static str, n: u64) {
        if let Some(team) = &self.label {
            metrics::counter!("prism_sync_team_items_total", "team" => team.clone(), "operation" => operation.as_str(), "outcome" => outcome)
                .increment(n);
        }
    }

    pub(super) fn set_refused(
        &self,
        refused: bool,
        health: &Health,
        all: &[Arc<Team>],
        probe: Duration,
    ) {
        if refused && !self.refused() {
            *self.next_probe.lock().expect("probe lock") = Instant::now() + probe;
        }
        self.refused.store(refused, Ordering::Relaxed);
        if let Some(team) = &self.label {
            metrics::gauge!("prism_sync_team_credentials_refused", "team" => team.clone())
                .set(if refused { 1.0 } else { 0.0 });
        }
        health.set_refused_teams(all.iter().filter(|t| t.refused()).map(|t| t.id.as_str()));
    }
}
