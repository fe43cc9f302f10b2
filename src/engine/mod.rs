//! The daemon loop: lease due batches and claim new rows → send each batch's stored bytes →
//! record every item's outcome → let the database schedule what retries.
//!
//! The files follow the diagram in ARCHITECTURE.md ("Inside one process"):
//! - `claimer`: the claim loop; keeps each team's buffer of leased batches topped up, taking
//!   (team, object type) lanes in turn.
//! - `team`: a team's lane (client with its key, rate ceiling and 429 pause; adaptive
//!   concurrency limit; buffer; refusal and probes).
//! - `worker`: `max_in_flight` per team; send one batch, classify its answer.
//! - `settle`: what each verdict does to its batch, one function per arm.
//! - `recorder`: commits batch ends in groups, and settles answered batches once written.
//! - `heartbeat`, `listener`: lease extension; `LISTEN` wake-ups on Postgres.
//! - `holdings`: the one record of which batches the process holds (`holdings::Held`),
//!   which the claimer, workers, recorder and heartbeat hand on.
//!
//! Nothing about a batch lives only in memory: a retry is a database row with a due time, so a
//! crash, a restart or another replica continues exactly where this one stopped.
//!
//! **Architecture invariant:** a batch's rows change state only through
//! [`Store::finish_batches`], fenced on this process still holding the batch's lease.

mod claimer;
mod heartbeat;
mod holdings;
mod listener;
mod recorder;
mod settle;
mod team;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::backoff::RetryPolicy;
use crate::batch::{PlanLimits, TeamSet};
use crate::classify::CodePolicy;
use crate::client::MicroClient;
use crate::health::Health;
use crate::settings::{Settings, TeamLabel};
use crate::store::{AttemptRecord, BatchEnd, FinishBatch, LeasedBatch, RowUpdate, Store};

use holdings::Holdings;
pub use team::TeamClient;
use team::{Buffer, BufferSize, Team};

/// Everything the loop needs from the settings, resolved once.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This process's name on leases: host, pid and a random suffix.
    pub owner: String,
    pub lease: Duration,
    pub max_in_flight: usize,
    /// `sync.max_buffer_bytes`: per team, the request bytes its buffer of claimed, ready batches
    /// may hold.
    pub max_buffer_bytes: usize,
    /// `sync.claims_in_flight`: claim rounds at once; `None` leaves it to the database (see
    /// [`crate::settings::SyncSettings::claims_in_flight_for`]).
    pub claims_in_flight: Option<usize>,
    pub limits: PlanLimits,
    pub poll_interval: Duration,
    /// `poll.idle_interval` (at least `poll_interval`): how far an idle claimer that listens
    /// for NOTIFY stretches its polling.
    pub poll_idle_interval: Duration,
    /// `batch.linger`: how long a flowing lane's partial batch may wait to fill (zero: never).
    pub linger: Duration,
    pub retry: RetryPolicy,
    pub codes: CodePolicy,
    pub batch_max_attempts: u32,
    pub max_key_age: Duration,
    /// `retry.give_up_after`: how long a row may keep failing, from its first attempt.
    pub give_up_after: Duration,
    pub auth_probe_interval: Duration,
    pub grace_period: Duration,
    pub team_label: TeamLabel,
    /// `history.keep_responses`: keep each `ok` record the API returns.
    pub keep_responses: bool,
}

