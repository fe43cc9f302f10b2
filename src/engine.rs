//! The daemon loop: lease due batches and claim new rows → send each batch's stored bytes →
//! record every item's outcome → let the database schedule what retries.
//!
//! A claimer keeps each team's buffer of leased batches topped up, taking (team, object type)
//! lanes in turn; each team's `max_in_flight` workers send them (under the team's adaptive
//! concurrency limit, key, rate ceiling and 429 pause); a recorder commits their outcomes in groups; a
//! heartbeat extends the leases of what the process holds. Nothing about a batch lives only in memory: a retry is a database row with a due time, so a
//! crash, a restart or another replica continues exactly where this one stopped.
//!
//! **Architecture invariant:** a batch's rows change state only through
//! [`Store::finish_batches`], fenced on this process still holding the batch's lease.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::backoff::RetryPolicy;
use crate::batch::{self, PlanLimits, TeamSet};
use crate::classify::{self, Anomalies, BatchVerdict, CodePolicy, Exchange};
use crate::client::MicroClient;
use crate::concurrency::{AdaptiveLimit, Signal};
use crate::health::Health;
use crate::model::{ItemOutcome, Operation, RowState, codes};
use crate::settings::{Settings, TeamLabel};
use crate::store::{
    AttemptRecord, BatchEnd, ClaimRequest, DeferBatch, DueRequest, FinishBatch, Lane, LeasedBatch,
    RowUpdate, Store, StoreError,
};

/// Everything the loop needs from the settings, resolved once.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This process's name on leases: host, pid and a random suffix.
    pub owner: String,
    pub lease: Duration,
    pub max_in_flight: usize,
    pub limits: PlanLimits,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    pub codes: CodePolicy,
    pub batch_max_attempts: u32,
    pub max_key_age: Duration,
    /// `retry.give_up_after`: how long a row may keep failing, from its first attempt.
    pub give_up_after: Duration,
    pub auth_probe_interval: Duration,
    pub grace_period: Duration,
    pub team_label: TeamLabel,
}

