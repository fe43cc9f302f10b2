//! Shared test harness: a fresh database per test (a real SQLite file, or a fresh database on the
//! Postgres named by `PRISM_SYNC_TEST_DATABASE_URL`), the project's simulator over real HTTP, and
//! the engine run in-process or as a real `prism-sync` child process.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use prism_sync::engine::{Engine, EngineConfig};
use prism_sync::health::Health;
use prism_sync::settings::Settings;
use prism_sync::sim::{FaultProfile, SimConfig, SimHandle, Simulator};
use prism_sync::store::{RawPool, Store};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PG_ENV: &str = "PRISM_SYNC_TEST_DATABASE_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database made for one test and removed after it.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    /// `None` when the backend is Postgres and `PRISM_SYNC_TEST_DATABASE_URL` is unset (the
    /// test is skipped; CI always sets it, and there a Postgres that does not answer fails).
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("outbox.db").display()
                );
                Some(TestDb {
                    url,
                    backend,
                    _dir: Some(dir),
                    pg_admin: None,
                })
            }
            Backend::Postgres => {
                let Ok(server) = std::env::var(PG_ENV) else {
                    eprintln!("skipping: {PG_ENV} is not set");
                    return None;
                };
                let name = format!("prism_test_{}", Uuid::new_v4().simple());
                let mut admin = sqlx::PgPool::connect(&server)
                    .await
                    .unwrap_or_else(|e| panic!("{PG_ENV}={server} does not answer: {e}"));
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("create test database");
                admin.close().await;
                admin = sqlx::PgPool::connect(&server).await.expect("reconnect");
                drop(admin);
                let mut url = url::Url::parse(&server).expect("server URL");
                url.set_path(&name);
                Some(TestDb {
                    url: url.to_string(),
                    backend,
                    _dir: None,
                    pg_admin: Some((server, name)),
                })
            }
        }
    }

    pub async fn store(&self) -> Store {
        let s = prism_sync::settings::DatabaseSettings {
            url: self.url.clone(),
            ..Default::default()
        };
        let store = Store::connect(&s).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((server, name)) = self.pg_admin.take() {
            // Best effort, on a fresh thread (the test's runtime may be gone).
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&server).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Generates `mod sqlite { #[tokio::test] fn name }` and `mod postgres { ... }` from one body.
#[macro_export]
macro_rules! both_backends {
    ($(async fn $name:ident($db:ident) $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some($db) = common::TestDb::new(common::Backend::Sqlite).await else { return };
                    $body
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some($db) = common::TestDb::new(common::Backend::Postgres).await else { return };
                    $body
                }
            )*
        }
    };
}

pub async fn sim(faults: FaultProfile) -> SimHandle {
    let config = SimConfig {
        faults,
        seed: 42,
        ..SimConfig::default()
    };
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator")
}

/// Settings tuned for tests: fast retries, fast polls.
pub fn settings(db: &TestDb, sim: &SimHandle) -> Settings {
    let mut s = Settings::default();
    s.database.url = db.url.clone();
    s.micro.base_url = sim.base_url();
    s.micro.team_id = sim.team_id().to_owned();
    s.micro.api_key = Some(prism_sync::sim::DEFAULT_API_KEY.to_owned().into());
    s.retry.base_delay = Duration::from_millis(20);
    s.retry.max_delay = Duration::from_millis(200);
    s.poll.interval = Duration::from_millis(20);
    s.auth.probe_interval = Duration::from_millis(200);
    s.http.timeout = Duration::from_secs(5);
    s.sync.lease = Duration::from_secs(12);
    s.shutdown.grace_period = Duration::from_secs(5);
    s.validate().expect("valid test settings");
    s
}

/// An engine running in-process until the returned token is cancelled.
pub struct RunningEngine {
    pub stop: CancellationToken,
    pub health: Arc<Health>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningEngine {
    /// An engine a test started itself (e.g. to keep its load probe).
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("engine stops")
            .expect("engine task");
    }
}

pub async fn start_engine(settings: &Settings) -> RunningEngine {
    start_engine_with(settings, |_| ()).await.0
}

/// [`start_engine`], also returning what `before` takes from the engine before it runs (e.g.
/// its load probe).
pub async fn start_engine_with<T>(
    settings: &Settings,
    before: impl FnOnce(&Engine) -> T,
) -> (RunningEngine, T) {
    let mut store_settings = settings.database.clone();
    store_settings.max_connections = 4;
    let store = Store::connect(&store_settings).await.expect("connect");
    store.migrate().await.expect("migrate");
    let clients = prism_sync::daemon::team_clients(settings).expect("team clients");
    let health = Arc::new(Health::default());
    let engine = Engine::with_teams(
        store,
        clients,
        EngineConfig::from_settings(settings),
        health.clone(),
    );
    let taken = before(&engine);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        engine.run(token).await.expect("engine run");
    });
    (RunningEngine { stop, health, task }, taken)
}

