//! prism-sync's benchmark: the real daemon (a `prism-sync run` child process per replica)
//! against the in-process simulator, on a fresh SQLite file or Postgres database, and, in the
//! same run, the database's bookkeeping limit (the same claim/store/outcome statements with no
//! HTTP at all), so that `daemon ÷ limit` is one number that does not depend on how busy the
//! machine is.
//!
//!   cargo build --release && cargo run --release --example bench -- --db sqlite --rows 200000
//!   cargo run --release --example bench -- --db postgres --rows 200000     (PRISM_SYNC_TEST_DATABASE_URL)
//!   ... --latency 50ms --max-in-flight 8 | --replicas 3 --max-in-flight 2 | --faults mild
//!   ... --mode latency      (commit to visible outcome: lone changes, and a steady moderate rate)
//!   ... --mode claim-cost   (claim cost with 10k and with 5M finished rows, claim for claim)
//!   ... --mode limit        (the bookkeeping limit alone, claim and outcome times apart)
//!   ... --mode fill --db postgres --replicas 3 [--linger 0s]
//!                           (batch fill: 300 changes/s in transactions of 5 for 20 s, 5 %
//!                            retryable item errors; items per request, trickle and lone-change
//!                            latency)
//!
//! `PRISM_BENCH_KEEP_DB=1` leaves each Postgres database in place (its name is printed) for a
//! look at its batches and rows afterwards.
//!
//! Every daemon run is checked afterwards against the simulator's apply log: each change must
//! have succeeded and been applied exactly once (alone or coalesced into a later change of its
//! record), in order. A dead row, a change applied twice or one never applied makes the bench
//! exit non-zero with what it found; the rates count succeeded rows only.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use prism_sync::batch::{PlanLimits, TeamSet};
use prism_sync::ops::enqueue::{Change, insert};
use prism_sync::sim::{AppliedChange, FaultProfile, SimConfig, SimHandle, Simulator};
use prism_sync::store::{ClaimRequest, FinishBatch, Lane, RawPool, Store};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Throughput,
    Latency,
    ClaimCost,
    /// Only the bookkeeping limit, with its claim and outcome times apart (for tuning SQL).
    Limit,
    /// Batch fill under a trickle (see [`fill`]).
    Fill,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "sqlite")]
    db: Db,
    #[arg(long, value_enum, default_value = "throughput")]
    mode: Mode,
    /// Changes to enqueue.
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    /// Over this many records (default: one change per record).
    #[arg(long)]
    records: Option<usize>,
    /// Simulated API latency per request.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    #[arg(long, value_enum, default_value = "off")]
    faults: Faults,
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    #[arg(long, default_value_t = 8)]
    max_in_flight: usize,
    /// Skip the bookkeeping-limit run.
    #[arg(long)]
    no_limit: bool,
    /// The prism-sync binary (default: target/release/prism-sync).
    #[arg(long, default_value = "target/release/prism-sync")]
    bin: String,
    /// Finished rows for the large side of --mode claim-cost.
    #[arg(long, default_value_t = 5_000_000)]
    finished_rows: usize,
    /// The daemons' `batch.linger` (default: theirs; `0s` turns it off, as before it existed).
    #[arg(long)]
    linger: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Faults {
    Off,
    Mild,
}

struct Database {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Database {
    async fn fresh(db: Db) -> anyhow::Result<Database> {
        match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir_in(".")?;
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                );
                Ok(Database {
                    url,
                    _dir: Some(dir),
                    pg: None,
                })
            }
            Db::Postgres => {
                let server = std::env::var("PRISM_SYNC_TEST_DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
                let name = format!("prism_bench_{}", Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&server).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                let mut url = url::Url::parse(&server)?;
                url.set_path(&name);
                Ok(Database {
                    url: url.to_string(),
                    _dir: None,
                    pg: Some((server, name)),
                })
            }
        }
    }

    async fn store(&self) -> anyhow::Result<Store> {
        let settings = prism_sync::settings::DatabaseSettings {
            url: self.url.clone(),
            ..Default::default()
        };
        let store = Store::connect(&settings).await?;
        store.migrate().await?;
        Ok(store)
    }

    async fn drop_pg(&mut self) {
        if std::env::var_os("PRISM_BENCH_KEEP_DB").is_some() {
            if let Some((_, name)) = self.pg.take() {
                println!("  kept database {name} (PRISM_BENCH_KEEP_DB)");
            }
            return;
        }
        if let Some((server, name)) = self.pg.take()
            && let Ok(admin) = sqlx::PgPool::connect(&server).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&admin)
            .await;
        }
    }
}