impl EngineConfig {
    pub fn from_settings(s: &Settings) -> EngineConfig {
        EngineConfig {
            owner: owner_name(),
            lease: s.sync.lease,
            max_in_flight: s.sync.max_in_flight,
            limits: PlanLimits {
                batch_size: s.batch.size,
                coalesce: s.batch.coalesce,
                max_coalesce: s.batch.max_coalesce,
                max_patch_bytes: s.batch.max_patch_bytes,
            },
            poll_interval: s.poll.interval,
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

/// One Micro team the engine sends for: its client (key, rate limit, 429 pause) and how many
/// of its batches may be on the wire at once.
pub struct TeamClient {
    pub client: MicroClient,
    pub max_in_flight: usize,
    /// The team is the default one (`micro.team_id`): rows with `team_id = ''` are its.
    pub default: bool,
}

/// A team's lane through the engine: its own buffer and workers, concurrency limit and pause,
/// so that one team's refused key or 429 storm holds back only that team.
struct Team {
    id: String,
    /// The `team_id` values in the outbox that mean this team (`''` for the default team).
    keys: Vec<String>,
    client: MicroClient,
    max_in_flight: usize,
    concurrency: AdaptiveLimit,
    /// The API refuses this team's key: only probes are sent.
    refused: AtomicBool,
    /// When a refused team that has no stored batch to probe with may claim one new batch to
    /// probe its key with (so that a refusal never outlasts the key's repair until a restart).
    next_probe: Mutex<Instant>,
    /// 429s in a row (without a delay of the server's) for this team: each doubles the pause.
    throttled: AtomicU32,
    /// Batches of this team buffered or on the wire.
    held: AtomicUsize,
    /// Batches of this team buffered, not yet taken by a worker: the claimer keeps up to
    /// `max_in_flight` of these ready besides the ones on the wire.
    queued: AtomicUsize,
    queue: mpsc::UnboundedSender<LeasedBatch>,
    /// The `team` label of the per-team metrics, when they are on.
    label: Option<String>,
}

impl Team {
    /// Free places in the team's buffer.
    fn room(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.queued.load(Ordering::Relaxed))
    }

    fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether a refused team may claim a new batch to probe its key with now (then not again
    /// for `every`).
    fn take_probe(&self, every: Duration) -> bool {
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
    fn observe_status(&self, status: u16) -> u32 {
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
    fn count_items(&self, operation: Operation, outcome: &'static str, n: u64) {
        if let Some(team) = &self.label {
            metrics::counter!("prism_sync_team_items_total", "team" => team.clone(), "operation" => operation.as_str(), "outcome" => outcome)
                .increment(n);
        }
    }

    fn set_refused(&self, refused: bool, health: &Health, all: &[Arc<Team>], probe: Duration) {
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

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Shared {
    store: Store,
    teams: Vec<Arc<Team>>,
    /// `team_id` value in the outbox → its team.
    team_of: HashMap<String, Arc<Team>>,
    /// Every `team_id` value a row may carry.
    team_set: TeamSet,
    cfg: EngineConfig,
    health: Arc<Health>,
    /// Batches this process is working on; only these get their leases extended.
    active: Mutex<HashSet<Uuid>>,
    wake: Notify,
    /// Batch ends go through one recorder task, which commits whatever has queued up meanwhile
    /// in one transaction (group commit: one fsync for many batches).
    recorder: mpsc::UnboundedSender<Recording>,
    /// Answered batches whose outcome write is still queued: a worker hands the write to the
    /// recorder and goes on to its next batch, but no more than this many wait at once.
    record_slots: Arc<Semaphore>,
}

type Recording = (FinishBatch, oneshot::Sender<Option<bool>>);

impl Shared {
    fn team(&self, batch: &LeasedBatch) -> Option<&Arc<Team>> {
        self.team_of.get(&batch.team)
    }

    /// Records a batch's end durably; `Some(false)` when the batch is no longer ours, `None`
    /// when the database could not be written (the batch stays stored and is re-sent later).
    async fn record(&self, f: FinishBatch) -> Option<bool> {
        self.queue_record(f).await.ok().flatten()
    }

    /// Queues a batch's end for the recorder at once (so a draining engine still writes it)
    /// and returns where its result will arrive.
    fn queue_record(&self, f: FinishBatch) -> oneshot::Receiver<Option<bool>> {
        let (reply, answer) = oneshot::channel();
        // A closed recorder drops `reply`, and the receiver then reads as "not written".
        let _ = self.recorder.send((f, reply));
        answer
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    recordings: mpsc::UnboundedReceiver<Recording>,
    /// Each team's buffer, in `shared.teams` order.
    receivers: Vec<mpsc::UnboundedReceiver<LeasedBatch>>,
}

/// At most this many batch ends share one transaction.
const MAX_GROUP: usize = 64;

/// Commits batch ends in groups: whatever queued while the previous commit ran goes into the
/// next transaction. Stops when `stop` fires and the queue is empty.
async fn run_recorder(
    store: Store,
    mut queue: mpsc::UnboundedReceiver<Recording>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            r = queue.recv() => match r { Some(r) => r, None => return },
            _ = stop.cancelled() => match queue.try_recv() { Ok(r) => r, Err(_) => return },
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let (batches, replies): (Vec<FinishBatch>, Vec<_>) = group.into_iter().unzip();
        let written = record_group(&store, &batches).await;
        for (reply, written) in replies.into_iter().zip(written) {
            let _ = reply.send(written);
        }
    }
}

/// Writes a group of batch ends, one result per batch (`None`: not written). A group the
/// database refuses for what one batch holds is written batch by batch, so that one batch's
/// write never holds the others back.
async fn record_group(store: &Store, batches: &[FinishBatch]) -> Vec<Option<bool>> {
    match must_write("recording batch outcomes", || store.finish_batches(batches)).await {
        Ok(written) => (0..batches.len())
            .map(|i| Some(written.get(i).copied().unwrap_or(false)))
            .collect(),
        Err(e) if e.is_refused_write() && batches.len() > 1 => {
            warn!(error = %e, batches = batches.len(), "the database refused a group of outcomes; writing its batches one by one");
            let mut written = Vec::with_capacity(batches.len());
            for f in batches {
                let alone =
                    match must_write("recording a batch outcome", || store.finish_batch(f)).await {
                        Ok(w) => Some(w),
                        Err(e) if e.is_refused_write() => record_without_texts(store, f, &e).await,
                        Err(_) => None,
                    };
                written.push(alone);
            }
            written
        }
        // A group of one is that batch alone: the same write would be refused again.
        Err(e) if e.is_refused_write() => vec![record_without_texts(store, &batches[0], &e).await],
        Err(_) => vec![None; batches.len()],
    }
}

/// Writes a batch's end that the database refused once more without any text from the API
/// (codes reduced to plain identifiers, no messages), so that its rows still end instead of
/// being re-sent for ever.
async fn record_without_texts(
    store: &Store,
    f: &FinishBatch,
    refused: &StoreError,
) -> Option<bool> {
    error!(batch_id = %f.batch_id, error = %refused, "the database refused this batch's outcome; writing it without the API's texts");
    let plain = f.without_texts();
    must_write("recording a batch outcome without texts", || {
        store.finish_batch(&plain)
    })
    .await
    .ok()
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
        let mut receivers = Vec::new();
        let mut teams = Vec::new();
        let mut team_of = HashMap::new();
        for tc in clients {
            let id = tc.client.team_id().to_owned();
            let keys = crate::model::team_id_values(&id, tc.default);
            let (queue, receiver) = mpsc::unbounded_channel();
            let team = Arc::new(Team {
                keys,
                label: labelled.then(|| id.clone()),
                id,
                concurrency: AdaptiveLimit::new(tc.max_in_flight),
                max_in_flight: tc.max_in_flight.max(1),
                client: tc.client,
                refused: AtomicBool::new(false),
                next_probe: Mutex::new(Instant::now()),
                throttled: AtomicU32::new(0),
                held: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                queue,
            });
            if let Some(label) = &team.label {
                for outcome in ["succeeded", "retried", "dead"] {
                    for operation in Operation::ALL {
                        metrics::counter!("prism_sync_team_items_total", "team" => label.clone(), "operation" => operation.as_str(), "outcome" => outcome)
                            .increment(0);
                    }
                }
                metrics::gauge!("prism_sync_team_credentials_refused", "team" => label.clone())
                    .set(0.0);
            }
            for key in &team.keys {
                team_of.insert(key.clone(), team.clone());
            }
            receivers.push(receiver);
            teams.push(team);
        }
        let team_set = TeamSet::new(team_of.keys().cloned());
        let in_flight: usize = teams.iter().map(|t| t.max_in_flight).sum();
        Engine {
            shared: Arc::new(Shared {
                store,
                teams,
                team_of,
                team_set,
                cfg,
                health,
                active: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                record_slots: Arc::new(Semaphore::new(2 * in_flight.max(1))),
                recorder,
            }),
            recordings,
            receivers,
        }
    }

    pub fn owner(&self) -> &str {
        &self.shared.cfg.owner
    }

    /// What this process holds right now (batches, each team's concurrency), read by the
    /// fleet registry's heartbeat (`fleet.rs`); it outlives [`Engine::run`].
    pub fn load_probe(&self) -> impl Fn() -> crate::fleet::Load + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || crate::fleet::Load {
            batches_held: shared.active.lock().expect("active lock").len(),
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
    /// re-sent with its own key by the next start.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let shared = self.shared;
        let cfg = &shared.cfg;
        let recorder_stop = CancellationToken::new();
        let recorder = tokio::spawn(run_recorder(
            shared.store.clone(),
            self.recordings,
            recorder_stop.clone(),
        ));
        info!(owner = %cfg.owner, database = shared.store.kind(), max_in_flight = cfg.max_in_flight, "sync engine started");
        let background = shutdown.child_token();
        let mut helpers = JoinSet::new();
        helpers.spawn(heartbeat(shared.clone(), background.clone()));
        if let Store::Postgres(pg) = &shared.store {
            helpers.spawn(listen_for_changes(
                shared.clone(),
                pg.clone(),
                background.clone(),
            ));
        }
        // Each team's workers (its `max_in_flight` of them) take batches from the team's buffer,
        // which the claimer keeps topped up. A worker that finishes a batch starts the next one
        // at once, without waiting for a claim in progress; claims are large (up to the free
        // room of every team) because the claimer refills a team only once its buffer is half
        // empty. Buffered batches are leased and kept alive by the heartbeat like those on the
        // wire. A team whose key is refused, or whose buffer is full, is left out of claims.
        let mut workers: JoinSet<()> = JoinSet::new();
        for (team, receiver) in shared.teams.iter().zip(self.receivers) {
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            for _ in 0..team.max_in_flight {
                workers.spawn(run_worker(
                    shared.clone(),
                    team.clone(),
                    receiver.clone(),
                    shutdown.clone(),
                ));
            }
        }
        let mut db_failures: u32 = 0;
        let mut strays_due = Instant::now();
        loop {
            shared.health.tick();
            if shutdown.is_cancelled() {
                break;
            }
            let strays = Instant::now() >= strays_due;
            let mut batches = Vec::new();
            let filled = fill(&shared, strays, &mut batches).await;
            let found = batches.len();
            for batch in batches {
                dispatch(&shared, batch);
            }
            match filled {
                Ok(()) => {
                    if db_failures > 0 {
                        info!("database reachable again");
                    }
                    db_failures = 0;
                    shared.health.set_db_ok(true);
                    if strays {
                        strays_due = Instant::now() + STRAYS_EVERY;
                    }
                }
                Err(e) => {
                    db_failures += 1;
                    shared.health.set_db_ok(false);
                    let wait = RetryPolicy {
                        base_delay: Duration::from_millis(200),
                        max_delay: Duration::from_secs(10),
                    }
                    .ceiling(db_failures);
                    warn!(error = %e, retry_in = ?wait, "cannot claim work: the database is unavailable; nothing new is sent until it is back");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {},
                        _ = shutdown.cancelled() => {},
                    }
                    continue;
                }
            }
            if found > 0 && shared.teams.iter().any(|t| wants_work(t)) {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {},
                _ = shared.wake.notified() => {},
                _ = tokio::time::sleep(cfg.poll_interval) => {},
            }
        }
        let in_flight = shared.active.lock().expect("active lock").len();
        info!(in_flight, grace = ?cfg.grace_period, "draining: no new claims");
        let drained = tokio::time::timeout(cfg.grace_period, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "grace period over: unanswered batches stay stored and are re-sent with their keys on the next start"
            );
            workers.abort_all();
            while workers.join_next().await.is_some() {}
        }
        recorder_stop.cancel();
        let _ = recorder.await;
        background.cancel();
        while helpers.join_next().await.is_some() {}
        // Our batches are either finished or abandoned mid-send; either way another start may
        // take them at once (a re-send under the same key is an idempotent replay).
        if let Err(e) = shared.store.drop_leases(&cfg.owner).await {
            warn!(error = %e, "could not release leases; they lapse on their own");
        }
        info!("sync engine stopped");
        Ok(())
    }
}

/// How often a claim also looks for rows outside every lane (unknown team or object type).
const STRAYS_EVERY: Duration = Duration::from_secs(30);

/// Whether the claimer should fetch more for `team`: its key is accepted, the API has not asked
/// it to pause (a 429 storm does not turn its whole backlog into waiting batches), and at least
/// half of its buffer is free.
fn wants_work(team: &Team) -> bool {
    !team.refused() && !team.client.is_paused() && team.room() >= team.max_in_flight.div_ceil(2)
}

/// Hands a leased batch to its team's workers. A batch of a team this process does not know
/// (configuration changed since it was stored) cannot happen: claims and leases ask only for
/// known teams.
fn dispatch(shared: &Shared, batch: LeasedBatch) {
    let Some(team) = shared.team(&batch) else {
        error!(batch_id = %batch.id, team = %batch.team, "leased a batch of an unknown team; its lease lapses");
        return;
    };
    shared.active.lock().expect("active lock").insert(batch.id);
    team.held.fetch_add(1, Ordering::Relaxed);
    team.queued.fetch_add(1, Ordering::Relaxed);
    // The receiver lives as long as the engine's workers; a send after they stopped only
    // leaves the batch leased until `drop_leases`.
    let _ = team.queue.send(batch);
}

/// Sends the team's batches from its buffer until shutdown. After shutdown it takes no new
/// batch: those left in the buffer stay stored and are sent by the next start.
async fn run_worker(
    shared: Arc<Shared>,
    team: Arc<Team>,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<LeasedBatch>>>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            b = async { queue.lock().await.recv().await } => b,
        };
        let Some(batch) = next else { return };
        team.queued.fetch_sub(1, Ordering::Relaxed);
        // A place in the buffer is free: the claimer may refill it while this batch is sent.
        shared.wake.notify_one();
        let span = info_span!("batch", batch_id = %batch.id, key = %batch.idempotency_key);
        process_batch(&shared, &team, batch).instrument(span).await;
        team.held.fetch_sub(1, Ordering::Relaxed);
        shared.wake.notify_one();
    }
}

/// Takes due stored batches first (retries, lapsed leases), then claims new rows for what is
/// left of each team's free room, into `batches`. A team whose key is refused gets one probe at
/// a time (a stored batch re-sent under its key, or, when it has none, one new batch every
/// probe interval) and no other claims. Batches leased before a step failed stay in
/// `batches`: they are ours, and dropping them would leave them waiting for their lease to lapse.
async fn fill(
    shared: &Shared,
    strays: bool,
    batches: &mut Vec<LeasedBatch>,
) -> Result<(), StoreError> {
    let cfg = &shared.cfg;
    for team in shared.teams.iter().filter(|t| t.refused()) {
        if team.held.load(Ordering::Relaxed) == 0 {
            let probe = shared
                .store
                .lease_due_batches(&DueRequest {
                    owner: &cfg.owner,
                    lease: cfg.lease,
                    limit: 1,
                    teams: &team.keys,
                })
                .await?;
            if probe.is_empty() && team.take_probe(cfg.auth_probe_interval) {
                let lanes = Lane::all_of(team.keys.iter().map(String::as_str));
                batches.extend(claim(shared, &lanes, cfg.limits.batch_size, false).await?);
            }
            batches.extend(probe);
        }
    }
    if strays {
        end_stranded(shared).await?;
    }
    let open: Vec<&Arc<Team>> = shared.teams.iter().filter(|t| wants_work(t)).collect();
    if open.is_empty() && !strays {
        return Ok(());
    }
    let keys: Vec<String> = open.iter().flat_map(|t| t.keys.iter().cloned()).collect();
    let free: usize = open.iter().map(|t| t.room()).sum();
    let due = shared
        .store
        .lease_due_batches(&DueRequest {
            owner: &cfg.owner,
            lease: cfg.lease,
            limit: free,
            teams: &keys,
        })
        .await?;
    let left = free.saturating_sub(due.len());
    batches.extend(due);
    if left > 0 || strays {
        let lanes = Lane::all_of(keys.iter().map(String::as_str));
        let max_records = left.max(1) * cfg.limits.batch_size;
        batches.extend(claim(shared, &lanes, max_records, strays).await?);
    }
    Ok(())
}

/// Claims new rows of `lanes` (and, with `strays`, rows of no lane, which go dead) into stored
/// batches leased to us.
async fn claim(
    shared: &Shared,
    lanes: &[Lane],
    max_records: usize,
    strays: bool,
) -> Result<Vec<LeasedBatch>, StoreError> {
    let cfg = &shared.cfg;
    let started = Instant::now();
    let claimed = shared
        .store
        .claim(&ClaimRequest {
            owner: &cfg.owner,
            lease: cfg.lease,
            max_records,
            limits: cfg.limits,
            lanes,
            teams: &shared.team_set,
            strays,
        })
        .await?;
    metrics::histogram!("prism_sync_db_duration_seconds", "op" => "claim")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("prism_sync_batches_claimed_total").increment(claimed.batches.len() as u64);
    crash_point!("after_claim");
    for dead in &claimed.dead {
        warn!(row = dead.id, code = dead.code, reason = %dead.message, "row cannot be sent: dead");
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(1);
        metrics::counter!("prism_sync_item_errors_total", "code" => dead.code).increment(1);
    }
    Health::count(&shared.health.rows_dead, claimed.dead.len() as u64);
    Ok(claimed.batches)
}

/// Ends the open batches of teams no longer configured (see [`Store::end_stranded_batches`]).
async fn end_stranded(shared: &Shared) -> Result<(), StoreError> {
    let dead = shared.store.end_stranded_batches(&shared.team_set).await?;
    if dead > 0 {
        warn!(
            rows = dead,
            "stored batches of a team that is no longer configured: their rows are dead as unknown_team (replay them once the team is back)"
        );
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_item_errors_total", "code" => codes::UNKNOWN_TEAM)
            .increment(dead);
        Health::count(&shared.health.rows_dead, dead);
    }
    Ok(())
}

/// Extends the leases of the batches this process is working on, every third of a lease.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.cfg.lease / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {},
        }
        let ours: Vec<Uuid> = shared
            .active
            .lock()
            .expect("active lock")
            .iter()
            .copied()
            .collect();
        if ours.is_empty() {
            continue;
        }
        if let Err(e) = shared
            .store
            .extend_leases(&shared.cfg.owner, shared.cfg.lease, &ours)
            .await
        {
            warn!(error = %e, "could not extend batch leases");
        }
    }
}