impl EngineConfig {
    pub fn from_settings(s: &Settings) -> EngineConfig {
        EngineConfig {
            owner: owner_name(),
            lease: s.sync.lease,
            max_in_flight: s.sync.max_in_flight,
            max_buffer_bytes: s.sync.max_buffer_bytes,
            claims_in_flight: s.sync.claims_in_flight,
            limits: PlanLimits {
                batch_size: s.batch.size,
                coalesce: s.batch.coalesce,
                max_coalesce: s.batch.max_coalesce,
                max_patch_bytes: s.batch.max_patch_bytes,
                max_request_bytes: s.http.max_response_bytes / 2,
            },
            poll_interval: s.poll.interval,
            poll_idle_interval: s.poll.longest(),
            linger: s.batch.linger,
            retry: RetryPolicy {
                base_delay: s.retry.base_delay,
                max_delay: s.retry.max_delay,
            },
            codes: CodePolicy {
                retryable: s.retry.retryable_codes.iter().cloned().collect(),
                permanent: s.retry.permanent_codes.iter().cloned().collect(),
                max_attempts: s.retry.max_attempts,
            },
            batch_max_attempts: s.batch.max_attempts,
            max_key_age: s.batch.max_key_age,
            give_up_after: s.retry.give_up_after,
            auth_probe_interval: s.auth.probe_interval,
            grace_period: s.shutdown.grace_period,
            team_label: s.telemetry.team_label,
            keep_responses: s.history.keep_responses,
        }
    }

    /// The end of `batch`, written as this process (its lease, its `retry.give_up_after`).
    fn finish(
        &self,
        batch: &LeasedBatch,
        end: BatchEnd,
        rows: Vec<RowUpdate>,
        attempt: AttemptRecord,
    ) -> FinishBatch {
        FinishBatch {
            batch_id: batch.id,
            owner: self.owner.clone(),
            end,
            rows,
            children: Vec::new(),
            lease: self.lease,
            attempt,
            give_up_after: self.give_up_after,
        }
    }
}

fn owner_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let suffix = Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}

/// What ends [`Engine::run`] with an error. Database and API failures never do: they are
/// retried, or left to the lease (the batch stays stored and is re-sent under its key). A bug
/// does: a task of the engine that panicked is reported once the others have drained, so that
/// the process exits with an error instead of a clean stop.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine's {task} panicked: {message}")]
    TaskPanicked { task: &'static str, message: String },
}

impl EngineError {
    /// The error for a task that ended in `e`, unless it was only aborted (a drain past its
    /// grace period aborts the workers still sending).
    fn from_join(task: &'static str, e: JoinError) -> Option<EngineError> {
        let panic = e.try_into_panic().ok()?;
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Some(EngineError::TaskPanicked { task, message })
    }
}

/// What every task of the engine shares.
struct Shared {
    store: Store,
    teams: Vec<Arc<Team>>,
    /// `team_id` value in the outbox → its team.
    team_of: HashMap<String, Arc<Team>>,
    /// Every `team_id` value a row may carry.
    team_set: TeamSet,
    /// The operators' pauses, read once per poll interval.
    pauses: crate::pauses::PauseBoard,
    cfg: EngineConfig,
    health: Arc<Health>,
    /// The batches this process holds; only these get their leases extended.
    holdings: Arc<Holdings>,
    /// Claim rounds that may run at once (`sync.claims_in_flight`, resolved for the database).
    claims_in_flight: usize,
    /// Wakes the claimer: room in a buffer, a `NOTIFY`, a team's key accepted again.
    wake: Arc<Notify>,
    /// Batch ends go through one recorder task (see [`recorder`]).
    recorder: mpsc::UnboundedSender<recorder::Recording>,
    /// When the claimer must look again at the latest: the soonest of a lane whose partial tail
    /// a claim left lingering (`batch.linger`) and a retry this process wrote coming due. The
    /// claimer sleeps no longer than that (see `claimer`).
    look_again_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// On Postgres: the listener holds a live `LISTEN`, so a committed change wakes the claimer
    /// and an idle claimer may poll less often (`poll.idle_interval`).
    listening: std::sync::atomic::AtomicBool,
}

pub struct Engine {
    shared: Arc<Shared>,
    recordings: recorder::Queue,
    /// Each team's buffer, in `shared.teams` order.
    buffers: Vec<Buffer>,
}