fn changes(rows: usize, records: usize) -> Vec<Change> {
    let ids: Vec<Uuid> = (0..records).map(|_| Uuid::new_v4()).collect();
    (0..rows)
        .map(|i| {
            Change::update(
                ids[i % records],
                format!(r#"{{"default": {{"revision": {i}, "email": "r{i}@example.com"}}}}"#),
            )
        })
        .collect()
}

fn mild() -> FaultProfile {
    FaultProfile {
        error_503_rate: 0.01,
        rate_limit_rate: 0.01,
        retry_after_ms: Some(100),
        item_error_rate: 0.005,
        item_error_codes: vec!["rate_limited".into(), "internal_error".into()],
        latency_jitter: Duration::from_millis(5),
        ..FaultProfile::default()
    }
}

/// Whether any row or batch is still unfinished. Index probes only (`EXISTS`), polled every
/// 100 ms: a `count(*)` over the backlog would take CPU from the daemon it measures.
async fn unfinished(store: &Store) -> anyhow::Result<bool> {
    Ok(match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM prism_outbox INDEXED BY prism_outbox_lane
                                WHERE state IN ('pending', 'retrying'))
                     OR EXISTS (SELECT 1 FROM prism_batches INDEXED BY prism_batches_open
                                WHERE state = 'open')",
            )
            .fetch_one(p)
            .await?
        }
        RawPool::Postgres(p) => {
            // Since migration 0015 a row's progress is on its claim row: a row never claimed
            // lies at or past its lane's floor (the bench's rows are all committed before the
            // drain, so none is late below it), rows waiting again are claim rows. The open
            // batches first: while the drain runs there nearly always is one, and `OR` stops
            // there, before the walk from the floor (which passes the rows claimed since the
            // floor last moved; about 3 % of the daemon's server CPU when it ran first).
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM prism_batches WHERE state = 'open')
                     OR EXISTS (SELECT 1 FROM prism_outbox_claims WHERE state IN ('pending', 'retrying'))
                     OR EXISTS (SELECT 1 FROM prism_outbox o
                                WHERE o.state IN ('pending', 'retrying')
                                  AND o.id >= COALESCE((SELECT min(floor_id) FROM prism_lane_floors), 0)
                                  AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id))",
            )
            .fetch_one(p)
            .await?
        }
    })
}

/// The server's WAL position and the outbox's update counters at one moment (Postgres only).
///
/// WAL is one stream per server: on a server other sessions write to, the delta counts their
/// writes too (bench/wal/private_pg.sh starts a server of its own for these figures).
struct WalMark {
    lsn: String,
    updates: i64,
    hot: i64,
    /// Checkpoints so far: after one, each page's first change is logged as a full-page image.
    checkpoints: i64,
    /// The server's CPU time so far, when it runs on this machine and its processes are
    /// readable (see [`server_cpu_ms`]).
    cpu_ms: Option<u64>,
}

impl WalMark {
    /// The mark now, when `store` is on Postgres.
    async fn take(store: &Store) -> anyhow::Result<Option<WalMark>> {
        match store.raw_pool_for_tests() {
            RawPool::Postgres(p) => Ok(Some(WalMark::read(p).await?)),
            RawPool::Sqlite(_) => Ok(None),
        }
    }

    async fn read(p: &sqlx::PgPool) -> anyhow::Result<WalMark> {
        // pg_stat_clear_snapshot: this backend's earlier reads of the counters are not reused.
        let (lsn, updates, hot, checkpoints, data): (String, i64, i64, i64, Option<String>) =
            sqlx::query_as(
                "SELECT pg_current_wal_lsn()::text, COALESCE(n_tup_upd, 0), COALESCE(n_tup_hot_upd, 0),
                        (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter),
                        current_setting('data_directory', true)
                 FROM (SELECT pg_stat_clear_snapshot()) c
                 LEFT JOIN pg_stat_user_tables t ON t.relname = 'prism_outbox'",
            )
            .fetch_one(p)
            .await?;
        Ok(WalMark {
            lsn,
            updates,
            hot,
            checkpoints,
            cpu_ms: data.and_then(|d| server_cpu_ms(std::path::Path::new(&d))),
        })
    }

    /// Prints the WAL written since `self` per row, and the share of HOT outbox updates. Call
    /// it once the connections that wrote have closed: a backend publishes its counters when it
    /// exits, and only every few seconds while its connection sits idle in a pool.
    async fn report(&self, url: &str, rows: usize, what: &str) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = sqlx::PgPool::connect(url).await?;
        let now = WalMark::read(&p).await?;
        let bytes: f64 = sqlx::query_scalar("SELECT ($1::pg_lsn - $2::pg_lsn)::float8")
            .bind(&now.lsn)
            .bind(&self.lsn)
            .fetch_one(&p)
            .await?;
        p.close().await;
        let updates = now.updates - self.updates;
        if let (Some(before), Some(after)) = (self.cpu_ms, now.cpu_ms) {
            println!(
                "  {what} server CPU: {:.0} µs per row ({:.1} s, all of the server's processes; bench/pg_cpu.sh)",
                after.saturating_sub(before) as f64 * 1000.0 / rows.max(1) as f64,
                after.saturating_sub(before) as f64 / 1000.0
            );
        }
        println!(
            "  {what} WAL: {:.0} bytes per row ({:.1} MB for {rows} rows, server-wide; {} checkpoint(s) began meanwhile), outbox updates {updates}, {:.0} % HOT",
            bytes / rows.max(1) as f64,
            bytes / 1e6,
            now.checkpoints - self.checkpoints,
            100.0 * (now.hot - self.hot) as f64 / updates.max(1) as f64
        );
        Ok(())
    }
}