/// Wakes the loop as soon as a change commits (Postgres `NOTIFY` from the outbox trigger).
async fn listen_for_changes(
    shared: Arc<Shared>,
    pg: crate::store::PgStore,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            l = pg.listener() => match l {
                Ok(l) => { failures = 0; l }
                Err(e) => {
                    failures += 1;
                    let wait = RetryPolicy { base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) }.ceiling(failures);
                    debug!(error = %e, "LISTEN failed; polling meanwhile");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(wait) => {} }
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => shared.wake.notify_one(),
                    Err(e) => { debug!(error = %e, "LISTEN connection lost"); break; }
                },
            }
        }
    }
}

/// A database write that must happen: retried with backoff while the failure is passing (the
/// database may be restarting or busy), but not forever: an unrecorded batch keeps its stored
/// key and is re-sent once its lease lapses. A write the database refuses for what it holds is
/// not retried: the same bytes would be refused again.
async fn must_write<T, F, Fut>(what: &str, write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter();
    write
        .retry(policy)
        .when(|e: &StoreError| !e.is_refused_write())
        .notify(|e: &StoreError, after| warn!(error = %e, retry_in = ?after, "{what}: database write failed"))
        .await
        .inspect_err(|e| {
            if !e.is_refused_write() {
                error!(error = %e, "{what}: giving up; the batch stays stored and will be re-sent under its key");
            }
        })
}

