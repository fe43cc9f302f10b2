//! The Prism API simulator: a faithful, fault-injecting stand-in for the Micro bulk API.
//!
//! Tests start it in-process on port 0 with [`Simulator::start`]; `prism-sync simulate` serves it with
//! [`run_simulate`]. Module map:
//! - `api`: `POST /v2/prism/{teamId}/{objectType}/batch/update` and `.../batch/delete`: authentication,
//!   idempotency and the fault pipeline, shared by both operations;
//! - `admin`: the inspection and control endpoints under `/_sim/` (no API key needed), global or per
//!   team (`?team=T`);
//! - `faults`: the [`FaultProfile`] and the seeded draws;
//! - `state`: records (per team) and their apply log, the idempotency cache, statistics;
//! - `cli`: the `simulate` command-line arguments.
//!
//! **Teams.** The simulator knows a primary team ([`SimConfig::team_id`], the default wherever a team
//! is not named) and any number of [`SimConfig::extra_teams`], each with its own API key, records,
//! statistics and, optionally, its own fault profile used instead of the global one. A key
//! authenticates only its own team: an unknown key is 401, a known key on another team's path is 404
//! `team_not_found`, as for a team that does not exist.
//!
//! **Invariant:** every random decision comes from one `StdRng` seeded from [`SimConfig::seed`] (and
//! re-seeded by a reset), whichever team's profile is in force, so a sequential client sees the same
//! faults on every run.

mod admin;
mod api;
mod cli;
mod faults;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use api::{BODY_LIMIT, MAX_ITEMS};
pub use cli::{SimulateArgs, run_simulate};
pub use faults::{DEFAULT_ITEM_ERROR_CODES, FaultKind, FaultProfile, FaultProfileError};
pub use state::{
    AppliedChange, ObjectType, Operation, RequestLogEntry, SimStats, UnknownObjectType,
};

use faults::ActiveFaults;
use state::{
    ApplyItem, ApplyOutcome, IdempotencyCache, LogFilter, Observations, RequestMeta,
    RequestOutcome, Store, TeamIndex,
};

/// The team id of [`SimConfig::default`].
pub const DEFAULT_TEAM_ID: &str = "00000000-0000-4000-8000-000000000001";
/// The API key of [`SimConfig::default`].
pub const DEFAULT_API_KEY: &str = "sim-key";
/// How many completed idempotency keys are kept at most; the oldest go first. A cached 100-item
/// response is some tens of kB, so this bounds the cache to around a gigabyte in the worst case.
pub const IDEMPOTENCY_CAPACITY: usize = 50_000;
/// How many recent requests `GET /_sim/requests` can show.
pub const REQUEST_LOG_CAPACITY: usize = 10_000;

/// How the simulator behaves; [`Default`] is a well-behaved API with one team.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The primary team's API key.
    pub api_key: String,
    /// The primary team: the one admin endpoints and [`SimHandle`] methods mean when they name none.
    /// Requests for a team the simulator does not know get 404.
    pub team_id: String,
    /// More teams, each with its own key (`--extra-team TEAM_ID=API_KEY`). Team ids must differ from
    /// each other and from `team_id` (UUIDs compared as such).
    pub extra_teams: Vec<SimTeam>,
    /// `true`: every well-formed id exists (records are created on first update); `false`: an id that
    /// was not seeded (`POST /_sim/records`) is answered `not_found`.
    pub implicit_records: bool,
    /// How long a completed response is replayed under its key (24 hours in the real API).
    pub idempotency_ttl: Duration,
    /// The global fault profile: used for every team that has no profile of its own.
    pub faults: FaultProfile,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            team_id: DEFAULT_TEAM_ID.to_owned(),
            extra_teams: Vec::new(),
            implicit_records: true,
            idempotency_ttl: Duration::from_secs(24 * 60 * 60),
            faults: FaultProfile::default(),
            seed: 0,
        }
    }
}

/// A team besides the primary one, and the key that authenticates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTeam {
    pub team_id: String,
    pub api_key: String,
}

/// A team id the simulator does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the simulator knows no team {0:?}")]
pub struct UnknownTeam(pub String);