/// The CPU time, in milliseconds, that the Postgres server with data directory `data` has spent:
/// the postmaster's own, its exited children's (backends of closed connections, reaped) and every
/// live child's. `None` when the server is not on this machine or not readable (as
/// bench/pg_cpu.sh). Like WAL, it counts every session of the server.
fn server_cpu_ms(data: &std::path::Path) -> Option<u64> {
    // utime, stime, cutime, cstime: fields 14-17 of /proc/PID/stat, 12-15 after the ")" that
    // ends the command name; in USER_HZ (100 a second on Linux).
    let ticks = |pid: &str, children: bool| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<u64> = stat
            .rsplit_once(") ")?
            .1
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let own = f.get(11)? + f.get(12)?;
        Some(if children {
            own + f.get(13)? + f.get(14)?
        } else {
            own
        })
    };
    let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pm = pid_file.lines().next()?.trim().to_owned();
    let mut total = ticks(&pm, true)?;
    for task in std::fs::read_dir(format!("/proc/{pm}/task"))
        .ok()?
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        total += children
            .split_whitespace()
            .filter_map(|c| ticks(c, false))
            .sum::<u64>();
    }
    Some(total * 10)
}

/// What a daemon run left behind, once checked against the simulator's apply log.
#[derive(Debug, Default)]
struct Tally {
    rows: usize,
    succeeded: usize,
    dead: usize,
    /// Items the simulator applied (fewer than `succeeded` where changes were coalesced).
    applied: usize,
    /// Every way a change was not applied exactly once.
    problems: Vec<String>,
}

impl Tally {
    /// The run's verdict: an error naming the first problems, if any.
    fn ensure_each_applied_once(&self) -> anyhow::Result<()> {
        if self.problems.is_empty() {
            println!(
                "  checked: all {} changes succeeded and were applied exactly once, in order ({} items)",
                self.rows, self.applied
            );
            return Ok(());
        }
        let shown: Vec<&str> = self.problems.iter().take(10).map(String::as_str).collect();
        anyhow::bail!(
            "{} of {} changes succeeded ({} dead), {} items applied: {} problem(s), not every change was applied exactly once:\n  {}",
            self.succeeded,
            self.rows,
            self.dead,
            self.applied,
            self.problems.len(),
            shown.join("\n  ")
        )
    }
}

/// `(record, revision, state, last error code)` of every outbox row, in `id` order.
async fn outbox_rows(
    store: &Store,
) -> anyhow::Result<Vec<(String, Option<i64>, String, Option<String>)>> {
    Ok(match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::query_as(
                "SELECT lower(record_id), CAST(json_extract(patch, '$.default.revision') AS INTEGER),
                        state, last_error_code
                 FROM prism_outbox ORDER BY id",
            )
            .fetch_all(p)
            .await?
        }
        RawPool::Postgres(p) => {
            sqlx::query_as(
                "SELECT record_id::text, (patch->'default'->>'revision')::bigint, state, last_error_code
                 FROM prism_outbox_rows ORDER BY id",
            )
            .fetch_all(p)
            .await?
        }
    })
}