/// Sends one batch (and, when it is rejected whole, its halves) until each has a final or a
/// deferred state in the database.
async fn process_batch(shared: &Arc<Shared>, team: &Arc<Team>, first: LeasedBatch) {
    let mut queue = vec![first];
    while let Some(batch) = queue.pop() {
        let id = batch.id;
        // An answered batch is handed to the recorder, which lets go of it once written.
        if !send_and_settle(shared, team, batch, &mut queue).await {
            shared.active.lock().expect("active lock").remove(&id);
            shared.wake.notify_one();
        }
    }
}

/// Sends one batch and settles what its answer asks for; `true` when the batch was handed to
/// the recorder (which releases it), `false` when it is settled here.
async fn send_and_settle(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    batch: LeasedBatch,
    queue: &mut Vec<LeasedBatch>,
) -> bool {
    let cfg = &shared.cfg;
    let worn_out = batch.attempts >= i32::try_from(cfg.batch_max_attempts).unwrap_or(i32::MAX);
    let key_old = batch.key_age >= cfg.max_key_age;
    if worn_out || key_old {
        let why = if worn_out {
            "the batch failed batch.max_attempts times under its key"
        } else {
            "the batch's key is near the server's 24h idempotency window"
        };
        if batch.answered {
            end_unreadable(shared, team, &batch, why).await;
        } else {
            release(shared, team, &batch, why).await;
        }
        return false;
    }
    crash_point!("before_send");
    let started = Instant::now();
    Health::count(&shared.health.sends, 1);
    let exchange = send(team, &batch).await;
    let took = started.elapsed();
    crash_point!("after_response");
    let (status, replay, detail) = match &exchange {
        Exchange::Answered(a) => (Some(a.status), a.replay, None),
        Exchange::Unreadable {
            status,
            kind,
            detail,
        } => (
            Some(*status),
            false,
            Some(format!("{}: {detail}", kind.code())),
        ),
        Exchange::Failed { kind, detail } => {
            (None, false, Some(format!("{}: {detail}", kind.code())))
        }
    };
    if replay {
        metrics::counter!("prism_sync_idempotent_replays_total").increment(1);
    }
    let throttled_run = status.map_or(0, |s| team.observe_status(s));
    let verdict = classify::classify(&exchange, &batch.items, &cfg.codes);
    if !matches!(verdict, BatchVerdict::AuthRefused { .. }) && status.is_some() && team.refused() {
        info!(team = %team.id, "the API accepts the team's key again: resuming");
        team.set_refused(
            false,
            &shared.health,
            &shared.teams,
            cfg.auth_probe_interval,
        );
        shared.wake.notify_one();
    }
    let attempt = |outcome: &str, detail: Option<String>| AttemptRecord {
        http_status: status,
        outcome: outcome.to_owned(),
        detail,
        replay,
        duration: took,
    };
    match verdict {
        BatchVerdict::Answered {
            outcomes,
            anomalies,
        } => {
            record_answer(
                shared,
                team,
                &batch,
                outcomes,
                &anomalies,
                attempt("answered", None),
            )
            .await;
            return true;
        }
        BatchVerdict::Retry {
            code,
            retry_after,
            slow_everyone,
        } => {
            let wait = Wait {
                retry_after,
                slow_everyone,
                throttled_run,
            };
            let attempt = attempt(&code, detail.clone());
            on_retry(shared, team, &batch, &code, wait, attempt).await;
        }
        BatchVerdict::AuthRefused { status } => {
            let code = format!("http_{status}");
            on_auth_refused(shared, team, &batch, attempt(&code, None)).await;
        }
        BatchVerdict::Unreadable { detail, .. } => {
            let attempt = attempt(codes::UNREADABLE_RESPONSE, Some(detail));
            on_unreadable(shared, team, &batch, attempt).await;
        }
        BatchVerdict::Rejected { status, message } => {
            let code = format!("http_{status}");
            let attempt = attempt(&code, Some(message.clone()));
            return on_rejected(shared, team, batch, &code, message, attempt, queue).await;
        }
        BatchVerdict::KeyMismatch => {
            error!(
                "the API says this key was used with another body (idempotency_key_mismatch); releasing the rows to new batches"
            );
            metrics::counter!("prism_sync_key_mismatches_total").increment(1);
            finish_released(
                shared,
                team,
                &batch,
                "idempotency_key_mismatch",
                "the API answered 409 idempotency_key_mismatch",
                attempt("idempotency_key_mismatch", None),
            )
            .await;
        }
    }
    false
}