/// One team's identity and the settings that can change while the simulator runs.
struct Team {
    /// As configured; also its name in logs, statistics and the idempotency scope.
    id: String,
    /// Team ids that are UUIDs match in any case.
    uuid: Option<Uuid>,
    api_key: RwLock<String>,
    /// Used instead of the global profile when set.
    faults: RwLock<Option<Arc<ActiveFaults>>>,
}

impl Team {
    fn new(id: String, api_key: String) -> Self {
        Self {
            uuid: Uuid::parse_str(&id).ok(),
            id,
            api_key: RwLock::new(api_key),
            faults: RwLock::new(None),
        }
    }

    /// Team ids are UUIDs: compare them as such (any case), anything else as written.
    fn is(&self, team: &str) -> bool {
        match (Uuid::parse_str(team), self.uuid) {
            (Ok(asked), Some(ours)) => asked == ours,
            _ => team == self.id,
        }
    }

    fn key_matches(&self, presented: &[u8]) -> bool {
        let expected = self
            .api_key
            .read()
            .expect("simulator api key lock poisoned");
        presented == expected.as_bytes()
    }
}

/// Who a request's `x-api-key` is, for the team its path names.
pub(crate) enum Access {
    /// The key opens the team the path names.
    Granted(TeamIndex),
    /// The key belongs to another team (or the path names no team): 404, as for an unknown team.
    OtherTeam,
    /// No team has this key, or there is none: 401.
    Unauthorized,
}

/// State shared by every request.
pub(crate) struct Shared {
    /// Index 0 is the primary team.
    teams: Vec<Team>,
    team_names: Arc<[String]>,
    implicit_records: bool,
    seed: u64,
    faults: RwLock<Arc<ActiveFaults>>,
    rng: Mutex<StdRng>,
    store: Mutex<Store>,
    idempotency: Mutex<IdempotencyCache>,
    observations: Mutex<Observations>,
    shutdown: CancellationToken,
}

/// The primary team's index.
const PRIMARY: TeamIndex = 0;

impl Shared {
    fn new(config: SimConfig, shutdown: CancellationToken) -> Self {
        let teams: Vec<Team> = std::iter::once(Team::new(config.team_id, config.api_key))
            .chain(
                config
                    .extra_teams
                    .into_iter()
                    .map(|team| Team::new(team.team_id, team.api_key)),
            )
            .collect();
        let team_names: Arc<[String]> = teams.iter().map(|team| team.id.clone()).collect();
        Self {
            implicit_records: config.implicit_records,
            seed: config.seed,
            faults: RwLock::new(Arc::new(ActiveFaults::new(config.faults))),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            store: Mutex::new(Store::new(Arc::clone(&team_names))),
            idempotency: Mutex::new(IdempotencyCache::new(
                config.idempotency_ttl,
                IDEMPOTENCY_CAPACITY,
            )),
            observations: Mutex::new(Observations::new(
                REQUEST_LOG_CAPACITY,
                Arc::clone(&team_names),
            )),
            teams,
            team_names,
            shutdown,
        }
    }