impl Engine {
    /// An engine for the default team only.
    pub fn new(
        store: Store,
        client: MicroClient,
        cfg: EngineConfig,
        health: Arc<Health>,
    ) -> Engine {
        let max_in_flight = cfg.max_in_flight;
        Engine::with_teams(
            store,
            vec![TeamClient {
                client,
                max_in_flight,
                default: true,
            }],
            cfg,
            health,
        )
    }

    /// An engine for several teams; exactly one of them should be the default team.
    pub fn with_teams(
        store: Store,
        clients: Vec<TeamClient>,
        cfg: EngineConfig,
        health: Arc<Health>,
    ) -> Engine {
        let (recorder, recordings) = mpsc::unbounded_channel();
        let labelled = cfg.team_label.enabled(clients.len());
        let mut buffers = Vec::new();
        let mut teams = Vec::new();
        let mut team_of = HashMap::new();
        let buffer_size = BufferSize {
            per_worker: team::buffer_per_worker(matches!(store, Store::Postgres(_))),
            bytes: cfg.max_buffer_bytes,
        };
        for (index, tc) in clients.into_iter().enumerate() {
            let (team, buffer) = Team::new(tc, index, labelled, buffer_size);
            let team = Arc::new(team);
            for key in &team.keys {
                team_of.insert(key.clone(), team.clone());
            }
            buffers.push(buffer);
            teams.push(team);
        }
        let team_set = TeamSet::new(team_of.keys().cloned());
        let in_flight: usize = teams.iter().map(|t| t.max_in_flight).sum();
        let wake = Arc::new(Notify::new());
        // Answered batches whose outcome write may wait at once: twice what can be on the wire.
        let holdings = Holdings::new(teams.len(), 2 * in_flight.max(1), wake.clone());
        let claims_in_flight = cfg
            .claims_in_flight
            .unwrap_or_else(|| {
                crate::settings::default_claims_in_flight(matches!(store, Store::Postgres(_)))
            })
            .clamp(1, crate::settings::MAX_CLAIMS_IN_FLIGHT);
        Engine {
            shared: Arc::new(Shared {
                store,
                teams,
                team_of,
                team_set,
                pauses: crate::pauses::PauseBoard::new(cfg.poll_interval, labelled),
                cfg,
                health,
                holdings,
                claims_in_flight,
                wake,
                recorder,
                look_again_at: std::sync::Mutex::new(None),
                listening: std::sync::atomic::AtomicBool::new(false),
            }),
            recordings,
            buffers,
        }
    }

    pub fn owner(&self) -> &str {
        &self.shared.cfg.owner
    }

    /// What this process holds right now (batches, each team's concurrency), read by the
    /// fleet registry's heartbeat (`fleet.rs`); it outlives [`Engine::run`].
    pub fn load_probe(&self) -> impl Fn() -> crate::fleet::Load + Send + Sync + use<> {
        let shared = self.shared.clone();
        move || crate::fleet::Load {
            batches_held: shared.holdings.len(),
            teams: shared
                .teams
                .iter()
                .map(|t| crate::store::fleet::TeamLoad {
                    team: t.id.clone(),
                    concurrency: t.concurrency.limit(),
                    max_in_flight: t.max_in_flight,
                    max_requests_per_second: t.client.max_requests_per_second(),
                })
                .collect(),
        }
    }

    /// Runs until `shutdown` is cancelled, then drains: no new claims, batches in flight get
    /// `shutdown.grace_period` to finish; whatever is still unanswered stays stored and is
    /// re-sent with its own key by the next start. Fails only when a task of the engine
    /// panicked (see [`EngineError`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let shared = self.shared;
        let cfg = &shared.cfg;
        info!(owner = %cfg.owner, database = shared.store.kind(), max_in_flight = cfg.max_in_flight, claims_in_flight = shared.claims_in_flight, "sync engine started");
        let recorder_stop = CancellationToken::new();
        let recorder = tokio::spawn(recorder::run(
            shared.store.clone(),
            self.recordings,
            recorder_stop.clone(),
        ));
        let background = shutdown.child_token();
        let helpers = start_helpers(&shared, &background);
        let workers = start_workers(&shared, self.buffers, &shutdown);
        claimer::run(&shared, &shutdown).await;