/// One send of the batch's stored bytes under its key, within the team's concurrency limit,
/// which learns from the answer.
async fn send(team: &Team, batch: &LeasedBatch) -> Exchange {
    let _slot = team.concurrency.acquire().await;
    let exchange = team
        .client
        .send_to(
            batch.object_type,
            batch.operation,
            &batch.idempotency_key,
            batch.body.clone(),
        )
        .await;
    team.concurrency.observe(match &exchange {
        Exchange::Answered(a) if a.status == 429 || a.status == 503 => Signal::Pushback,
        Exchange::Answered(a) if a.status < 500 => Signal::Fine,
        Exchange::Unreadable { .. } => Signal::Fine,
        Exchange::Failed {
            kind: classify::TransportFailure::Timeout,
            ..
        } => Signal::Pushback,
        _ => Signal::Neutral,
    });
    exchange
}

/// What an unanswered send says about when to try again.
struct Wait {
    /// The server's own delay (`retry-after-ms`, `retry-after`), uncapped.
    retry_after: Option<Duration>,
    /// The delay holds back every batch of the team, not only this one.
    slow_everyone: bool,
    /// 429s in a row for the team, this one included (0: not a 429).
    throttled_run: u32,
}

/// Whether the batch's oldest row has been failing for longer than `retry.give_up_after`:
/// then the batch is not deferred again, and its rows past the limit go dead.
fn past_give_up(cfg: &EngineConfig, batch: &LeasedBatch) -> bool {
    batch.oldest_row_age() >= cfg.give_up_after
}