/// Checks that every change succeeded and was applied exactly once, in order: per record, the
/// revisions the simulator applied strictly increase (a repeat is a change applied twice), each
/// is a succeeded change of that record (a coalesced item carries its last change), and the
/// last is the record's last succeeded change (nothing lost). A dead or unfinished row is a
/// problem too.
async fn verify_applied(store: &Store, applied: &[AppliedChange]) -> anyhow::Result<Tally> {
    let rows = outbox_rows(store).await?;
    let mut tally = Tally {
        rows: rows.len(),
        applied: applied.len(),
        ..Tally::default()
    };
    let mut problems = Vec::new();
    let mut dead_codes: HashMap<String, usize> = HashMap::new();
    // record → its succeeded revisions (ascending, as inserted)
    let mut succeeded: HashMap<&str, Vec<i64>> = HashMap::new();
    for (record, revision, state, code) in &rows {
        match (state.as_str(), revision) {
            ("succeeded", Some(r)) => {
                tally.succeeded += 1;
                succeeded.entry(record.as_str()).or_default().push(*r);
            }
            ("dead", _) => {
                tally.dead += 1;
                *dead_codes
                    .entry(code.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            _ => problems.push(format!(
                "record {record} revision {revision:?} ended {state}"
            )),
        }
    }
    if tally.dead > 0 {
        problems.push(format!(
            "{} change(s) went dead, never applied: {dead_codes:?}",
            tally.dead
        ));
    }
    let last = apply_order(applied, &succeeded, &mut problems);
    for (record, revisions) in &succeeded {
        let want = revisions.last().copied();
        if last.get(*record).copied() != want {
            problems.push(format!(
                "record {record}: its last succeeded change is revision {want:?}, the API ends at {:?}",
                last.get(*record)
            ));
        }
    }
    tally.problems = problems;
    Ok(tally)
}

/// Walks the apply log: per record, revisions strictly increasing, each a succeeded change of
/// the record. Returns the last revision applied to each record.
fn apply_order(
    applied: &[AppliedChange],
    succeeded: &HashMap<&str, Vec<i64>>,
    problems: &mut Vec<String>,
) -> HashMap<String, i64> {
    let mut last: HashMap<String, i64> = HashMap::new();
    for change in applied {
        let record = change.record_id.to_string();
        let Some(revision) = change
            .item
            .pointer("/default/revision")
            .and_then(|v| v.as_i64())
        else {
            problems.push(format!(
                "seq {}: record {record} applied without a revision",
                change.seq
            ));
            continue;
        };
        if let Some(previous) = last.insert(record.clone(), revision) {
            if revision == previous {
                problems.push(format!(
                    "record {record}: revision {revision} applied twice"
                ));
            } else if revision < previous {
                problems.push(format!(
                    "record {record}: revision {revision} applied after {previous}"
                ));
            }
        }
        if succeeded
            .get(record.as_str())
            .is_none_or(|r| r.binary_search(&revision).is_err())
        {
            problems.push(format!(
                "record {record}: revision {revision} was applied but is not a succeeded change"
            ));
        }
    }
    last
}

/// Commit → outcome latency as the application sees it: the time from the moment an insert's
/// commit returned to the moment another connection sees the row `succeeded` or `dead`
/// (polled every millisecond), so the outcome transaction's commit is inside it.
#[derive(Clone, Default)]
struct OutcomeWatch {
    /// Records whose change committed at that instant and whose outcome is not yet seen.
    pending: Arc<Mutex<HashMap<Uuid, Instant>>>,
    /// Milliseconds, one per change seen finished.
    seen: Arc<Mutex<Vec<f64>>>,
}

impl OutcomeWatch {
    fn committed(&self, records: impl IntoIterator<Item = Uuid>) {
        let now = Instant::now();
        let mut pending = self.pending.lock().expect("pending lock");
        pending.extend(records.into_iter().map(|r| (r, now)));
    }

    fn waiting(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
    }

    /// Polls until `stop` and nothing is pending.
    async fn run(
        self,
        store: Store,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let records: Vec<Uuid> = self
                .pending
                .lock()
                .expect("pending lock")
                .keys()
                .copied()
                .collect();
            if records.is_empty() {
                if stop.is_cancelled() {
                    return Ok(());
                }
            } else {
                let finished = finished_among(&store, &records).await?;
                let now = Instant::now();
                let mut pending = self.pending.lock().expect("pending lock");
                let mut seen = self.seen.lock().expect("seen lock");
                for record in finished {
                    if let Some(committed) = pending.remove(&record) {
                        seen.push((now - committed).as_secs_f64() * 1000.0);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.seen.lock().expect("seen lock").clone();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Which of `records` have a finished row (each carries one change in the latency runs).
async fn finished_among(store: &Store, records: &[Uuid]) -> anyhow::Result<Vec<Uuid>> {
    Ok(match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            let ids =
                serde_json::to_string(&records.iter().map(Uuid::to_string).collect::<Vec<_>>())?;
            let found: Vec<String> = sqlx::query_scalar(
                "SELECT record_id FROM prism_outbox
                 WHERE record_id IN (SELECT value FROM json_each(?1)) AND state IN ('succeeded', 'dead')",
            )
            .bind(ids)
            .fetch_all(p)
            .await?;
            found
                .iter()
                .filter_map(|r| Uuid::parse_str(r).ok())
                .collect()
        }
        RawPool::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT record_id FROM prism_outbox_rows
                 WHERE record_id = ANY($1) AND state IN ('succeeded', 'dead')",
            )
            .bind(records)
            .fetch_all(p)
            .await?
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon {
    child: tokio::process::Child,
    metrics_port: u16,
}

fn spawn_daemons(args: &Args, db: &Database, sim: &SimHandle) -> Vec<Daemon> {
    (0..args.replicas)
        .map(|_| {
            let metrics_port = free_port();
            let child = tokio::process::Command::new(&args.bin)
                .arg("run")
                .env("DATABASE_URL", &db.url)
                .env("MICRO_API_KEY", prism_sync::sim::DEFAULT_API_KEY)
                .env("MICRO_TEAM_ID", sim.team_id())
                .env("MICRO_BASE_URL", sim.base_url())
                .env(
                    "PRISM_SYNC__SYNC__MAX_IN_FLIGHT",
                    args.max_in_flight.to_string(),
                )
                .env(
                    "PRISM_SYNC__TELEMETRY__LISTEN",
                    format!("127.0.0.1:{metrics_port}"),
                )
                .env("PRISM_SYNC__RETRY__BASE_DELAY", "50ms")
                .env("PRISM_SYNC__RETRY__MAX_DELAY", "1s")
                .env("PRISM_SYNC__LOG__LEVEL", "warn")
                .envs(
                    args.linger
                        .iter()
                        .map(|l| ("PRISM_SYNC__BATCH__LINGER", l.as_str())),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn prism-sync run");
            Daemon {
                child,
                metrics_port,
            }
        })
        .collect()
}

/// Fails the run when a daemon has exited before its end (it refused its configuration, say):
/// the run would otherwise wait for rows nobody syncs. Its own error is on stderr above.
fn all_running(daemons: &mut [Daemon]) -> anyhow::Result<()> {
    for d in daemons.iter_mut() {
        if let Some(status) = d.child.try_wait()? {
            anyhow::bail!(
                "a prism-sync daemon exited before the run ended ({status}); its error is above"
            );
        }
    }
    Ok(())
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// (sum, count) of a histogram in a Prometheus scrape.
fn histogram(text: &str, name: &str, label: &str) -> (f64, f64) {
    let find = |suffix: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
    };
    (find("sum"), find("count"))
}

async fn stop(daemons: &mut [Daemon]) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (mut claim_sum, mut claim_n, mut rec_sum, mut rec_n) = (0.0, 0.0, 0.0, 0.0);
    for d in daemons.iter() {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", d.metrics_port)).await {
            let text = r.text().await.unwrap_or_default();
            let (s, n) = histogram(&text, "prism_sync_db_duration_seconds", "op=\"claim\"");
            claim_sum += s;
            claim_n += n;
            let (s, n) = histogram(&text, "prism_sync_db_duration_seconds", "op=\"record\"");
            rec_sum += s;
            rec_n += n;
        }
    }
    for d in daemons.iter_mut() {
        let pid = d.child.id().unwrap_or(0);
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    for d in daemons.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(30), d.child.wait()).await;
    }
    Ok((claim_sum, claim_n, rec_sum, rec_n))
}

/// The same claim → store → record statements as the daemon, with no HTTP: every item answered
/// `ok` at once. Like the daemon, it claims `max_in_flight` batches at a time, records a claim's
/// batches in one transaction, and overlaps the next claim with the previous outcome write.
async fn bookkeeping_limit(store: &Store, max_in_flight: usize) -> anyhow::Result<LimitRun> {
    let limits = PlanLimits {
        batch_size: 100,
        coalesce: true,
        max_coalesce: 100,
        max_patch_bytes: 256 * 1024,
        max_request_bytes: 4 << 20,
    };
    let lanes = Lane::all_of([""]);
    let teams = TeamSet::new([]);
    let claim = || async {
        store
            .claim(&ClaimRequest {
                owner: "bench",
                lease: Duration::from_secs(60),
                max_records: 100 * max_in_flight,
                limits,
                lanes: &lanes,
                teams: &teams,
                max_bytes: None,
                strays: false,
            })
            .await
    };
    let ends = |claimed: &prism_sync::store::ClaimOutcome| -> Vec<FinishBatch> {
        claimed
            .batches
            .iter()
            .map(|b| FinishBatch::all_succeeded(b, "bench"))
            .collect()
    };
    let started = Instant::now();
    let mut run = LimitRun::default();
    let (first, took) = timed(claim()).await;
    run.claiming += took;
    run.claims += 1;
    let mut pending = first?;
    while !pending.batches.is_empty() {
        let finishing = ends(&pending);
        run.rows += finishing.iter().map(|f| f.rows.len()).sum::<usize>();
        let ((next, claim_took), (written, finish_took)) =
            tokio::join!(timed(claim()), timed(store.finish_batches(&finishing)));
        written?;
        run.claiming += claim_took;
        run.finishing += finish_took;
        run.claims += 1;
        run.finishes += 1;
        pending = next?;
    }
    run.took = started.elapsed();
    Ok(run)
}

/// CPU time (user + system) this process has used, every thread (SQLite runs on the driver's
/// own threads; on Postgres this leaves out the server's share).
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// A future's output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

#[derive(Debug, Default)]
struct LimitRun {
    rows: usize,
    took: Duration,
    claims: u32,
    claiming: Duration,
    finishes: u32,
    finishing: Duration,
}

impl LimitRun {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.took.as_secs_f64()
    }
}

/// Only the bookkeeping limit, with where its time goes.
async fn limit_only(args: &Args) -> anyhow::Result<()> {
    let mut db = Database::fresh(args.db).await?;
    let store = db.store().await?;
    insert(
        &store,
        &changes(args.rows, args.records.unwrap_or(args.rows)),
    )
    .await?;
    eprintln!("enqueued {} changes; measuring", args.rows);
    let wal = WalMark::take(&store).await?;
    let cpu = cpu_seconds();
    let run = bookkeeping_limit(&store, args.max_in_flight).await?;
    let cpu = cpu_seconds() - cpu;
    println!(
        "prism-sync bench: bookkeeping limit, {:?}, {} changes: {:.0} rows/s ({:.2}s, CPU {:.1} µs a row); claim {:.2} ms × {}, outcome {:.2} ms × {}",
        args.db,
        args.rows,
        run.rate(),
        run.took.as_secs_f64(),
        cpu * 1e6 / run.rows.max(1) as f64,
        run.claiming.as_secs_f64() * 1000.0 / f64::from(run.claims.max(1)),
        run.claims,
        run.finishing.as_secs_f64() * 1000.0 / f64::from(run.finishes.max(1)),
        run.finishes,
    );
    store_close(store).await;
    if let Some(wal) = &wal {
        wal.report(&db.url, run.rows, "limit").await?;
    }
    db.drop_pg().await;
    Ok(())
}

async fn throughput(args: &Args) -> anyhow::Result<()> {
    let records = args.records.unwrap_or(args.rows);
    let faults = FaultProfile {
        latency: args.latency,
        ..if args.faults == Faults::Mild {
            mild()
        } else {
            FaultProfile::default()
        }
    };
    let sim = Simulator::start(
        SimConfig {
            faults,
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut db = Database::fresh(args.db).await?;
    let store = db.store().await?;
    let data = changes(args.rows, records);
    insert(&store, &data).await?;
    println!(
        "prism-sync bench: {:?}, {} changes over {} records, API latency {:?}, faults {:?}, {} replica(s) × max_in_flight {}",
        args.db, args.rows, records, args.latency, args.faults, args.replicas, args.max_in_flight
    );
    let wal = WalMark::take(&store).await?;
    let started = Instant::now();
    let mut daemons = spawn_daemons(args, &db, &sim);
    let pids: Vec<u32> = daemons.iter().filter_map(|d| d.child.id()).collect();
    let mut peak = 0.0f64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for pid in &pids {
            peak = peak.max(peak_rss_mib(*pid));
        }
        if !unfinished(&store).await? {
            break;
        }
        all_running(&mut daemons)?;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "did not finish in 30 minutes"
        );
    }
    let took = started.elapsed();
    let (claim_sum, claim_n, rec_sum, rec_n) = stop(&mut daemons).await?;
    let stats = sim.stats();
    let tally = verify_applied(&store, &sim.applied_log()).await?;
    let requests = stats.requests_total as f64;
    // Only succeeded rows count: a dead row is a change that was not made.
    let rate = tally.succeeded as f64 / took.as_secs_f64();
    println!(
        "  daemon:  {:.0} rows/s end to end ({:.2}s; {} succeeded, {} dead of {}), {:.0} requests/s, mean batch fill {:.1} items",
        rate,
        took.as_secs_f64(),
        tally.succeeded,
        tally.dead,
        tally.rows,
        requests / took.as_secs_f64(),
        stats.items_applied as f64 / requests.max(1.0)
    );
    println!(
        "           peak RSS {:.1} MiB (per daemon, max), {} idempotent replays, {} faults injected",
        peak,
        stats.replays,
        stats.faults_injected.values().sum::<u64>()
    );
    if claim_n > 0.0 && rec_n > 0.0 {
        println!(
            "           database time: claim+store {:.2} ms per claim ({:.0} claims), outcome {:.2} ms per batch",
            claim_sum / claim_n * 1000.0,
            claim_n,
            rec_sum / rec_n * 1000.0
        );
    }
    if let Some(wal) = &wal {
        wal.report(&db.url, tally.rows, "daemon").await?;
    }
    tally.ensure_each_applied_once()?;
    if !args.no_limit && args.faults == Faults::Off {
        let mut limit_db = Database::fresh(args.db).await?;
        let limit_store = limit_db.store().await?;
        insert(&limit_store, &data).await?;
        let wal = WalMark::take(&limit_store).await?;
        let run = bookkeeping_limit(&limit_store, args.max_in_flight).await?;
        let limit = run.rate();
        println!(
            "  limit:   {:.0} rows/s (same statements, no HTTP, {:.2}s)",
            limit,
            run.took.as_secs_f64()
        );
        println!("  ratio:   daemon ÷ limit = {:.2}", rate / limit);
        store_close(limit_store).await;
        if let Some(wal) = &wal {
            wal.report(&limit_db.url, run.rows, "limit").await?;
        }
        limit_db.drop_pg().await;
    }
    store_close(store).await;
    db.drop_pg().await;
    Ok(())
}

async fn store_close(store: Store) {
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => p.close().await,
        RawPool::Postgres(p) => p.close().await,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn latency(args: &Args) -> anyhow::Result<()> {
    let sim = Simulator::start(
        SimConfig {
            faults: FaultProfile {
                latency: args.latency,
                ..FaultProfile::default()
            },
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    println!(
        "prism-sync bench: latency, {:?}, API latency {:?} (from the insert's commit returning to the outcome visible to another connection, polled every 1 ms)",
        args.db, args.latency
    );
    // Lone changes on an idle daemon, one at a time.
    lone_changes(args, &sim, "lone changes on an idle daemon").await?;
    // A steady moderate rate: 2,000 changes/s in transactions of 10 for 10 s.
    let steady = latency_run(args, &sim, |store, watch| async move {
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(10) {
            let batch = changes(10, 10);
            insert(&store, &batch).await?;
            watch.committed(batch.iter().map(|c| c.record_id));
            sent += 10;
            let due = Duration::from_secs_f64(sent as f64 / 2000.0);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(sent)
    })
    .await?;
    println!(
        "  steady {:.0} changes/s ({} changes): p50 {:.1} ms, p99 {:.1} ms",
        steady.len() as f64 / 10.0,
        steady.len(),
        percentile(&steady, 0.5),
        percentile(&steady, 0.99)
    );
    Ok(())
}

/// One latency run on a fresh database: daemons started, `load` inserting changes and telling
/// the watch when each commit returned, then every change checked applied exactly once.
/// Returns the sorted latencies (ms).
/// 200 lone changes, one at a time, each after a random quiet gap (so that the inserts do not
/// fall into step with the daemon's poll); prints their latency.
async fn lone_changes(args: &Args, sim: &SimHandle, what: &str) -> anyhow::Result<()> {
    let lone = latency_run(args, sim, |store, watch| async move {
        for _ in 0..200 {
            let change = changes(1, 1);
            insert(&store, &change).await?;
            watch.committed(change.iter().map(|c| c.record_id));
            while watch.waiting() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand::random_range(30..80))).await;
        }
        Ok(200)
    })
    .await?;
    println!(
        "  {what} ({}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lone.len(),
        percentile(&lone, 0.5),
        percentile(&lone, 0.99),
        lone.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

async fn latency_run<F, Fut>(args: &Args, sim: &SimHandle, load: F) -> anyhow::Result<Vec<f64>>
where
    F: FnOnce(Store, OutcomeWatch) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut db = Database::fresh(args.db).await?;
    let store = db.store().await?;
    let applied_before = sim.applied_log().len();
    let mut daemons = spawn_daemons(args, &db, sim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let watch = OutcomeWatch::default();
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(watch.clone().run(store.clone(), stop_watch.clone()));
    let sent = load(store.clone(), watch.clone()).await?;
    stop_watch.cancel();
    tokio::time::timeout(Duration::from_secs(120), watcher)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} changes still had no visible outcome after 120 s",
                watch.waiting()
            )
        })???;
    while unfinished(&store).await? {
        all_running(&mut daemons)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(&mut daemons).await?;
    let seen = watch.sorted();
    anyhow::ensure!(
        seen.len() == sent,
        "{sent} changes sent, {} outcomes seen",
        seen.len()
    );
    let tally = verify_applied(&store, &sim.applied_log()[applied_before..]).await?;
    tally.ensure_each_applied_once()?;
    store_close(store).await;
    db.drop_pg().await;
    Ok(seen)
}

/// Batch fill: `--replicas` daemons (3 for the issue's scenario) while changes trickle in at
/// 300 a second, in transactions of 5, for 20 s, and the simulator fails 5 % of items with a
/// retryable code (their rows come due again one by one, jittered). Prints the mean items per
/// update request (from the simulator's counters) and the trickle's latency; then, on a fresh
/// database and without item errors, lone changes after quiet (each after the previous one's
/// outcome and a random 30-80 ms gap), whose latency a linger must not raise. With
/// `PRISM_BENCH_SHOW_SMALL` set it also lists the trickle's requests of fewer than 10 items.
async fn fill(args: &Args) -> anyhow::Result<()> {
    let trickle_faults = FaultProfile {
        latency: args.latency,
        item_error_rate: 0.05,
        item_error_codes: vec!["rate_limited".into(), "internal_error".into()],
        ..FaultProfile::default()
    };
    let sim = Simulator::start(
        SimConfig {
            faults: trickle_faults,
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    println!(
        "prism-sync bench: fill, {:?}, {} replicas, batch.linger {}, API latency {:?}",
        args.db,
        args.replicas,
        args.linger.as_deref().unwrap_or("(default)"),
        args.latency
    );
    let before = sim.stats();
    let trickle = latency_run(args, &sim, |store, watch| async move {
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(20) {
            let batch = changes(5, 5);
            insert(&store, &batch).await?;
            watch.committed(batch.iter().map(|c| c.record_id));
            sent += 5;
            let due = Duration::from_secs_f64(sent as f64 / 300.0);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(sent)
    })
    .await?;
    let after = sim.stats();
    let requests = after.requests_total - before.requests_total;
    let items =
        (after.items_applied + after.items_failed) - (before.items_applied + before.items_failed);
    println!(
        "  trickle {:.0} changes/s ({} changes): {requests} requests, {items} items, {:.1} items per request; latency p50 {:.1} ms, p99 {:.1} ms",
        trickle.len() as f64 / 20.0,
        trickle.len(),
        items as f64 / requests.max(1) as f64,
        percentile(&trickle, 0.5),
        percentile(&trickle, 0.99)
    );
    if std::env::var_os("PRISM_BENCH_SHOW_SMALL").is_some() {
        let log = sim.requests();
        let start = log.first().map(|r| r.at.clone()).unwrap_or_default();
        for r in log.iter().filter(|r| r.items < 10) {
            println!(
                "  small request at {} (first at {start}): {} items",
                r.at, r.items
            );
        }
    }
    let mut sizes = [0usize; 4];
    for r in sim
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/batch/update"))
    {
        sizes[match r.items {
            0..10 => 0,
            10..50 => 1,
            50..90 => 2,
            _ => 3,
        }] += 1;
    }
    println!(
        "  requests by items (last {} logged): 1-9: {}, 10-49: {}, 50-89: {}, 90-100: {}",
        prism_sync::sim::REQUEST_LOG_CAPACITY,
        sizes[0],
        sizes[1],
        sizes[2],
        sizes[3]
    );
    sim.set_faults(FaultProfile {
        latency: args.latency,
        ..FaultProfile::default()
    });
    lone_changes(args, &sim, "lone changes after quiet").await?;
    Ok(())
}

async fn fill_finished(store: &Store, n: usize) -> anyhow::Result<()> {
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO prism_outbox (record_id, patch, state, attempts, completed_at)
                 SELECT lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-8' || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))),
                        '{\"default\": {\"old\": true}}', 'succeeded', 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 FROM n",
            )
            .bind(n as i64)
            .execute(p)
            .await?;
        }
        RawPool::Postgres(p) => {
            // As prism-sync leaves them since migration 0015: the outbox row as inserted, a
            // claim row that follows a batch that ended `done`, and the lane's floor past them.
            sqlx::query(
                "WITH b AS (INSERT INTO prism_batches (id, idempotency_key, object_type, body, items,
                                                       item_count, row_count, state, completed_at)
                            VALUES (gen_random_uuid(), gen_random_uuid()::text, 'contact',
                                    '\\x7b7d'::bytea, '[]', 1, 1, 'done', now())
                            RETURNING id),
                 o AS (INSERT INTO prism_outbox (record_id, patch)
                       SELECT gen_random_uuid(), '{\"default\": {\"old\": true}}'
                       FROM generate_series(1, $1)
                       RETURNING id, team_id, object_type, record_id)
                 INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, batch_id)
                 SELECT o.id, o.team_id, o.object_type, o.record_id, b.id FROM o, b",
            )
            .bind(n as i64)
            .execute(p)
            .await?;
            sqlx::query(
                "INSERT INTO prism_lane_floors (team_id, object_type, floor_id, late_txid)
                 SELECT team_id, object_type, max(id) + 1, pg_current_xact_id()
                 FROM prism_outbox GROUP BY 1, 2
                 ON CONFLICT (team_id, object_type) DO UPDATE
                     SET floor_id = EXCLUDED.floor_id, late_txid = EXCLUDED.late_txid",
            )
            .execute(p)
            .await?;
            sqlx::query("VACUUM ANALYZE prism_outbox, prism_outbox_claims")
                .execute(p)
                .await?;
        }
    }
    Ok(())
}

/// A fresh database with `finished` rows of history and 20,000 waiting changes.
async fn history(db: Db, finished: usize) -> anyhow::Result<(Database, Store)> {
    let database = Database::fresh(db).await?;
    let store = database.store().await?;
    fill_finished(&store, finished).await?;
    insert(&store, &changes(20_000, 20_000)).await?;
    Ok((database, store))
}

/// One claim of 100 rows (claim + store, one transaction), timed; its batches are then recorded.
async fn timed_claim(store: &Store) -> anyhow::Result<f64> {
    let limits = PlanLimits {
        batch_size: 100,
        coalesce: true,
        max_coalesce: 100,
        max_patch_bytes: 256 * 1024,
        max_request_bytes: 4 << 20,
    };
    let lanes = Lane::all_of([""]);
    let teams = TeamSet::new([]);
    let started = Instant::now();
    let claimed = store
        .claim(&ClaimRequest {
            owner: "bench",
            lease: Duration::from_secs(60),
            max_records: 100,
            limits,
            lanes: &lanes,
            teams: &teams,
            max_bytes: None,
            strays: false,
        })
        .await?;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    for b in &claimed.batches {
        store
            .finish_batch(&FinishBatch::all_succeeded(b, "bench"))
            .await?;
    }
    Ok(took)
}

/// Median claim time with 10,000 and with `finished` rows of history. The two databases take
/// turns, claim for claim, so that both see the same machine: a claim is a few milliseconds,
/// and a commit's `fsync` alone varies by as much on a shared disk.
async fn claim_cost(db: Db, finished: usize) -> anyhow::Result<(f64, f64)> {
    let (mut small_db, small) = history(db, 10_000).await?;
    let (mut large_db, large) = history(db, finished).await?;
    let (mut small_times, mut large_times) = (Vec::new(), Vec::new());
    for _ in 0..150 {
        small_times.push(timed_claim(&small).await?);
        large_times.push(timed_claim(&large).await?);
    }
    for store in [small, large] {
        store_close(store).await;
    }
    small_db.drop_pg().await;
    large_db.drop_pg().await;
    small_times.sort_by(f64::total_cmp);
    large_times.sort_by(f64::total_cmp);
    Ok((percentile(&small_times, 0.5), percentile(&large_times, 0.5)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        std::path::Path::new(&args.bin).exists(),
        "{} not found: cargo build --release first",
        args.bin
    );
    match args.mode {
        Mode::Throughput => throughput(&args).await,
        Mode::Latency => latency(&args).await,
        Mode::Limit => limit_only(&args).await,
        Mode::Fill => fill(&args).await,
        Mode::ClaimCost => {
            let (small, large) = claim_cost(args.db, args.finished_rows).await?;
            println!(
                "prism-sync bench: claim cost, {:?}: median {:.2} ms with 10k finished rows, {:.2} ms with {} ({:.2}×)",
                args.db,
                small,
                large,
                args.finished_rows,
                large / small
            );
            Ok(())
        }
    }
}