    fn rng(&self) -> MutexGuard<'_, StdRng> {
        self.rng.lock().expect("simulator rng lock poisoned")
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("simulator store lock poisoned")
    }

    fn idempotency(&self) -> MutexGuard<'_, IdempotencyCache> {
        self.idempotency
            .lock()
            .expect("simulator idempotency lock poisoned")
    }

    fn observations(&self) -> MutexGuard<'_, Observations> {
        self.observations
            .lock()
            .expect("simulator observations lock poisoned")
    }

    /// The team a path or an admin query names, if the simulator knows it.
    fn find_team(&self, team: &str) -> Option<TeamIndex> {
        self.teams.iter().position(|known| known.is(team))
    }

    fn team(&self, team: &str) -> Result<TeamIndex, UnknownTeam> {
        self.find_team(team)
            .ok_or_else(|| UnknownTeam(team.to_owned()))
    }

    fn team_name(&self, team: TeamIndex) -> &str {
        &self.team_names[team]
    }

    /// The global profile.
    fn faults(&self) -> Arc<ActiveFaults> {
        Arc::clone(&self.faults.read().expect("simulator faults lock poisoned"))
    }

    fn set_faults(&self, profile: FaultProfile) {
        *self.faults.write().expect("simulator faults lock poisoned") =
            Arc::new(ActiveFaults::new(profile));
    }

    /// The team's own profile, if it has one.
    fn team_faults(&self, team: TeamIndex) -> Option<Arc<ActiveFaults>> {
        self.teams[team]
            .faults
            .read()
            .expect("simulator faults lock poisoned")
            .clone()
    }

    fn set_team_faults(&self, team: TeamIndex, profile: Option<FaultProfile>) {
        *self.teams[team]
            .faults
            .write()
            .expect("simulator faults lock poisoned") =
            profile.map(|profile| Arc::new(ActiveFaults::new(profile)));
    }

    /// The profile in force for the team's requests: its own, else the global one.
    fn faults_for(&self, team: TeamIndex) -> Arc<ActiveFaults> {
        self.team_faults(team).unwrap_or_else(|| self.faults())
    }

    fn set_api_key(&self, team: TeamIndex, key: &str) {
        *self.teams[team]
            .api_key
            .write()
            .expect("simulator api key lock poisoned") = key.to_owned();
    }

    /// A key opens only its own team; a key that opens no team at all is a 401.
    fn access(&self, team: Option<TeamIndex>, presented: Option<&[u8]>) -> Access {
        let Some(presented) = presented else {
            return Access::Unauthorized;
        };
        if let Some(team) = team.filter(|team| self.teams[*team].key_matches(presented)) {
            Access::Granted(team)
        } else if self.teams.iter().any(|known| known.key_matches(presented)) {
            Access::OtherTeam
        } else {
            Access::Unauthorized
        }
    }

    fn apply(
        &self,
        team: TeamIndex,
        object_type: ObjectType,
        operation: Operation,
        items: Vec<ApplyItem>,
        key: Option<&Arc<str>>,
    ) -> Vec<ApplyOutcome> {
        self.store().apply(
            team,
            object_type,
            operation,
            items,
            key,
            self.implicit_records,
        )
    }

    fn observe(&self, meta: &RequestMeta<'_>, outcome: RequestOutcome) {
        self.observations().record("POST", meta, outcome);
    }

    /// Every request's counters, or one team's.
    fn stats(&self, team: Option<TeamIndex>) -> SimStats {
        let mut stats = self.observations().stats(team);
        stats.records = self.store().record_count(team);
        let cache = self.idempotency();
        match team {
            None => {
                stats.idempotency_keys_cached = cache.cached();
                stats.idempotency_keys_in_progress = cache.in_progress();
            }
            Some(team) => {
                let (cached, in_progress) = cache.counts_for_team(self.team_name(team));
                stats.idempotency_keys_cached = cached;
                stats.idempotency_keys_in_progress = in_progress;
            }
        }
        stats
    }

    fn applied_log(&self, filter: LogFilter) -> Vec<AppliedChange> {
        self.store().changes(filter)
    }

    fn record(&self, team: TeamIndex, object_type: ObjectType, id: Uuid) -> Option<Value> {
        self.store().record(team, object_type, id)
    }

    fn seed_record(
        &self,
        team: TeamIndex,
        object_type: ObjectType,
        id: Uuid,
        body: Map<String, Value>,
    ) -> Value {
        self.store().seed(team, object_type, id, body)
    }

    /// Forgets records, the apply log, cached keys, statistics and recent requests, and re-seeds the
    /// random generator; API keys and fault profiles (global and per team) stay as they are.
    fn reset(&self) {
        *self.store() = Store::new(Arc::clone(&self.team_names));
        self.idempotency().clear();
        *self.observations() =
            Observations::new(REQUEST_LOG_CAPACITY, Arc::clone(&self.team_names));
        *self.rng() = StdRng::seed_from_u64(self.seed);
    }
}