/// The batch was not answered (connection error, timeout, 408, 409, 429, 5xx): re-send the
/// same bytes under the same key later. A 429 burns no attempt; its pause grows with each 429
/// in a row for the team. Past `retry.give_up_after` the batch is given up instead.
async fn on_retry(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    wait: Wait,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    let past = past_give_up(cfg, batch);
    if past && !batch.answered {
        give_up(shared, team, batch, code, attempt).await;
        return;
    }
    let next = u32::try_from(batch.attempts).unwrap_or(0).saturating_add(1);
    let throttled = wait.throttled_run > 0;
    let delay = match wait.retry_after {
        Some(d) => team.client.cap_delay(d),
        None if throttled => cfg.retry.throttled(wait.throttled_run, rand::random()),
        None => cfg.retry.jittered(next),
    };
    if wait.slow_everyone {
        // Only this team's client: another team's key has its own rate limit.
        team.client.slow_down(delay);
    }
    info!(code = %code, retry_in = ?delay, attempt = next, throttled_run = wait.throttled_run, detail = attempt.detail.as_deref().unwrap_or(""), "batch not answered; it will be re-sent with the same key");
    metrics::counter!("prism_sync_batches_total", "result" => "retry").increment(1);
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: delay,
        // A key the API answered 2xx is never given up to new keys: past the limit its every
        // send counts, so that `batch.max_attempts` ends it (as `unreadable_response`).
        count_attempt: !throttled || past,
        attempt,
    };
    let _ = must_write("deferring a batch", || shared.store.defer_batch(&d)).await;
}

/// 401/403: pause the team's sends (no attempts burned) and probe its key on an interval.
async fn on_auth_refused(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    if !team.refused() {
        error!(team = %team.id, status = ?attempt.http_status, probe_every = ?cfg.auth_probe_interval, "the API refuses the team's key: pausing its sends (no attempts are used) and probing; other teams go on");
    }
    team.set_refused(true, &shared.health, &shared.teams, cfg.auth_probe_interval);
    metrics::counter!("prism_sync_batches_total", "result" => "auth_refused").increment(1);
    let past = past_give_up(cfg, batch);
    if past && !batch.answered {
        let code = attempt.outcome.clone();
        give_up(shared, team, batch, &code, attempt).await;
        return;
    }
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: cfg.auth_probe_interval,
        count_attempt: past,
        attempt,
    };
    let _ = must_write("deferring a refused batch", || shared.store.defer_batch(&d)).await;
}

/// A 2xx whose body could not be read: the API applied the request, so the same bytes go
/// again under the same key (the API replays its answer, which may be readable this time),
/// counting an attempt; the key is never released. Once the batch is out of attempts
/// (`batch.max_attempts`, which also bounds it past `retry.give_up_after`) its rows go dead as
/// `unreadable_response`.
async fn on_unreadable(shared: &Shared, team: &Team, batch: &LeasedBatch, attempt: AttemptRecord) {
    let cfg = &shared.cfg;
    let next = u32::try_from(batch.attempts).unwrap_or(0).saturating_add(1);
    warn!(
        attempt = next,
        detail = attempt.detail.as_deref().unwrap_or(""),
        "the API answered 2xx but its answer cannot be read; re-sending under the same key"
    );
    if next >= cfg.batch_max_attempts {
        let why = "the batch's answers stayed unreadable";
        end_unreadable(shared, team, batch, why).await;
        return;
    }
    metrics::counter!("prism_sync_batches_total", "result" => "retry").increment(1);
    let d = DeferBatch {
        batch_id: batch.id,
        owner: &cfg.owner,
        retry_in: cfg.retry.jittered(next),
        count_attempt: true,
        attempt,
    };
    let _ = must_write("deferring an unreadable batch", || {
        shared.store.defer_batch(&d)
    })
    .await;
}

