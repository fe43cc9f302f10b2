//! The fault suite's harness: seeds, workloads, real `prism-sync run` processes (the normal
//! binary and the failpoints build), the simulator read over its `/_sim/` endpoints, a private
//! throwaway Postgres cluster that can be stopped and started, a SQLite lock holder, and the
//! report every scenario adds its injected faults and verdict to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prism_sync::sim::{FaultProfile, SimConfig, SimHandle, Simulator};
use prism_sync::store::{RawPool, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::checker::{self, DbSnapshot, Expect, SimSnapshot, Verdict};
use crate::common::{self, Backend, TestDb};

// ---------------------------------------------------------------------------------------------
// Seeds and scale

/// The one seed of this run: `PRISM_SYNC_FAULT_SEED`, else random (printed either way).
pub fn suite_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = match std::env::var("PRISM_SYNC_FAULT_SEED") {
            Ok(text) => text.trim().parse().unwrap_or_else(|_| {
                panic!("PRISM_SYNC_FAULT_SEED={text:?} is not an unsigned 64-bit number")
            }),
            Err(_) => rand::random(),
        };
        eprintln!("fault suite seed {seed} (reproduce with PRISM_SYNC_FAULT_SEED={seed})");
        seed
    })
}

/// `PRISM_SYNC_SOAK=1`: more rows, more kills, more restarts, more rounds.
pub fn soak() -> bool {
    std::env::var("PRISM_SYNC_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Rounds of each scenario, each with its own seed: `PRISM_SYNC_SOAK_ROUNDS`, else 3 in soak
/// mode and 1 otherwise.
pub fn rounds() -> u64 {
    match std::env::var("PRISM_SYNC_SOAK_ROUNDS") {
        Ok(n) => n
            .trim()
            .parse()
            .expect("PRISM_SYNC_SOAK_ROUNDS is a number"),
        Err(_) if soak() => 3,
        Err(_) => 1,
    }
}

/// A workload size, five times larger in soak mode.
pub fn scale(n: usize) -> usize {
    if soak() { n * 5 } else { n }
}

/// How often a fault is repeated within one scenario (kills, restarts, locks).
pub fn repeats(normal: u32, soaked: u32) -> u32 {
    if soak() { soaked } else { normal }
}

fn mix(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, folded into the seed, then splitmix64.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// The scenario table

const BOTH: &[Backend] = &[Backend::Sqlite, Backend::Postgres];
const SQLITE: &[Backend] = &[Backend::Sqlite];
const POSTGRES: &[Backend] = &[Backend::Postgres];

/// Every scenario of the suite (`family/what`) and the backends it runs on; `fuzz/…` entries run
/// once, the others once per backend and round. The report's `scenarios_expected` and
/// `scenarios_missing` come from this table (so CI notices a scenario that never ran), and
/// [`Scenario::new`] refuses a name that is not in it (so the table cannot fall behind).
pub const SCENARIOS: &[(&str, &[Backend])] = &[
    ("crash/after_claim", BOTH),
    ("crash/before_send", BOTH),
    ("crash/after_response", BOTH),
    ("crash/before_outcomes", BOTH),
    ("crash/mid_outcomes", BOTH),
    ("crash/after_outcomes", BOTH),
    ("crash/held_answer", BOTH),
    ("crash/dropped_answer", BOTH),
    ("database/pg_restart", POSTGRES),
    ("database/sqlite_lock", SQLITE),
    ("api/fault_schedule", BOTH),
    ("replicas/2_daemons_one_killed", BOTH),
    ("replicas/3_daemons_one_killed", POSTGRES),
    ("key_lifetime/5xx_until_the_key_is_old", BOTH),
    ("key_lifetime/killed_while_the_answer_is_held", BOTH),
    ("hostile_rows/outbox", BOTH),
    ("liveness/hostile_answers", BOTH),
    ("fuzz/arbitrary_bytes", &[]),
    ("fuzz/transport_failures", &[]),
    ("fuzz/json_shaped_200s", &[]),
    ("fuzz/json_shaped_non_200s", &[]),
    ("fuzz/retry_headers", &[]),
];

/// The names every scenario of this run records under: the table times backends and rounds.
pub fn expected_scenarios() -> Vec<String> {
    let mut names = Vec::new();
    for (base, backends) in SCENARIOS {
        if backends.is_empty() {
            names.push((*base).to_owned());
        }
        for backend in *backends {
            for round in 0..rounds() {
                let (family, what) = base.split_once('/').unwrap_or((base, ""));
                names.push(scenario_name(family, what, *backend, round));
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Scenario bookkeeping and the report

/// One scenario run: its name, its seed (derived from the suite seed and the name), the random
/// generator that drives its workload, simulator faults and kill schedule, and what it injected.
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    pub rng: StdRng,
    started: Instant,
    injected: BTreeMap<String, u64>,
    notes: Vec<String>,
}

impl Scenario {
    pub fn new(name: impl Into<String>) -> Scenario {
        let name = name.into();
        assert!(
            expected_scenarios().contains(&name),
            "scenario {name} is not in harness::SCENARIOS: add it, so that the report expects it"
        );
        let seed = mix(suite_seed(), &name);
        eprintln!("[{name}] seed {seed}");
        Scenario {
            rng: StdRng::seed_from_u64(seed),
            name,
            seed,
            started: Instant::now(),
            injected: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// Counts an injected fault (`kill:after_claim`, `pg_restart`, `sqlite_lock`, ...).
    pub fn inject(&mut self, kind: impl Into<String>, n: u64) {
        *self.injected.entry(kind.into()).or_default() += n;
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("[{}] {note}", self.name);
        self.notes.push(note);
    }

    /// Reports a scenario that could not run here, loudly.
    pub fn skip(self, why: &str) {
        eprintln!("\n!!! SKIPPED [{}]: {why}\n", self.name);
        record(
            self.name.clone(),
            ScenarioReport {
                seed: self.seed,
                verdict: format!("skipped: {why}"),
                ..ScenarioReport::default()
            },
        );
    }

    /// Records the scenario in the report, then fails the test if the checker found anything.
    pub fn finish(self, sim_stats: &Value, verdict: Verdict) {
        let mut sim = BTreeMap::new();
        if let Some(faults) = sim_stats["faults_injected"].as_object() {
            for (kind, n) in faults {
                sim.insert(kind.clone(), n.as_u64().unwrap_or(0));
            }
        }
        for key in [
            "requests_total",
            "replays",
            "items_applied",
            "items_failed",
            "idempotency_in_progress",
            "idempotency_mismatches",
        ] {
            sim.insert(format!("stat:{key}"), sim_stats[key].as_u64().unwrap_or(0));
        }
        let passed = verdict.violations.is_empty();
        let report = ScenarioReport {
            seed: self.seed,
            duration_s: (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            injected: self.injected,
            sim,
            verdict: if passed { "pass".into() } else { "FAIL".into() },
            checker: Some(verdict.clone()),
            notes: self.notes,
        };
        eprintln!(
            "[{}] {} in {:.1}s: injected {:?}; checker: {} rows ({} succeeded, {} dead), {} applied, {} replays, {} re-applied after release",
            self.name,
            report.verdict,
            report.duration_s,
            report.injected,
            verdict.rows,
            verdict.succeeded,
            verdict.dead,
            verdict.applied,
            verdict.replays,
            verdict.reapplied_after_release,
        );
        record(self.name.clone(), report);
        assert!(
            passed,
            "[{}] the checker found {} violation(s) (reproduce with PRISM_SYNC_FAULT_SEED={}):\n  {}",
            self.name,
            verdict.violations.len(),
            suite_seed(),
            verdict.violations.join("\n  ")
        );
    }

    /// Fails the scenario outside the checker (a fault that did not take effect, a daemon that
    /// did not die at its failpoint), with the seed to reproduce it.
    #[track_caller]
    pub fn fail(&self, what: impl std::fmt::Display) -> ! {
        record(
            self.name.clone(),
            ScenarioReport {
                seed: self.seed,
                verdict: format!("FAIL: {what}"),
                injected: self.injected.clone(),
                ..ScenarioReport::default()
            },
        );
        panic!(
            "[{}] {what} (reproduce with PRISM_SYNC_FAULT_SEED={})",
            self.name,
            suite_seed()
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioReport {
    /// A string: JSON readers such as jq would round a 64-bit number.
    #[serde(serialize_with = "as_text")]
    pub seed: u64,
    pub duration_s: f64,
    /// Faults the suite injected itself: kills per failpoint, Postgres restarts, SQLite locks.
    pub injected: BTreeMap<String, u64>,
    /// The simulator's own counters (`/_sim/stats`): faults by kind, requests, replays.
    pub sim: BTreeMap<String, u64>,
    pub verdict: String,
    pub checker: Option<Verdict>,
    pub notes: Vec<String>,
}

fn as_text<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&n.to_string())
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(serialize_with = "as_text")]
    seed: u64,
    soak: bool,
    rounds: u64,
    verdict: &'a str,
    /// How many scenarios this run should record ([`SCENARIOS`] times backends and rounds);
    /// CI fails when `scenarios_run` falls short of it.
    scenarios_expected: usize,
    scenarios_run: usize,
    scenarios_skipped: usize,
    /// Expected scenarios with no entry (yet: the report is rewritten as each one ends).
    scenarios_missing: Vec<String>,
    /// Sums over every scenario of this run.
    injected_total: BTreeMap<String, u64>,
    sim_faults_total: BTreeMap<String, u64>,
    scenarios: &'a BTreeMap<String, ScenarioReport>,
}

static REPORT: Mutex<BTreeMap<String, ScenarioReport>> = Mutex::new(BTreeMap::new());

/// Where the report goes: `PRISM_SYNC_FAULT_REPORT`, else `<target dir>/fault-suite-report.json`.
pub fn report_path() -> PathBuf {
    if let Ok(path) = std::env::var("PRISM_SYNC_FAULT_REPORT") {
        return PathBuf::from(path);
    }
    target_dir().join("fault-suite-report.json")
}

/// Adds a fuzz property's run to the report.
pub fn record_fuzz(property: &str, cases: u32, seconds: f64, failure: Option<String>) {
    record(
        format!("fuzz/{property}"),
        ScenarioReport {
            seed: suite_seed(),
            duration_s: (seconds * 10.0).round() / 10.0,
            injected: BTreeMap::from([("fuzz_cases".to_owned(), u64::from(cases))]),
            verdict: failure.map_or_else(|| "pass".to_owned(), |f| format!("FAIL: {f}")),
            ..ScenarioReport::default()
        },
    );
}

fn record(name: String, report: ScenarioReport) {
    let mut all = REPORT.lock().unwrap_or_else(|e| e.into_inner());
    all.insert(name, report);
    let mut injected_total = BTreeMap::new();
    let mut sim_faults_total = BTreeMap::new();
    for r in all.values() {
        for (k, v) in &r.injected {
            *injected_total.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.sim {
            *sim_faults_total.entry(k.clone()).or_default() += v;
        }
    }
    let skipped = all
        .values()
        .filter(|r| r.verdict.starts_with("skipped"))
        .count();
    let failed = all.values().any(|r| r.verdict.starts_with("FAIL"));
    let expected = expected_scenarios();
    let report = Report {
        seed: suite_seed(),
        soak: soak(),
        rounds: rounds(),
        verdict: if failed { "FAIL" } else { "pass" },
        scenarios_expected: expected.len(),
        scenarios_run: all.len() - skipped,
        scenarios_skipped: skipped,
        scenarios_missing: expected
            .into_iter()
            .filter(|name| !all.contains_key(name))
            .collect(),
        injected_total,
        sim_faults_total,
        scenarios: &all,
    };
    let path = report_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let text = serde_json::to_string_pretty(&report).expect("report serialises");
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!(
            "cannot write the fault-suite report {}: {e}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Running scenarios

/// Runs one scenario per backend at once, each to completion, then fails if either failed.
pub async fn on_both_backends<F, Fut>(scenario: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sqlite = tokio::spawn(scenario(Backend::Sqlite));
    let postgres = tokio::spawn(scenario(Backend::Postgres));
    let (a, b) = (sqlite.await, postgres.await);
    for result in [a, b] {
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// `family/what/backend`, with `#round` when soaking several rounds.
pub fn scenario_name(family: &str, what: &str, backend: Backend, round: u64) -> String {
    let base = format!("{family}/{what}/{}", backend_name(backend));
    if rounds() > 1 {
        format!("{base}#{round}")
    } else {
        base
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// The normal `prism-sync` binary cargo built for the tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prism-sync"))
}

/// The target directory the tests were built in (`…/target`).
pub fn target_dir() -> PathBuf {
    let bin = bin();
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The `prism-sync` binary built with `--features failpoints`.
///
/// `PRISM_SYNC_FAILPOINTS_BIN` names it when set (CI builds it before `cargo test`); otherwise
/// the first test that needs it runs `cargo build --features failpoints` into
/// `<target dir>/failpoints` (a target directory of its own, so it neither waits for the lock of
/// the `cargo test` that is running us nor replaces the normal binary). Either way a missing or
/// unbuildable binary fails the test: the crash scenarios never skip.
pub fn failpoints_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("PRISM_SYNC_FAILPOINTS_BIN") {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "PRISM_SYNC_FAILPOINTS_BIN={} does not exist",
                    path.display()
                ))
            };
        }
        let dir = target_dir().join("failpoints");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        eprintln!(
            "building the failpoints binary: cargo build --features failpoints --bin prism-sync --target-dir {}",
            dir.display()
        );
        let started = Instant::now();
        let status = std::process::Command::new(cargo)
            .args(["build", "--features", "failpoints", "--bin", "prism-sync"])
            .arg("--target-dir")
            .arg(&dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("CARGO_TARGET_DIR")
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build --features failpoints failed: {status}"));
        }
        eprintln!(
            "failpoints binary built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(dir.join("debug").join("prism-sync"))
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("the failpoints binary is needed for the crash scenarios: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator

pub struct Sim {
    pub handle: SimHandle,
    http: reqwest::Client,
}

impl Sim {
    pub async fn start(sc: &mut Scenario, faults: FaultProfile, ttl: Option<Duration>) -> Sim {
        let mut config = SimConfig {
            faults,
            seed: sc.rng.random(),
            ..SimConfig::default()
        };
        if let Some(ttl) = ttl {
            config.idempotency_ttl = ttl;
        }
        let handle = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
            .await
            .expect("simulator starts");
        Sim {
            handle,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub fn base_url(&self) -> String {
        self.handle.base_url()
    }

    pub fn set_faults(&self, faults: FaultProfile) {
        self.handle.set_faults(faults);
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base_url());
        self.http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| panic!("GET {url}: not JSON"))
    }

    /// `PUT /_sim/api-key`: revokes the key the daemon holds (or restores it).
    pub async fn put_api_key(&self, key: &str) {
        let url = format!("{}/_sim/api-key", self.base_url());
        let response = self
            .http
            .put(&url)
            .header("content-type", "application/json")
            .body(serde_json::json!({ "api_key": key }).to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
        assert_eq!(response.status().as_u16(), 204, "PUT {url}");
    }

    /// `GET /_sim/stats`.
    pub async fn stats(&self) -> Value {
        self.get("/_sim/stats").await
    }

    pub async fn fault_count(&self, kind: &str) -> u64 {
        self.stats().await["faults_injected"][kind]
            .as_u64()
            .unwrap_or(0)
    }

    /// The request log (`GET /_sim/requests`), oldest first.
    pub async fn requests(&self) -> Vec<checker::Request> {
        serde_json::from_value(self.get("/_sim/requests").await).expect("request log")
    }

    /// The apply log (`GET /_sim/applied`, seq order), the request log and the statistics.
    pub async fn snapshot(&self) -> SimSnapshot {
        let applied: Vec<checker::Applied> =
            serde_json::from_value(self.get("/_sim/applied").await).expect("apply log");
        SimSnapshot {
            applied,
            requests: self.requests().await,
            stats: self.stats().await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// One outbox row the workload will insert: its record, its patch and its marker (the row's
/// ordinal among its record's rows, `default.n` in the patch).
#[derive(Debug, Clone)]
pub struct PlannedRow {
    pub record: String,
    pub patch: String,
}

/// `rows` changes over `records` records: each patch carries `{"default": {"n": k}}` with `k`
/// the row's ordinal within its record (so applied markers must strictly increase per record);
/// about one in five also carries `list`, which prism-sync never coalesces.
pub fn workload(rng: &mut StdRng, records: usize, rows: usize) -> Vec<PlannedRow> {
    let ids: Vec<String> = (0..records.max(1))
        .map(|_| Uuid::from_u128(rng.random()).to_string())
        .collect();
    let mut next: Vec<u64> = vec![0; ids.len()];
    (0..rows)
        .map(|_| {
            // Skewed: a few records get many changes (long coalescing chains), most get few.
            let r = if rng.random_bool(0.3) {
                rng.random_range(0..ids.len().min(4))
            } else {
                rng.random_range(0..ids.len())
            };
            next[r] += 1;
            let n = next[r];
            let patch = if rng.random_bool(0.2) {
                format!(r#"{{"default": {{"n": {n}, "email": "r{n}@example.com"}}, "list": {{"tags": ["t{n}"]}}}}"#)
            } else {
                format!(r#"{{"default": {{"n": {n}, "email": "r{n}@example.com"}}}}"#)
            };
            PlannedRow {
                record: ids[r].clone(),
                patch,
            }
        })
        .collect()
}

/// Splits `rows` into `parts` consecutive chunks of random sizes (none empty when possible).
pub fn chunks(rng: &mut StdRng, rows: &[PlannedRow], parts: usize) -> Vec<Vec<PlannedRow>> {
    if rows.is_empty() {
        return Vec::new();
    }
    let parts = parts.clamp(1, rows.len().max(1));
    let mut cuts: Vec<usize> = (0..parts - 1)
        .map(|_| rng.random_range(1..rows.len().max(2)))
        .collect();
    cuts.push(0);
    cuts.push(rows.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| rows[w[0]..w[1]].to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------
// Databases

/// A database for one scenario: a SQLite file, a database on the shared Postgres
/// (`PRISM_SYNC_TEST_DATABASE_URL`), or one on a private cluster.
pub struct Db {
    pub url: String,
    pub store: Store,
    _test_db: Option<TestDb>,
}

impl Db {
    /// `None` when the backend is Postgres and `PRISM_SYNC_TEST_DATABASE_URL` is unset.
    pub async fn new(backend: Backend) -> Option<Db> {
        let test_db = TestDb::new(backend).await?;
        let store = test_db.store().await;
        Some(Db {
            url: test_db.url.clone(),
            store,
            _test_db: Some(test_db),
        })
    }

    /// A fresh database on a private cluster (dropped with the cluster).
    pub async fn on_cluster(cluster: &PgCluster) -> Db {
        let admin = sqlx::PgPool::connect(&cluster.server_url())
            .await
            .expect("private cluster answers");
        let name = format!("fault_{}", Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let url = format!("{}/{name}", cluster.server_root());
        let store = Store::connect(&prism_sync::settings::DatabaseSettings {
            url: url.clone(),
            max_connections: 4,
            ..Default::default()
        })
        .await
        .expect("connect");
        store.migrate().await.expect("migrate");
        Db {
            url,
            store,
            _test_db: None,
        }
    }

    /// Inserts rows in one transaction, with plain SQL as an application would.
    pub async fn insert(&self, rows: &[PlannedRow]) -> Result<(), sqlx::Error> {
        match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for row in rows {
                    sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (?1, ?2)")
                        .bind(&row.record)
                        .bind(&row.patch)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            }
            RawPool::Postgres(p) => {
                let mut tx = p.begin().await?;
                for row in rows {
                    sqlx::query(
                        "INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb)",
                    )
                    .bind(&row.record)
                    .bind(&row.patch)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            }
        }
    }

    /// Inserts, retrying while the database is away (an application would retry its transaction).
    pub async fn insert_retrying(&self, rows: &[PlannedRow]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.insert(rows).await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the workload could not insert for 120 s: {e}"),
            }
        }
    }

    /// (rows finished, all rows, rows succeeded); `None` while the database does not answer.
    pub async fn progress(&self) -> Option<(i64, i64, i64)> {
        let sql = "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'dead')), count(*),
                          count(*) FILTER (WHERE state = 'succeeded')
                   FROM prism_outbox_rows";
        match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => sqlx::query_as(sql).fetch_one(p).await.ok(),
            RawPool::Postgres(p) => sqlx::query_as(sql).fetch_one(p).await.ok(),
        }
    }

    /// Open batches leased to the process with this pid (lease owners are `host:pid:suffix`).
    pub async fn leased_by(&self, pid: u32) -> i64 {
        let pattern = format!("%:{pid}:%");
        let sql = "SELECT count(*) FROM prism_batches WHERE state = 'open' AND lease_owner LIKE $1";
        match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => sqlx::query_scalar(sql)
                .bind(pattern)
                .fetch_one(p)
                .await
                .unwrap_or(0),
            RawPool::Postgres(p) => sqlx::query_scalar(sql)
                .bind(pattern)
                .fetch_one(p)
                .await
                .unwrap_or(0),
        }
    }

    /// Keys of the batches for which the daemon recorded an attempt answered `status`.
    pub async fn keys_answered(&self, status: i32) -> Vec<String> {
        let sql = "SELECT DISTINCT b.idempotency_key FROM prism_batch_attempts a
                   JOIN prism_batches b ON b.id = a.batch_id WHERE a.http_status = $1";
        match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => sqlx::query_scalar(sql).bind(status).fetch_all(p).await,
            RawPool::Postgres(p) => sqlx::query_scalar(sql).bind(status).fetch_all(p).await,
        }
        .expect("read batch attempts")
    }

    /// Rows by state, open batches and (Postgres) the visibility watermark and the oldest
    /// transactions of the cluster, for failure messages.
    pub async fn diagnose(&self) -> String {
        let states = "SELECT state || ':' || count(*) FROM prism_outbox_rows GROUP BY state";
        let batches = "SELECT state || ':' || count(*) FROM prism_batches GROUP BY state";
        match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => {
                let a: Vec<String> = sqlx::query_scalar(states)
                    .fetch_all(p)
                    .await
                    .unwrap_or_default();
                let b: Vec<String> = sqlx::query_scalar(batches)
                    .fetch_all(p)
                    .await
                    .unwrap_or_default();
                format!("rows {a:?}, batches {b:?}")
            }
            RawPool::Postgres(p) => {
                let a: Vec<String> = sqlx::query_scalar(states)
                    .fetch_all(p)
                    .await
                    .unwrap_or_default();
                let b: Vec<String> = sqlx::query_scalar(batches)
                    .fetch_all(p)
                    .await
                    .unwrap_or_default();
                let w: Option<String> = sqlx::query_scalar(
                    "SELECT COALESCE(max(txid)::text, '-') || ' vs ' || prism_outbox_watermark(pg_current_snapshot())::text
                     FROM prism_outbox WHERE state IN ('pending', 'retrying')",
                )
                .fetch_one(p)
                .await
                .ok();
                let old: Vec<String> = sqlx::query_scalar(
                    "SELECT datname || ' pid ' || pid || ' xact ' || (now() - xact_start)::text || ' ' || left(query, 60)
                     FROM pg_stat_activity WHERE xact_start IS NOT NULL AND backend_xid IS NOT NULL
                     ORDER BY xact_start LIMIT 3",
                )
                .fetch_all(p)
                .await
                .unwrap_or_default();
                format!("rows {a:?}, batches {b:?}, watermark {w:?}, oldest writers {old:?}")
            }
        }
    }

    /// Waits until every row is `succeeded` or `dead`; the error names what is still open.
    pub async fn wait_finished(
        &self,
        expected_rows: usize,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((done, all, _)) = self.progress().await
                && done == all
                && all as usize >= expected_rows
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let snap = self.snapshot().await;
                let open: Vec<String> = snap
                    .rows
                    .iter()
                    .filter(|r| r.state != "succeeded" && r.state != "dead")
                    .take(8)
                    .map(|r| format!("row {} {} ({:?})", r.id, r.state, r.code))
                    .collect();
                return Err(format!(
                    "{} of {expected_rows} rows inserted, unfinished after {within:?}: {open:?}; {}",
                    snap.rows.len(),
                    self.diagnose().await
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rows and batches as the checker reads them.
    pub async fn snapshot(&self) -> DbSnapshot {
        use sqlx::Row;
        let (rows, batches) = match self.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => {
                let rows = sqlx::query(
                    "SELECT id, CAST(record_id AS BLOB),
                            CASE WHEN length(CAST(patch AS BLOB)) > 65536 THEN NULL ELSE CAST(patch AS BLOB) END,
                            state, last_error_code
                     FROM prism_outbox_rows ORDER BY id",
                )
                .fetch_all(p)
                .await
                .expect("read rows")
                .iter()
                .map(|r| {
                    checker::OutboxRow::new(
                        r.get(0),
                        &r.get::<Vec<u8>, _>(1),
                        r.get::<Option<Vec<u8>>, _>(2).as_deref(),
                        r.get(3),
                        r.get(4),
                    )
                })
                .collect();
                let batches =
                    sqlx::query("SELECT id, idempotency_key, state, items FROM prism_batches")
                        .fetch_all(p)
                        .await
                        .expect("read batches")
                        .iter()
                        .map(|r| {
                            checker::BatchRow::new(
                                r.get(0),
                                r.get(1),
                                r.get(2),
                                &r.get::<String, _>(3),
                            )
                        })
                        .collect();
                (rows, batches)
            }
            RawPool::Postgres(p) => {
                let rows = sqlx::query(
                    "SELECT id, record_id::text,
                            CASE WHEN octet_length(patch::text) > 65536 THEN NULL ELSE patch::text END,
                            state, last_error_code
                     FROM prism_outbox_rows ORDER BY id",
                )
                .fetch_all(p)
                .await
                .expect("read rows")
                .iter()
                .map(|r| {
                    checker::OutboxRow::new(
                        r.get(0),
                        r.get::<String, _>(1).as_bytes(),
                        r.get::<Option<String>, _>(2).as_deref().map(str::as_bytes),
                        r.get(3),
                        r.get(4),
                    )
                })
                .collect();
                let batches = sqlx::query(
                    "SELECT id::text, idempotency_key, state, items FROM prism_batches",
                )
                .fetch_all(p)
                .await
                .expect("read batches")
                .iter()
                .map(|r| {
                    checker::BatchRow::new(r.get(0), r.get(1), r.get(2), &r.get::<String, _>(3))
                })
                .collect();
                (rows, batches)
            }
        };
        DbSnapshot { rows, batches }
    }
}

/// Keeps inserting `parts` while the scenario runs, pausing between chunks.
pub fn feed(
    db: &std::sync::Arc<Db>,
    parts: Vec<Vec<PlannedRow>>,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        for part in parts {
            db.insert_retrying(&part).await;
            tokio::time::sleep(pause).await;
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The daemon as a real process

/// `http.max_retry_after` of every test daemon: the longest pause a 429 may impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings for a fast test run: 1 s request timeout, 6 s lease (the least `sync.lease ≥
/// http.timeout + 5s` allows), quick retries and polls, small batches so a small workload
/// crosses many batch boundaries.
pub fn daemon_env(db: &Db, sim: &Sim) -> Vec<(String, String)> {
    let max_retry_after = format!("{}ms", MAX_RETRY_AFTER.as_millis());
    [
        ("DATABASE_URL", db.url.as_str()),
        ("MICRO_API_KEY", prism_sync::sim::DEFAULT_API_KEY),
        ("MICRO_TEAM_ID", sim.handle.team_id()),
        ("MICRO_BASE_URL", &sim.base_url()),
        ("PRISM_SYNC__RETRY__BASE_DELAY", "20ms"),
        ("PRISM_SYNC__RETRY__MAX_DELAY", "250ms"),
        ("PRISM_SYNC__POLL__INTERVAL", "20ms"),
        ("PRISM_SYNC__AUTH__PROBE_INTERVAL", "200ms"),
        ("PRISM_SYNC__HTTP__TIMEOUT", "1s"),
        ("PRISM_SYNC__HTTP__MAX_RETRY_AFTER", &max_retry_after),
        // A batch is released only where a scenario drives it past `batch.max_key_age`
        // (key_lifetime): a release after `batch.max_attempts` in a long fault storm would be
        // legitimate, and would blur the checker's "no release" promise everywhere else.
        ("PRISM_SYNC__BATCH__MAX_ATTEMPTS", "1000"),
        ("PRISM_SYNC__SYNC__LEASE", "6s"),
        ("PRISM_SYNC__SYNC__MAX_IN_FLIGHT", "4"),
        ("PRISM_SYNC__BATCH__SIZE", "20"),
        ("PRISM_SYNC__DATABASE__MAX_CONNECTIONS", "4"),
        ("PRISM_SYNC__SHUTDOWN__GRACE_PERIOD", "3s"),
        ("PRISM_SYNC__TELEMETRY__SAMPLE_INTERVAL", "200ms"),
        ("PRISM_SYNC__TELEMETRY__LISTEN", "127.0.0.1:0"),
        ("PRISM_SYNC__LOG__FORMAT", "json"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// A running `prism-sync run`.
pub struct Daemon {
    pub label: String,
    child: tokio::process::Child,
    pub pid: u32,
    pub log: PathBuf,
    telemetry: Option<std::net::SocketAddr>,
    exited: Option<std::process::ExitStatus>,
    /// The scenario killed it (`kill9`): its exit is no surprise to [`stop_daemon`].
    killed: bool,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `bin run` with the test environment plus `extra` (later entries win).
    pub fn spawn(
        sc: &Scenario,
        label: &str,
        bin: &Path,
        db: &Db,
        sim: &Sim,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("run")
            .current_dir(dir.path())
            .envs(daemon_env(db, sim))
            .env_remove("RUST_LOG")
            .env_remove("FAILPOINTS")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn prism-sync run");
        let pid = child.id().expect("pid");
        Daemon {
            label: format!("{}/{label}", sc.name),
            child,
            pid,
            log,
            telemetry: None,
            exited: None,
            killed: false,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process has exited (and how).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// The telemetry address the daemon bound (port 0), read from its log.
    pub async fn telemetry(&mut self) -> Option<std::net::SocketAddr> {
        if self.telemetry.is_some() {
            return self.telemetry;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for line in self.logs().lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("serving /metrics"))
                    && let Some(addr) = v["fields"]["address"].as_str().and_then(|a| a.parse().ok())
                {
                    self.telemetry = Some(addr);
                    return self.telemetry;
                }
            }
            if self.try_exit().is_some() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    pub async fn get(&mut self, path: &str) -> (u16, String) {
        let Some(addr) = self.telemetry().await else {
            return (0, String::new());
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        match client.get(format!("http://{addr}{path}")).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub async fn readyz(&mut self) -> u16 {
        self.get("/readyz").await.0
    }

    /// Polls `/readyz` until it answers `want`; `false` after `within` or if the process exits.
    pub async fn wait_readyz(&mut self, want: u16, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.try_exit().is_some() {
                return false;
            }
            if self.readyz().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// A counter or gauge from `/metrics` (0 when the scrape has no such line: a counter appears
    /// once counted); an error when `/metrics` does not answer 200.
    pub async fn metric(&mut self, name_and_labels: &str) -> Result<f64, String> {
        let (status, text) = self.get("/metrics").await;
        if status != 200 {
            return Err(format!(
                "{}: /metrics answered {status} (0: no answer), so {name_and_labels} could not be read",
                self.label
            ));
        }
        Ok(text
            .lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    /// `kill -9`, then waits for the process to be gone; an error if it is not within 10 s.
    pub async fn kill9(&mut self) -> Result<(), String> {
        self.still_running("kill -9")?;
        self.killed = true;
        let _ = self.child.start_kill();
        match self.wait_exit(Duration::from_secs(10)).await {
            Some(_) => Ok(()),
            None => Err(format!(
                "{} did not exit within 10 s of kill -9",
                self.label
            )),
        }
    }

    /// An error, with the log's tail, when the process has already exited before `what`.
    fn still_running(&mut self, what: &str) -> Result<(), String> {
        if self.try_exit().is_some() {
            return Err(format!(
                "{} had already exited ({:?}) before {what}; log tail:\n{}",
                self.label,
                self.exited,
                self.tail(15)
            ));
        }
        Ok(())
    }

    /// Freezes the process (SIGSTOP): it holds what it holds, and neither finishes nor commits
    /// anything until [`Daemon::resume`] or a kill.
    pub fn pause(&mut self) -> Result<(), String> {
        self.send_signal(libc::SIGSTOP, "SIGSTOP")
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&mut self) -> Result<(), String> {
        self.send_signal(libc::SIGCONT, "SIGCONT")
    }

    fn send_signal(&mut self, signal: libc::c_int, name: &str) -> Result<(), String> {
        self.still_running(name)?;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (it has not exited).
        if unsafe { libc::kill(self.pid as libc::pid_t, signal) } != 0 {
            return Err(format!(
                "{name} to {} failed: {}",
                self.label,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.exited {
            return Some(status);
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Some(status)
            }
            _ => None,
        }
    }

    /// SIGTERM, then the exit code (`None` if it did not exit in time or died by a signal).
    pub async fn terminate(&mut self) -> Option<i32> {
        if self.try_exit().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        self.wait_exit(Duration::from_secs(30))
            .await
            .and_then(|s| s.code())
    }

    /// (VmHWM, VmRSS) in KiB from `/proc/<pid>/status`, while the process runs.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }
}

impl Drop for Daemon {
    /// Keeps the log under `<target>/fault-suite-logs/<scenario>/` for a post-mortem.
    fn drop(&mut self) {
        let dest = target_dir()
            .join("fault-suite-logs")
            .join(self.label.replace(['#'], "-"));
        if let Some(dir) = dest.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let _ = std::fs::copy(&self.log, dest.with_extension("log"));
        }
    }
}

/// Waits until every row is finished, then stops the daemon: what went wrong on the way (a
/// timeout, with the daemon's name and log tail, then whatever stopping it found).
pub async fn finish_and_stop(
    db: &Db,
    daemon: &mut Daemon,
    rows: usize,
    within: Duration,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = db.wait_finished(rows, within).await {
        problems.push(format!(
            "{} daemon: {e}; log tail:\n{}",
            daemon.label,
            daemon.tail(15)
        ));
    }
    problems.extend(stop_daemon(daemon).await);
    problems
}

/// Stops a daemon cleanly at the end of a scenario and reads its key-mismatch counter first.
/// Returns violations: a daemon that counted a mismatch, whose `/metrics` did not answer, that
/// did not exit 0 on SIGTERM, or that had exited by itself (one the scenario killed is fine).
pub async fn stop_daemon(daemon: &mut Daemon) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(status) = daemon.try_exit() {
        if !daemon.killed {
            problems.push(format!(
                "{} exited by itself ({status}) before the end of the scenario; log tail:\n{}",
                daemon.label,
                daemon.tail(20)
            ));
        }
        return problems;
    }
    match daemon.metric("prism_sync_key_mismatches_total").await {
        Ok(mismatches) if mismatches > 0.0 => problems.push(format!(
            "{}: prism_sync_key_mismatches_total = {mismatches}",
            daemon.label
        )),
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
    match daemon.terminate().await {
        Some(0) => {}
        other => problems.push(format!(
            "{}: SIGTERM did not end in exit 0 ({other:?}); log tail:\n{}",
            daemon.label,
            daemon.tail(20)
        )),
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `cond` every 50 ms until it holds or `within` passes. A timeout is an error naming
/// `what` was awaited: a scenario must fail on it rather than go on as if it had happened (a
/// `Result`, so that a dropped one is a compile-time warning, and CI denies warnings).
pub async fn until<F, Fut>(what: &str, within: Duration, mut cond: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads both sides and runs the checker, adding `extra` violations found by the scenario.
pub async fn check(db: &Db, sim: &Sim, expect: &Expect, extra: Vec<String>) -> (Value, Verdict) {
    let snapshot = sim.snapshot().await;
    let mut verdict = checker::check(&db.snapshot().await, &snapshot, expect);
    verdict.violations.extend(extra);
    (snapshot.stats, verdict)
}

// ---------------------------------------------------------------------------------------------
// A private Postgres cluster

/// A throwaway Postgres cluster in a temporary directory, on a port of its own, that a scenario
/// may stop (`-m immediate`: a crash) and start again without touching the shared server.
pub struct PgCluster {
    root: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
}

pub enum ClusterError {
    /// The Postgres server binaries are not installed: skip, loudly.
    Missing(String),
    /// They are, but the cluster did not start.
    Failed(String),
}

impl PgCluster {
    fn find_bindir() -> Option<PathBuf> {
        let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
        if preferred.join("initdb").is_file() && preferred.join("pg_ctl").is_file() {
            return Some(preferred);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file())
            .collect();
        found.sort();
        found.pop()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs a Postgres tool as the `postgres` user (as root) or as ourselves.
    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bindir.join(tool);
        let mut cmd = if Self::is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn create() -> Result<PgCluster, ClusterError> {
        let Some(bindir) = Self::find_bindir() else {
            return Err(ClusterError::Missing(
                "no /usr/lib/postgresql/*/bin/initdb and pg_ctl".into(),
            ));
        };
        let root = tempfile::Builder::new()
            .prefix("prism-fault-pg-")
            .tempdir()
            .map_err(|e| ClusterError::Failed(e.to_string()))?;
        if Self::is_root() {
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(root.path())
                .status()
                .map_err(|e| ClusterError::Failed(format!("chown: {e}")))?;
            if !ok.success() {
                return Err(ClusterError::Failed("chown postgres failed".into()));
            }
        }
        let cluster = PgCluster {
            root,
            bindir,
            port: common::free_port().port(),
        };
        let data = cluster.data();
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )
            .map_err(ClusterError::Failed)?;
        cluster.start().map_err(ClusterError::Failed)?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.root.path().join("data").display().to_string()
    }

    pub fn start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60 -c shared_buffers=16MB",
            self.port,
            self.root.path().display()
        );
        let log = self.root.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// `pg_ctl stop -m immediate`: every backend is killed, no checkpoint; the next start
    /// recovers from the WAL, as after a crash.
    pub fn stop_immediate(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        )
    }

    pub fn server_root(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub fn server_url(&self) -> String {
        format!("{}/postgres", self.server_root())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}

/// Whether the private-cluster scenarios must run: a missing installation skips them (loudly),
/// but when `PRISM_SYNC_TEST_DATABASE_URL` is set (CI) a cluster that does not start fails.
pub fn cluster_or_skip(sc: Scenario) -> Result<(Scenario, PgCluster), ()> {
    match PgCluster::create() {
        Ok(cluster) => Ok((sc, cluster)),
        Err(ClusterError::Missing(why)) => {
            sc.skip(&format!("Postgres server binaries missing: {why}"));
            Err(())
        }
        Err(ClusterError::Failed(why)) => {
            if std::env::var(common::PG_ENV).is_ok() {
                sc.fail(format!("the private Postgres cluster did not start: {why}"));
            }
            sc.skip(&format!(
                "the private Postgres cluster did not start ({why}) and {} is unset",
                common::PG_ENV
            ));
            Err(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite: another process holds the write lock

/// Holds `BEGIN EXCLUSIVE` on a separate connection to `url` for `hold`, and says on `held`
/// when it got the lock (it may wait for the daemon's own write transactions first).
pub async fn hold_sqlite_lock(
    url: &str,
    hold: Duration,
    held: tokio::sync::oneshot::Sender<time::OffsetDateTime>,
) {
    use sqlx::Connection;
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .expect("sqlite url")
        .busy_timeout(Duration::from_secs(20));
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("lock connection");
    sqlx::raw_sql("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .expect("BEGIN EXCLUSIVE");
    let _ = held.send(time::OffsetDateTime::now_utc());
    tokio::time::sleep(hold).await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("COMMIT");
    let _ = conn.close().await;
}