        let mut failure = drain(&shared, workers).await;
        recorder_stop.cancel();
        if let Err(e) = recorder.await {
            failure = failure.or(EngineError::from_join("recorder", e));
        }
        background.cancel();
        failure = failure.or(join_all(helpers, "heartbeat or listener").await);
        // Our batches are either finished or abandoned mid-send; either way another start may
        // take them at once (a re-send under the same key is an idempotent replay).
        if let Err(e) = shared.store.drop_leases(&cfg.owner).await {
            warn!(error = %e, "could not release leases; they lapse on their own");
        }
        info!("sync engine stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// The heartbeat and, on Postgres, the listener; they stop when `stop` fires.
fn start_helpers(shared: &Arc<Shared>, stop: &CancellationToken) -> JoinSet<()> {
    let mut helpers = JoinSet::new();
    helpers.spawn(heartbeat::run(shared.clone(), stop.clone()));
    if let Store::Postgres(pg) = &shared.store {
        helpers.spawn(listener::run(shared.clone(), pg.clone(), stop.clone()));
    }
    helpers
}

/// Each team's workers (its `max_in_flight` of them) take batches from the team's buffer,
/// which the claimer keeps topped up. A worker that finishes a batch starts the next one at
/// once, without waiting for a claim in progress; claims are large (up to each team's free
/// room, shared among the `sync.claims_in_flight` rounds that run at once) because the claimer
/// refills a team only once its buffer is half empty.
/// Buffered batches are leased and kept alive by the heartbeat like those on the wire.
fn start_workers(
    shared: &Arc<Shared>,
    buffers: Vec<Buffer>,
    shutdown: &CancellationToken,
) -> JoinSet<()> {
    let mut workers = JoinSet::new();
    for (team, buffer) in shared.teams.iter().zip(buffers) {
        for _ in 0..team.max_in_flight {
            workers.spawn(worker::run(
                shared.clone(),
                team.clone(),
                buffer.clone(),
                shutdown.clone(),
            ));
        }
    }
    workers
}

/// Waits up to `shutdown.grace_period` for the workers to finish the batches they are sending,
/// then aborts those still on the wire (their batches stay stored, to be re-sent under their
/// keys). Answered batches are already queued for the recorder, which the caller drains next.
async fn drain(shared: &Shared, mut workers: JoinSet<()>) -> Option<EngineError> {
    let grace = shared.cfg.grace_period;
    info!(in_flight = shared.holdings.len(), grace = ?grace, "draining: no new claims");
    let mut failure = None;
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = workers.join_next().await {
            if let Err(e) = done {
                failure = failure.take().or(EngineError::from_join("worker", e));
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            "grace period over: unanswered batches stay stored and are re-sent with their keys on the next start"
        );
        workers.abort_all();
        failure = failure.or(join_all(workers, "worker").await);
    }
    failure
}

/// Waits for every task of `set`; the first that panicked, if any did.
async fn join_all(mut set: JoinSet<()>, task: &'static str) -> Option<EngineError> {
    let mut failure = None;
    while let Some(done) = set.join_next().await {
        if let Err(e) = done {
            failure = failure.or(EngineError::from_join(task, e));
        }
    }
    failure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panicked_is_reported_and_an_aborted_one_is_not() {
        let mut set = JoinSet::new();
        set.spawn(async { panic!("the worker broke") });
        assert!(matches!(
            join_all(set, "worker").await,
            Some(EngineError::TaskPanicked { task: "worker", message }) if message == "the worker broke"
        ));

        let mut set = JoinSet::new();
        set.spawn(std::future::pending::<()>());
        set.abort_all();
        assert!(join_all(set, "worker").await.is_none());
    }
}