/// 400/413/422 for the whole batch: bisect it into two children under new keys (sent at once,
/// by this worker) until the refused item stands alone, then that item goes dead.
async fn on_rejected(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    batch: LeasedBatch,
    code: &str,
    message: String,
    attempt: AttemptRecord,
    queue: &mut Vec<LeasedBatch>,
) -> bool {
    let cfg = &shared.cfg;
    match batch::split_batch(batch.shape(), &batch.body, &batch.items) {
        Ok(Some(halves)) => {
            info!(
                status = ?attempt.http_status,
                items = batch.items.len(),
                "batch rejected whole: bisecting to find the item the API refuses"
            );
            metrics::counter!("prism_sync_batches_total", "result" => "bisected").increment(1);
            let f = FinishBatch {
                children: halves.to_vec(),
                ..cfg.finish(&batch, BatchEnd::Split, Vec::new(), attempt)
            };
            if shared.record(f).await == Some(true) {
                let mut active = shared.active.lock().expect("active lock");
                for child in halves {
                    active.insert(child.id);
                    queue.push(LeasedBatch::fresh(child));
                }
            }
            false
        }
        Ok(None) => {
            let outcomes = vec![
                ItemOutcome::Dead {
                    code: code.to_owned(),
                    message,
                };
                batch.items.len()
            ];
            record_answer(
                shared,
                team,
                &batch,
                outcomes,
                &Anomalies::default(),
                attempt,
            )
            .await;
            true
        }
        Err(e) => {
            error!(error = %e, "stored batch body cannot be split; releasing its rows");
            release(
                shared,
                team,
                &batch,
                "the stored batch could not be bisected",
            )
            .await;
            false
        }
    }
}

/// The batch's oldest row is past `retry.give_up_after` and the batch failed again: it is not
/// deferred again. Its rows go back as after a release (new batches, new keys), where those
/// past the limit go dead with `code`. (A key the API answered 2xx is never released: such a
/// batch is deferred instead, each send counting, until `batch.max_attempts` ends it.)
async fn give_up(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    attempt: AttemptRecord,
) {
    let why = "the batch kept failing past retry.give_up_after";
    warn!(code, oldest_row_age = ?batch.oldest_row_age(), "{why}: giving up its key");
    finish_released(shared, team, batch, code, why, attempt).await;
}

/// Ends a batch whose key the API answered 2xx (it applied the request) but whose answer could
/// never be read: its rows go dead as `unreadable_response` (the changes were most likely
/// applied; an operator can replay them), and the key is not released to new keys, which
/// would apply them again.
async fn end_unreadable(shared: &Shared, team: &Team, batch: &LeasedBatch, why: &str) {
    let cfg = &shared.cfg;
    error!(
        attempts = batch.attempts,
        "{why}: the API answered 2xx under this key but its answers could not be read; its rows go dead as unreadable_response (most likely applied)"
    );
    let message = format!(
        "{why}: the API answered 2xx (so it applied the change) but its answer could not be read"
    );
    let rows: Vec<RowUpdate> = batch
        .items
        .iter()
        .flat_map(|i| i.rows.iter())
        .map(|id| RowUpdate {
            id: *id,
            state: RowState::Dead,
            code: Some(codes::UNREADABLE_RESPONSE.to_owned()),
            message: Some(message.clone()),
            retry_in: 0.0,
        })
        .collect();
    let dead = rows.len() as u64;
    let f = cfg.finish(
        batch,
        BatchEnd::Done,
        rows,
        AttemptRecord {
            outcome: codes::UNREADABLE_RESPONSE.into(),
            detail: Some(why.into()),
            ..AttemptRecord::default()
        },
    );
    if shared.record(f).await == Some(true) {
        metrics::counter!("prism_sync_batches_total", "result" => "unreadable").increment(1);
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_item_errors_total", "code" => codes::UNREADABLE_RESPONSE)
            .increment(dead);
        Health::count(&shared.health.rows_dead, dead);
        team.count_items(batch.operation, "dead", dead);
    }
}