/// Team ids must be told apart: a second team with the same id could never be reached.
fn check_teams(config: &SimConfig) -> Result<(), String> {
    let mut seen: Vec<Team> = Vec::new();
    let ids = std::iter::once(&config.team_id).chain(config.extra_teams.iter().map(|t| &t.team_id));
    for id in ids {
        if id.is_empty() {
            return Err("a team id must not be empty".to_owned());
        }
        if seen.iter().any(|team| team.is(id)) {
            return Err(format!("team {id:?} is configured twice"));
        }
        seen.push(Team::new(id.clone(), String::new()));
    }
    Ok(())
}

/// The simulator's entry point.
pub struct Simulator;

impl Simulator {
    /// Binds `listen` (port 0 picks a free port) and serves until [`SimHandle::shutdown`].
    pub async fn start(config: SimConfig, listen: SocketAddr) -> std::io::Result<SimHandle> {
        config
            .faults
            .validate()
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        check_teams(&config)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared::new(config, shutdown.clone()));
        let app = router(Arc::clone(&shared));
        // Small request/response pairs: Nagle's algorithm would only add delay.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "simulator server stopped with an error");
            }
        });
        tracing::debug!(%addr, "simulator listening");
        Ok(SimHandle {
            addr,
            shared,
            shutdown,
            server: Arc::new(Mutex::new(Some(server))),
        })
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v2/prism/{team_id}/{object_type}/batch/update",
            post(api::batch_update),
        )
        .route(
            "/v2/prism/{team_id}/{object_type}/batch/delete",
            post(api::batch_delete),
        )
        .route("/_sim/stats", get(admin::stats))
        .route("/_sim/requests", get(admin::requests))
        .route("/_sim/applied", get(admin::applied))
        .route("/_sim/records", post(admin::seed_records))
        .route("/_sim/records/{object_type}/{id}", get(admin::record))
        .route(
            "/_sim/faults",
            get(admin::get_faults)
                .put(admin::put_faults)
                .delete(admin::delete_faults),
        )
        .route("/_sim/api-key", put(admin::put_api_key))
        .route("/_sim/reset", post(admin::reset))
        .fallback(admin::not_found)
        .with_state(shared)
}