/// Inserts rows with plain SQL, as an application would. Returns their ids.
pub async fn insert_rows(store: &Store, rows: &[(String, String)]) -> Vec<i64> {
    let mut ids = Vec::new();
    for (record, patch) in rows {
        let id: i64 = match store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => sqlx::query_scalar("INSERT INTO prism_outbox (record_id, patch) VALUES (?1, ?2) RETURNING id")
                .bind(record)
                .bind(patch)
                .fetch_one(p)
                .await
                .expect("insert"),
            RawPool::Postgres(p) => {
                sqlx::query_scalar("INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb) RETURNING id")
                    .bind(record)
                    .bind(patch)
                    .fetch_one(p)
                    .await
                    .expect("insert")
            }
        };
        ids.push(id);
    }
    ids
}

/// [`insert_rows`] in one transaction: on Postgres the rows share one `txid`, so the visibility
/// watermark shows all of them or none (rows inserted one transaction each can be split by a
/// transaction of another database that is committing meanwhile, which the watermark holds back
/// to be safe: a claim then takes only the first of them).
pub async fn insert_rows_together(store: &Store, rows: &[(String, String)]) -> Vec<i64> {
    let mut ids = Vec::new();
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            let mut tx = p.begin().await.expect("begin");
            for (record, patch) in rows {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO prism_outbox (record_id, patch) VALUES (?1, ?2) RETURNING id",
                )
                .bind(record)
                .bind(patch)
                .fetch_one(&mut *tx)
                .await
                .expect("insert");
                ids.push(id);
            }
            tx.commit().await.expect("commit");
        }
        RawPool::Postgres(p) => {
            let mut tx = p.begin().await.expect("begin");
            for (record, patch) in rows {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb) RETURNING id",
                )
                .bind(record)
                .bind(patch)
                .fetch_one(&mut *tx)
                .await
                .expect("insert");
                ids.push(id);
            }
            tx.commit().await.expect("commit");
        }
    }
    ids
}

/// Runs raw SQL on either engine (test set-up of odd rows).
pub async fn exec(store: &Store, sql: &str) {
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .expect("sql");
        }
        RawPool::Postgres(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .expect("sql");
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowState {
    pub id: i64,
    pub state: String,
    pub attempts: i64,
    pub code: Option<String>,
    pub batch_id: Option<String>,
}

pub async fn rows(store: &Store) -> Vec<RowState> {
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query("SELECT id, state, attempts, last_error_code, batch_id FROM prism_outbox_rows ORDER BY id")
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|r| RowState {
                id: r.get(0),
                state: r.get(1),
                attempts: r.get(2),
                code: r.get(3),
                batch_id: r.get(4),
            })
            .collect(),
        RawPool::Postgres(p) => sqlx::query(
            "SELECT id, state, attempts::bigint, last_error_code, batch_id::text FROM prism_outbox_rows ORDER BY id",
        )
        .fetch_all(p)
        .await
        .unwrap()
        .iter()
        .map(|r| RowState { id: r.get(0), state: r.get(1), attempts: r.get(2), code: r.get(3), batch_id: r.get(4) })
        .collect(),
    }
}