/// Records an answered batch: every row takes its item's outcome.
async fn record_answer(
    shared: &Arc<Shared>,
    team: &Arc<Team>,
    batch: &LeasedBatch,
    mut outcomes: Vec<ItemOutcome>,
    anomalies: &Anomalies,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    if anomalies.any() {
        warn!(
            missing = anomalies.missing,
            duplicate = anomalies.duplicate,
            unknown = anomalies.unknown,
            summary_mismatch = anomalies.summary_mismatch,
            "the API's answer does not match the batch; missing items are retried in new batches"
        );
    }
    if batch.operation == Operation::Delete {
        // Deleting a record that is already gone is what was asked for: an earlier send of the
        // same change (under a released key), or another system, deleted it first.
        for outcome in &mut outcomes {
            if matches!(outcome, ItemOutcome::Dead { code, .. } | ItemOutcome::Retry { code, .. } if code == "not_found")
            {
                *outcome = ItemOutcome::Succeeded;
            }
        }
    }
    let mut rows = Vec::with_capacity(batch.row_count());
    let (mut ok, mut retried, mut dead) = (0u64, 0u64, 0u64);
    for (item, outcome) in batch.items.iter().zip(&outcomes) {
        let n = item.rows.len() as u64;
        let (state, code, message, retry_in) = match outcome {
            ItemOutcome::Succeeded => {
                ok += n;
                (RowState::Succeeded, None, None, 0.0)
            }
            ItemOutcome::Retry { code, message } => {
                retried += n;
                let next = u32::try_from(item.attempts).unwrap_or(0).saturating_add(1);
                (
                    RowState::Retrying,
                    Some(code.clone()),
                    Some(message.clone()),
                    cfg.retry.jittered(next).as_secs_f64(),
                )
            }
            ItemOutcome::Dead { code, message } => {
                dead += n;
                (
                    RowState::Dead,
                    Some(code.clone()),
                    Some(message.clone()),
                    0.0,
                )
            }
        };
        for id in &item.rows {
            rows.push(RowUpdate {
                id: *id,
                state,
                code: code.clone(),
                message: message.clone(),
                retry_in,
            });
        }
    }
    let f = cfg.finish(batch, BatchEnd::Done, rows, attempt);
    crash_point!("before_outcomes");
    // The write is queued for the recorder and this worker moves on; the batch stays leased
    // (and counted as ours) until the write lands.
    let slot = shared
        .record_slots
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let shared = shared.clone();
    let team = team.clone();
    let operation = batch.operation;
    let batch_id = batch.id;
    let items = batch.items.len();
    let codes: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            ItemOutcome::Retry { code, .. } | ItemOutcome::Dead { code, .. } => {
                Some(crate::telemetry::code_label(&shared.cfg.codes, code))
            }
            ItemOutcome::Succeeded => None,
        })
        .collect();
    // Queued before this worker returns: the recorder drains its queue before the engine stops,
    // so an answered batch is recorded even when SIGTERM arrives meanwhile.
    let started = Instant::now();
    let answer = shared.queue_record(f);
    let settle = async move {
        let written = answer.await.ok().flatten();
        metrics::histogram!("prism_sync_db_duration_seconds", "op" => "record")
            .record(started.elapsed().as_secs_f64());
        if written == Some(true) {
            team.count_items(operation, "succeeded", ok);
            team.count_items(operation, "retried", retried);
            team.count_items(operation, "dead", dead);
        }
        settle_answer(&shared, written, items, (ok, retried, dead), codes);
        shared.active.lock().expect("active lock").remove(&batch_id);
        shared.wake.notify_one();
        drop(slot);
    };
    tokio::spawn(settle.instrument(tracing::Span::current()));
}

/// Counts an answered batch once its outcome is written.
fn settle_answer(
    shared: &Shared,
    written: Option<bool>,
    items: usize,
    (ok, retried, dead): (u64, u64, u64),
    codes: Vec<String>,
) {
    match written {
        Some(true) => {
            crash_point!("after_outcomes");
            let result = if retried + dead == 0 { "ok" } else { "partial" };
            metrics::counter!("prism_sync_batches_total", "result" => result).increment(1);
            metrics::counter!("prism_sync_items_total", "outcome" => "succeeded").increment(ok);
            metrics::counter!("prism_sync_items_total", "outcome" => "retried").increment(retried);
            metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
            for code in codes {
                metrics::counter!("prism_sync_item_errors_total", "code" => code).increment(1);
            }
            metrics::gauge!("prism_sync_last_progress_timestamp_seconds").set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
            Health::count(&shared.health.rows_succeeded, ok);
            Health::count(&shared.health.rows_retried, retried);
            Health::count(&shared.health.rows_dead, dead);
            debug!(
                items,
                rows_succeeded = ok,
                rows_retried = retried,
                rows_dead = dead,
                "batch answered"
            );
        }
        Some(false) => warn!(
            "batch answered, but another process took it over meanwhile; its outcome is theirs to record"
        ),
        None => {}
    }
}

/// Gives up a batch's key without sending it again: its rows go back to be re-batched under new
/// keys (safe: per-record order still holds and PATCH values are absolute).
async fn release(shared: &Shared, team: &Team, batch: &LeasedBatch, why: &str) {
    warn!(attempts = batch.attempts, key_age = ?batch.key_age, "{why}: releasing its rows to new batches");
    let attempt = AttemptRecord {
        outcome: "released".into(),
        detail: Some(why.into()),
        ..AttemptRecord::default()
    };
    finish_released(shared, team, batch, codes::BATCH_RELEASED, why, attempt).await;
}

async fn finish_released(
    shared: &Shared,
    team: &Team,
    batch: &LeasedBatch,
    code: &str,
    why: &str,
    attempt: AttemptRecord,
) {
    let cfg = &shared.cfg;
    let mut rows = Vec::with_capacity(batch.row_count());
    let mut dead = 0u64;
    for item in &batch.items {
        let tries = u32::try_from(item.attempts).unwrap_or(0).saturating_add(1);
        // Each release counts as a try, so a batch that can never be answered ends its rows
        // `dead` after retry.max_attempts instead of circling forever.
        let state = if tries >= cfg.codes.max_attempts {
            RowState::Dead
        } else {
            RowState::Retrying
        };
        for id in &item.rows {
            if state == RowState::Dead {
                dead += 1;
            }
            rows.push(RowUpdate {
                id: *id,
                state,
                code: Some(code.to_owned()),
                message: Some(why.to_owned()),
                retry_in: cfg.retry.jittered(tries).as_secs_f64(),
            });
        }
    }
    let f = cfg.finish(batch, BatchEnd::Released, rows, attempt);
    if shared.record(f).await == Some(true) {
        metrics::counter!("prism_sync_batches_total", "result" => "released").increment(1);
        metrics::counter!("prism_sync_items_total", "outcome" => "dead").increment(dead);
        metrics::counter!("prism_sync_items_total", "outcome" => "retried")
            .increment(batch.row_count() as u64 - dead);
        Health::count(&shared.health.rows_dead, dead);
        Health::count(&shared.health.rows_retried, batch.row_count() as u64 - dead);
        team.count_items(batch.operation, "dead", dead);
        team.count_items(batch.operation, "retried", batch.row_count() as u64 - dead);
    }
}
