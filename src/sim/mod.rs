//! The Prism API simulator: a faithful, fault-injecting stand-in for the Micro bulk-update API.
//!
//! Tests start it in-process on port 0 with [`Simulator::start`]; `prism-sync simulate` serves it with
//! [`run_simulate`]. Module map:
//! - `api`: `POST /v2/prism/{teamId}/{objectType}/batch/update`, idempotency and the fault pipeline;
//! - `admin`: the inspection and control endpoints under `/_sim/` (no API key needed);
//! - `faults`: the [`FaultProfile`] and the seeded draws;
//! - `state`: records and their apply log, the idempotency cache, statistics;
//! - `cli`: the `simulate` command-line arguments.
//!
//! **Invariant:** every random decision comes from one `StdRng` seeded from [`SimConfig::seed`] (and
//! re-seeded by a reset), so a sequential client sees the same faults on every run.

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
pub use state::{AppliedChange, ObjectType, RequestLogEntry, SimStats, UnknownObjectType};

use faults::ActiveFaults;
use state::{
    ApplyItem, ApplyOutcome, IdempotencyCache, LogFilter, Observations, RequestOutcome, Store,
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

/// How the simulator behaves; [`Default`] is a well-behaved API.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub api_key: String,
    /// Requests for any other team get 404.
    pub team_id: String,
    /// `true`: every well-formed id exists (records are created on first update); `false`: an id that
    /// was not seeded (`POST /_sim/records`) is answered `not_found`.
    pub implicit_records: bool,
    /// How long a completed response is replayed under its key (24 hours in the real API).
    pub idempotency_ttl: Duration,
    pub faults: FaultProfile,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            team_id: DEFAULT_TEAM_ID.to_owned(),
            implicit_records: true,
            idempotency_ttl: Duration::from_secs(24 * 60 * 60),
            faults: FaultProfile::default(),
            seed: 0,
        }
    }
}

/// State shared by every request.
pub(crate) struct Shared {
    team_id: String,
    implicit_records: bool,
    seed: u64,
    api_key: RwLock<String>,
    faults: RwLock<Arc<ActiveFaults>>,
    rng: Mutex<StdRng>,
    store: Mutex<Store>,
    idempotency: Mutex<IdempotencyCache>,
    observations: Mutex<Observations>,
    shutdown: CancellationToken,
}

impl Shared {
    fn new(config: SimConfig, shutdown: CancellationToken) -> Self {
        Self {
            team_id: config.team_id,
            implicit_records: config.implicit_records,
            seed: config.seed,
            api_key: RwLock::new(config.api_key),
            faults: RwLock::new(Arc::new(ActiveFaults::new(config.faults))),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            store: Mutex::new(Store::default()),
            idempotency: Mutex::new(IdempotencyCache::new(
                config.idempotency_ttl,
                IDEMPOTENCY_CAPACITY,
            )),
            observations: Mutex::new(Observations::new(REQUEST_LOG_CAPACITY)),
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

    fn faults(&self) -> Arc<ActiveFaults> {
        Arc::clone(&self.faults.read().expect("simulator faults lock poisoned"))
    }

    fn set_faults(&self, profile: FaultProfile) {
        *self.faults.write().expect("simulator faults lock poisoned") =
            Arc::new(ActiveFaults::new(profile));
    }

    fn set_api_key(&self, key: &str) {
        *self
            .api_key
            .write()
            .expect("simulator api key lock poisoned") = key.to_owned();
    }

    fn api_key_matches(&self, presented: Option<&[u8]>) -> bool {
        let expected = self
            .api_key
            .read()
            .expect("simulator api key lock poisoned");
        presented.is_some_and(|presented| presented == expected.as_bytes())
    }

    /// Team ids are UUIDs: compare them as such (any case), anything else as written.
    fn team_matches(&self, team: &str) -> bool {
        match (Uuid::parse_str(team), Uuid::parse_str(&self.team_id)) {
            (Ok(asked), Ok(ours)) => asked == ours,
            _ => team == self.team_id,
        }
    }

    fn apply(
        &self,
        object_type: ObjectType,
        items: Vec<ApplyItem>,
        key: Option<&Arc<str>>,
    ) -> Vec<ApplyOutcome> {
        self.store()
            .apply(object_type, items, key, self.implicit_records)
    }

    fn observe(&self, path: &str, key: Option<&str>, outcome: RequestOutcome) {
        self.observations().record("POST", path, key, outcome);
    }

    fn stats(&self) -> SimStats {
        let mut stats = self.observations().stats();
        stats.records = self.store().record_count();
        let cache = self.idempotency();
        stats.idempotency_keys_cached = cache.cached();
        stats.idempotency_keys_in_progress = cache.in_progress();
        stats
    }

    fn applied_log(&self, filter: LogFilter) -> Vec<AppliedChange> {
        self.store().changes(filter)
    }

    fn record(&self, object_type: ObjectType, id: Uuid) -> Option<Value> {
        self.store().record(object_type, id)
    }

    fn seed_record(&self, object_type: ObjectType, id: Uuid, body: Map<String, Value>) -> Value {
        self.store().seed(object_type, id, body)
    }

    /// Forgets records, the apply log, cached keys, statistics and recent requests, and re-seeds the
    /// random generator; the API key and the fault profile stay as they are.
    fn reset(&self) {
        *self.store() = Store::default();
        self.idempotency().clear();
        *self.observations() = Observations::new(REQUEST_LOG_CAPACITY);
        *self.rng() = StdRng::seed_from_u64(self.seed);
    }
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
        .route("/_sim/stats", get(admin::stats))
        .route("/_sim/requests", get(admin::requests))
        .route("/_sim/applied", get(admin::applied))
        .route("/_sim/records", post(admin::seed_records))
        .route("/_sim/records/{object_type}/{id}", get(admin::record))
        .route(
            "/_sim/faults",
            get(admin::get_faults).put(admin::put_faults),
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

    pub fn team_id(&self) -> &str {
        &self.shared.team_id
    }

    /// Takes effect for the next request; requests already past their fault draw are not affected.
    pub fn set_faults(&self, profile: FaultProfile) {
        self.shared.set_faults(profile);
    }

    pub fn faults(&self) -> FaultProfile {
        self.shared.faults().profile.clone()
    }

    /// Replaces the accepted key: the way to revoke a key (and later restore it).
    pub fn set_api_key(&self, key: &str) {
        self.shared.set_api_key(key);
    }

    /// Every item applied, in apply order (`seq` ascending).
    pub fn applied_log(&self) -> Vec<AppliedChange> {
        self.shared.applied_log(LogFilter::default())
    }

    /// The applied changes of one record, in apply order.
    pub fn applied_to(&self, object_type: ObjectType, id: Uuid) -> Vec<AppliedChange> {
        self.shared.applied_log(LogFilter {
            record_id: Some(id),
            object_type: Some(object_type),
            after_seq: 0,
        })
    }

    /// The record as the API would return it, if it exists.
    pub fn record(&self, object_type: ObjectType, id: Uuid) -> Option<Value> {
        self.shared.record(object_type, id)
    }

    /// Creates (or merges into) a record without logging an applied change: what a strict-mode test
    /// needs before it can update the record.
    pub fn seed_record(&self, object_type: ObjectType, id: Uuid, default: Map<String, Value>) {
        let mut body = Map::new();
        body.insert("default".into(), Value::Object(default));
        self.shared.seed_record(object_type, id, body);
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
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