/// Waits until every row is `succeeded` or `dead`.
pub async fn wait_until_finished(store: &Store, within: Duration) -> Vec<RowState> {
    let deadline = Instant::now() + within;
    loop {
        let all = rows(store).await;
        if all
            .iter()
            .all(|r| r.state == "succeeded" || r.state == "dead")
        {
            return all;
        }
        if Instant::now() > deadline {
            let open: Vec<_> = all
                .iter()
                .filter(|r| r.state != "succeeded" && r.state != "dead")
                .take(10)
                .collect();
            panic!("rows still unfinished after {within:?}: {open:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_for<F: FnMut() -> bool>(what: &str, within: Duration, mut cond: F) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` changes, each of its own record.
pub fn distinct_records(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (uuid(), patch(i))).collect()
}

/// `n` changes, each of its own record, each patch carrying a note of `note_bytes` bytes beside
/// its revision.
pub fn large_changes(n: usize, note_bytes: usize) -> Vec<(String, String)> {
    let note = "n".repeat(note_bytes);
    (0..n)
        .map(|i| {
            (
                uuid(),
                format!(r#"{{"default": {{"revision": {i}, "note": "{note}"}}}}"#),
            )
        })
        .collect()
}

/// Claims the waiting rows of `team` (as stored: `''` is the default team) as process `owner`
/// would (coalescing on, 1 MiB patches), storing their batches leased to it.
pub async fn claim_as(
    store: &Store,
    owner: &str,
    lease: Duration,
    team: &str,
    max_records: usize,
    batch_size: usize,
) -> prism_sync::store::ClaimOutcome {
    store
        .claim(&prism_sync::store::ClaimRequest {
            owner,
            lease,
            max_records,
            limits: prism_sync::batch::PlanLimits {
                batch_size,
                coalesce: true,
                max_coalesce: 100,
                max_patch_bytes: 1 << 20,
                max_request_bytes: usize::MAX,
            },
            lanes: &prism_sync::store::Lane::all_of([team]),
            teams: &prism_sync::batch::TeamSet::new([team.to_owned()]),
            max_bytes: None,
            strays: false,
        })
        .await
        .expect("claim")
}

pub fn uuid() -> String {
    Uuid::new_v4().to_string()
}

pub fn patch(revision: usize) -> String {
    format!(r#"{{"default": {{"revision": {revision}, "email": "r{revision}@example.com"}}}}"#)
}

/// The simulator's apply log, checked: per record, revisions strictly increase (in order, none
/// twice). Returns the number of applied items.
pub fn assert_applied_in_order_once(sim: &SimHandle) -> usize {
    let mut last: std::collections::HashMap<Uuid, i64> = Default::default();
    let log = sim.applied_log();
    for change in &log {
        let rev = change
            .item
            .pointer("/default/revision")
            .and_then(|v| v.as_i64())
            .unwrap_or(-1);
        if let Some(prev) = last.insert(change.record_id, rev) {
            assert!(
                prev < rev,
                "record {} applied revision {rev} after {prev}",
                change.record_id
            );
        }
    }
    log.len()
}

/// A real `prism-sync` process.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub telemetry: std::net::SocketAddr,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The environment a daemon or a verb needs to reach `db` and `sim`, with test-speed timings.
pub fn child_env(db: &TestDb, sim: &SimHandle) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", db.url.as_str()),
        ("MICRO_API_KEY", prism_sync::sim::DEFAULT_API_KEY),
        ("MICRO_TEAM_ID", sim.team_id()),
        ("MICRO_BASE_URL", &sim.base_url()),
        ("PRISM_SYNC__RETRY__BASE_DELAY", "20ms"),
        ("PRISM_SYNC__RETRY__MAX_DELAY", "200ms"),
        ("PRISM_SYNC__POLL__INTERVAL", "20ms"),
        ("PRISM_SYNC__AUTH__PROBE_INTERVAL", "200ms"),
        ("PRISM_SYNC__HTTP__TIMEOUT", "5s"),
        ("PRISM_SYNC__SYNC__LEASE", "12s"),
        ("PRISM_SYNC__TELEMETRY__SAMPLE_INTERVAL", "200ms"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_prism-sync")
}

pub fn spawn_daemon(db: &TestDb, sim: &SimHandle, extra: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = free_port();
    let log = dir.path().join("daemon.log");
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("run")
        .current_dir(dir.path())
        .envs(child_env(db, sim))
        .env("PRISM_SYNC__TELEMETRY__LISTEN", telemetry.to_string())
        .env("PRISM_SYNC__LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn prism-sync run");
    Daemon {
        child,
        telemetry,
        log,
        _dir: dir,
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name}");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("daemon exits in time")
            .expect("wait")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match reqwest::get(format!("http://{}{path}", self.telemetry)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }
}

/// Starts a verb with piped stdin, stdout and stderr, in a directory of its own (kept while
/// the returned guard lives).
pub fn spawn_verb(
    db: &TestDb,
    sim: &SimHandle,
    args: &[&str],
) -> (tokio::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(bin())
        .args(args)
        .current_dir(dir.path())
        .envs(child_env(db, sim))
        .env("PRISM_SYNC__TELEMETRY__LISTEN", "")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn verb");
    (child, dir)
}

/// Runs a verb to completion: (exit code, stdout, stderr).
pub async fn verb(
    db: &TestDb,
    sim: &SimHandle,
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let (mut child, _dir) = spawn_verb(db, sim, args);
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("verb ends")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Postgres: waits until every row is below the visibility watermark (claimable). SQLite has none.
pub async fn wait_below_watermark(store: &Store) {
    let RawPool::Postgres(p) = store.raw_pool_for_tests() else {
        return;
    };
    for _ in 0..500 {
        let below: bool = sqlx::query_scalar(
            // Rows with a txid past the snapshot's xmax came from another cluster (a restore):
            // the claim takes them whatever the watermark says.
            "SELECT COALESCE(max(txid) FILTER (WHERE txid < pg_snapshot_xmax(pg_current_snapshot()))
                             < prism_outbox_watermark(pg_current_snapshot()), true)
             FROM prism_outbox",
        )
        .fetch_one(p)
        .await
        .expect("watermark");
        if below {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("rows stayed above the visibility watermark for 10 s");
}