/// A running simulator. Clones share it; any clone can inspect it, change it or stop it.
#[derive(Clone)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    server: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` without a trailing slash: what `MICRO_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The primary team's id.
    pub fn team_id(&self) -> &str {
        self.shared.team_name(PRIMARY)
    }

    /// Every team's id, the primary team first, then the extra teams in configuration order.
    pub fn team_ids(&self) -> Vec<String> {
        self.shared.team_names.to_vec()
    }

    /// Replaces the global profile. Takes effect for the next request; requests already past their
    /// fault draw are not affected. Teams with a profile of their own keep it.
    pub fn set_faults(&self, profile: FaultProfile) {
        self.shared.set_faults(profile);
    }

    /// The global profile.
    pub fn faults(&self) -> FaultProfile {
        self.shared.faults().profile.clone()
    }

    /// Gives `team` a profile of its own, used for its requests instead of the global one (same as
    /// `PUT /_sim/faults?team=T`). Its draws come from the shared seeded generator.
    pub fn set_faults_for_team(
        &self,
        team: &str,
        profile: FaultProfile,
    ) -> Result<(), UnknownTeam> {
        let team = self.shared.team(team)?;
        self.shared.set_team_faults(team, Some(profile));
        Ok(())
    }

    /// Removes `team`'s own profile: the global one applies to it again.
    pub fn clear_faults_for_team(&self, team: &str) -> Result<(), UnknownTeam> {
        let team = self.shared.team(team)?;
        self.shared.set_team_faults(team, None);
        Ok(())
    }

    /// `team`'s own profile, or `None` when it follows the global one.
    pub fn faults_for_team(&self, team: &str) -> Result<Option<FaultProfile>, UnknownTeam> {
        let team = self.shared.team(team)?;
        Ok(self
            .shared
            .team_faults(team)
            .map(|faults| faults.profile.clone()))
    }

    /// Replaces the primary team's key: the way to revoke a key (and later restore it).
    pub fn set_api_key(&self, key: &str) {
        self.shared.set_api_key(PRIMARY, key);
    }

    /// Replaces `team`'s key; other teams' keys are untouched.
    pub fn set_api_key_for_team(&self, team: &str, key: &str) -> Result<(), UnknownTeam> {
        let team = self.shared.team(team)?;
        self.shared.set_api_key(team, key);
        Ok(())
    }

    /// Every item applied to the primary team's records, in apply order (`seq` ascending).
    pub fn applied_log(&self) -> Vec<AppliedChange> {
        self.shared.applied_log(LogFilter {
            team: Some(PRIMARY),
            ..LogFilter::default()
        })
    }

    /// Every item applied to `team`'s records, in apply order.
    pub fn applied_log_for_team(&self, team: &str) -> Result<Vec<AppliedChange>, UnknownTeam> {
        let team = self.shared.team(team)?;
        Ok(self.shared.applied_log(LogFilter {
            team: Some(team),
            ..LogFilter::default()
        }))
    }

    /// Every item applied, whichever team's, in apply order (`seq` is gap-free here).
    pub fn applied_log_all_teams(&self) -> Vec<AppliedChange> {
        self.shared.applied_log(LogFilter::default())
    }

    /// The applied changes of one of the primary team's records, in apply order.
    pub fn applied_to(&self, object_type: ObjectType, id: Uuid) -> Vec<AppliedChange> {
        self.shared.applied_log(LogFilter {
            team: Some(PRIMARY),
            record_id: Some(id),
            object_type: Some(object_type),
            after_seq: 0,
        })
    }

    /// The applied changes of one of `team`'s records, in apply order.
    pub fn applied_to_for_team(
        &self,
        team: &str,
        object_type: ObjectType,
        id: Uuid,
    ) -> Result<Vec<AppliedChange>, UnknownTeam> {
        let team = self.shared.team(team)?;
        Ok(self.shared.applied_log(LogFilter {
            team: Some(team),
            record_id: Some(id),
            object_type: Some(object_type),
            after_seq: 0,
        }))
    }

    /// The primary team's record as the API would return it, if it exists.
    pub fn record(&self, object_type: ObjectType, id: Uuid) -> Option<Value> {
        self.shared.record(PRIMARY, object_type, id)
    }

    /// `team`'s record as the API would return it, if it exists.
    pub fn record_for_team(
        &self,
        team: &str,
        object_type: ObjectType,
        id: Uuid,
    ) -> Result<Option<Value>, UnknownTeam> {
        let team = self.shared.team(team)?;
        Ok(self.shared.record(team, object_type, id))
    }

    /// Creates (or merges into) a record of the primary team without logging an applied change: what
    /// a strict-mode test needs before it can update the record.
    pub fn seed_record(&self, object_type: ObjectType, id: Uuid, default: Map<String, Value>) {
        self.shared
            .seed_record(PRIMARY, object_type, id, default_body(default));
    }

    /// [`SimHandle::seed_record`] for `team`.
    pub fn seed_record_for_team(
        &self,
        team: &str,
        object_type: ObjectType,
        id: Uuid,
        default: Map<String, Value>,
    ) -> Result<(), UnknownTeam> {
        let team = self.shared.team(team)?;
        self.shared
            .seed_record(team, object_type, id, default_body(default));
        Ok(())
    }

    /// Counters over every request, whichever team.
    pub fn stats(&self) -> SimStats {
        self.shared.stats(None)
    }

    /// Counters over the requests whose path named `team`, with that team's gauges.
    pub fn stats_for_team(&self, team: &str) -> Result<SimStats, UnknownTeam> {
        let team = self.shared.team(team)?;
        Ok(self.shared.stats(Some(team)))
    }

    /// The most recent requests (at most [`REQUEST_LOG_CAPACITY`]), oldest first.
    pub fn requests(&self) -> Vec<RequestLogEntry> {
        self.shared.observations().recent(REQUEST_LOG_CAPACITY)
    }

    /// Same as `POST /_sim/reset`.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting connections, cuts injected delays short, and waits for the server to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let server = self
            .server
            .lock()
            .expect("simulator server handle lock poisoned")
            .take();
        if let Some(server) = server {
            let _ = server.await;
        }
    }
}

fn default_body(default: Map<String, Value>) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("default".into(), Value::Object(default));
    body
}
