//! Liveness: hostile answers, stranded work and refused keys, and after the faults stop every
//! row must be terminal within a stated bound (`BOUND`), on both databases, with nothing lost,
//! applied twice or reordered (the checker's usual promises).
//!
//! One real daemon runs through these, in order, while normal changes keep arriving:
//! - a batch stored by a previous run for a team this configuration no longer has (its rows end
//!   `dead` as `unknown_team`);
//! - records the API always refuses: with a hostile message (a NUL, an escape sequence, bytes
//!   that are not UTF-8: `dead` as `validation_error`), with a code holding a NUL (unknown, so
//!   `dead` after `retry.max_attempts` with the code stored sanitised), and with a retryable code
//!   for ever (`dead` as `internal_error` once `retry.give_up_after` has passed);
//! - a phase of truncated and non-JSON 200s (re-sent under the same key until readable);
//! - a 429 storm with no `retry-after`, which must see backoff (`MAX_STORM_REQUESTS`);
//! - a record whose 200s are always too large to read, alone in its batch (`dead` as
//!   `unreadable_response` under its one key, applied once);
//! - a key refused while nothing is stored to probe with, then restored: the changes written
//!   meanwhile and after must flow without a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prism_sync::batch::{PlanLimits, TeamSet};
use prism_sync::sim::FaultProfile;
use prism_sync::store::{ClaimRequest, Lane, RawPool};
use rand::Rng;
use uuid::Uuid;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;

/// Every row is terminal this long after the last fault stopped (and the last change arrived).
const BOUND: Duration = Duration::from_secs(60);
/// Requests the daemon may send during `STORM` of 429s without `retry-after`: its pause doubles
/// with each 429 in a row (from 10 ms to `retry.max_delay` = 2 s). A pause that never grows
/// sent several hundred.
const STORM: Duration = Duration::from_millis(2500);
const MAX_STORM_REQUESTS: usize = 60;
const GIVE_UP: &str = "8s";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PRISM_SYNC__RETRY__GIVE_UP_AFTER", GIVE_UP),
        ("PRISM_SYNC__RETRY__MAX_DELAY", "2s"),
        ("PRISM_SYNC__RETRY__MAX_ATTEMPTS", "3"),
        ("PRISM_SYNC__BATCH__MAX_ATTEMPTS", "6"),
        ("PRISM_SYNC__HTTP__MAX_RESPONSE_BYTES", "1048576"),
    ]
}

/// The special records and the faults that make them special.
struct Hostile {
    message: String,
    nul_code: String,
    forever: String,
    oversized: String,
}

impl Hostile {
    fn new(sc: &mut Scenario) -> Hostile {
        let mut id = || Uuid::from_u128(sc.rng.random()).to_string();
        Hostile {
            message: id(),
            nul_code: id(),
            forever: id(),
            oversized: id(),
        }
    }

    fn faults(&self) -> FaultProfile {
        FaultProfile {
            hostile_messages: true,
            item_errors_for_ids: BTreeMap::from([
                (self.message.clone(), "validation_error".to_owned()),
                (self.nul_code.clone(), "internal\u{0}error".to_owned()),
                (self.forever.clone(), "internal_error".to_owned()),
            ]),
            oversized_answer_ids: vec![self.oversized.clone()],
            oversized_answer_bytes: 2 * 1024 * 1024,
            ..FaultProfile::default()
        }
    }

    /// The code each special record's rows end with. A row still retrying when its batch is
    /// given up past `retry.give_up_after` ends with the batch's last code instead (`http_429`
    /// in the storm), which is its last code too.
    fn dead_codes(&self, record: &str) -> Option<&'static [&'static str]> {
        let same = |id: &String| id.eq_ignore_ascii_case(record);
        if same(&self.message) {
            Some(&["validation_error"])
        } else if same(&self.nul_code) {
            Some(&["internal\u{FFFD}error", "http_429"])
        } else if same(&self.forever) {
            Some(&["internal_error", "http_429"])
        } else if same(&self.oversized) {
            Some(&["unreadable_response"])
        } else {
            None
        }
    }
}

fn rows_of(record: &str, from: u64, n: u64) -> Vec<PlannedRow> {
    (from..from + n)
        .map(|k| PlannedRow {
            record: record.to_owned(),
            patch: format!(r#"{{"default": {{"n": {k}, "email": "h{k}@example.com"}}}}"#),
        })
        .collect()
}

/// Rows of team `gone`, stored in a batch by a process of an earlier configuration that knew
/// the team and then stopped: open, its lease lapsing, its rows in flight.
async fn strand_batch_of_removed_team(db: &Db, rows: &[PlannedRow]) -> Result<Vec<i64>, String> {
    db.insert(rows).await.map_err(|e| e.to_string())?;
    let moved: Vec<i64> = match db.store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query_scalar(
            "UPDATE prism_outbox SET team_id = 'gone' WHERE state = 'pending' RETURNING id",
        )
        .fetch_all(p)
        .await
        .map_err(|e| e.to_string())?,
        RawPool::Postgres(p) => sqlx::query_scalar(
            "UPDATE prism_outbox SET team_id = 'gone' WHERE state = 'pending' RETURNING id",
        )
        .fetch_all(p)
        .await
        .map_err(|e| e.to_string())?,
    };
    let claimed = db
        .store
        .claim(&ClaimRequest {
            owner: "earlier-configuration",
            lease: Duration::from_millis(10),
            max_records: 100,
            limits: PlanLimits {
                batch_size: 20,
                coalesce: true,
                max_coalesce: 100,
                max_patch_bytes: 1 << 20,
                max_request_bytes: usize::MAX,
            },
            lanes: &Lane::all_of(["gone"]),
            teams: &TeamSet::new(["gone".to_owned()]),
            max_bytes: None,
            strays: false,
        })
        .await
        .map_err(|e| e.to_string())?;
    if claimed.batches.is_empty() {
        return Err("no batch of the removed team was stored".into());
    }
    Ok(moved)
}

/// Batches that ended as `unreadable_response` after a 2xx whose body could not be read, and
/// each row's last batch.
async fn unreadable_batches(db: &Db) -> Result<(BTreeSet<String>, BatchOf), String> {
    let sql = "SELECT DISTINCT CAST(a.batch_id AS TEXT) FROM prism_batch_attempts a
               WHERE a.outcome = 'unreadable_response' AND EXISTS (
                   SELECT 1 FROM prism_batch_attempts b
                   WHERE b.batch_id = a.batch_id AND b.http_status BETWEEN 200 AND 299)";
    let ids: Vec<String> = match db.store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await,
        RawPool::Postgres(p) => sqlx::query_scalar(sql).fetch_all(p).await,
    }
    .map_err(|e| e.to_string())?;
    let sql = "SELECT id, CAST(batch_id AS TEXT) FROM prism_outbox_rows";
    let rows: Vec<(i64, Option<String>)> = match db.store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await,
        RawPool::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await,
    }
    .map_err(|e| e.to_string())?;
    Ok((ids.into_iter().collect(), rows.into_iter().collect()))
}

/// Each row's last batch (as text).
type BatchOf = BTreeMap<i64, Option<String>>;

/// Waits until no row is waiting or in flight.
async fn settled(db: &Db, within: Duration) -> Result<(), String> {
    until("every row terminal", within, || async {
        db.progress()
            .await
            .is_some_and(|(terminal, all, _)| terminal == all)
    })
    .await
}

async fn hostile_answers(backend: Backend, round: u64) {
    let mut sc = Scenario::new(scenario_name("liveness", "hostile_answers", backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let hostile = Hostile::new(&mut sc);
    let base = hostile.faults();
    let sim = Sim::start(&mut sc, base.clone(), None).await;
    let mut problems = Vec::new();

    let gone = workload(&mut sc.rng, 3, 6);
    let stranded = match strand_batch_of_removed_team(&db, &gone).await {
        Ok(ids) => ids,
        Err(e) => sc.fail(e),
    };
    sc.inject("stranded_batch_of_removed_team", 1);

    let mut rows = workload(&mut sc.rng, scale(20), scale(120));
    let mut special = rows_of(&hostile.message, 1, 2);
    special.extend(rows_of(&hostile.nul_code, 1, 2));
    special.extend(rows_of(&hostile.forever, 1, 3));
    rows.extend(special);
    if let Err(e) = db.insert(&rows).await {
        sc.fail(e);
    }
    let mut daemon = Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &env());

    // Damaged 200s, then a 429 storm without retry-after, while changes keep arriving.
    let more = workload(&mut sc.rng, scale(10), scale(60));
    sim.set_faults(FaultProfile {
        truncated_body_rate: 0.3,
        non_json_body_rate: 0.1,
        ..base.clone()
    });
    if let Err(e) = db.insert(&more).await {
        sc.fail(e);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    sc.inject("damaged_200s", sim.fault_count("truncated_body").await);
    let before = sim.requests().await.len();
    let storm_rows = workload(&mut sc.rng, scale(10), scale(40));
    sim.set_faults(FaultProfile {
        rate_limit_rate: 1.0,
        ..base.clone()
    });
    if let Err(e) = db.insert(&storm_rows).await {
        sc.fail(e);
    }
    tokio::time::sleep(STORM).await;
    sim.set_faults(base.clone());
    let storm_requests = sim.requests().await.len() - before;
    sc.inject("429_without_retry_after", storm_requests as u64);
    sc.note(format!(
        "{storm_requests} requests during a {STORM:?} storm of 429s with no retry-after"
    ));
    if storm_requests > MAX_STORM_REQUESTS {
        problems.push(format!(
            "{storm_requests} requests during a {STORM:?} 429 storm without retry-after (at most {MAX_STORM_REQUESTS}): no backoff"
        ));
    }
    rows.extend(more);
    rows.extend(storm_rows);
    if let Err(e) = settled(&db, BOUND).await {
        sc.fail(format!(
            "{e} before the oversized record; log tail:\n{}",
            daemon.tail(15)
        ));
    }

    // A record whose answers are always too large, alone in its batch.
    let big = rows_of(&hostile.oversized, 1, 1);
    if let Err(e) = db.insert(&big).await {
        sc.fail(e);
    }
    rows.extend(big);
    if let Err(e) = settled(&db, BOUND).await {
        sc.fail(format!(
            "{e} after the oversized record; log tail:\n{}",
            daemon.tail(15)
        ));
    }
    sc.inject("oversized_200", 1);

    // The key refused while nothing is stored: the one change written then is refused until it
    // is given up; once the key is back, the changes flow without a restart.
    sim.put_api_key("rotated-elsewhere").await;
    let refused = workload(&mut sc.rng, 1, 1);
    if let Err(e) = db.insert(&refused).await {
        sc.fail(e);
    }
    rows.extend(refused.clone());
    if let Err(e) = settled(&db, BOUND).await {
        sc.fail(format!(
            "{e} while the key was refused; log tail:\n{}",
            daemon.tail(15)
        ));
    }
    sc.inject("key_refused_with_nothing_stored", 1);
    sim.put_api_key(prism_sync::sim::DEFAULT_API_KEY).await;
    let after = workload(&mut sc.rng, scale(5), scale(20));
    if let Err(e) = db.insert(&after).await {
        sc.fail(e);
    }
    rows.extend(after);

    // The liveness bound: every row terminal within BOUND of the last fault and change.
    let healed = Instant::now();
    problems.extend(finish_and_stop(&db, &mut daemon, rows.len() + gone.len(), BOUND).await);
    sc.note(format!(
        "every row terminal {:?} after the last fault",
        healed.elapsed()
    ));

    let snapshot = db.snapshot().await;
    let refused_record = &refused[0].record;
    // A batch whose 2xx could not be read and that was then given up ends every row as
    // `unreadable_response` (the API applied what it could; its key is never released): rows of
    // such batches, and only those, may end so.
    let (unreadable, batch_of) = match unreadable_batches(&db).await {
        Ok(b) => b,
        Err(e) => sc.fail(e),
    };
    let mut expect = Expect::default();
    for r in &snapshot.rows {
        let codes: &[&str] = if stranded.contains(&r.id) {
            &["unknown_team"]
        } else if r.record.eq_ignore_ascii_case(refused_record) {
            &["http_401"]
        } else {
            hostile.dead_codes(&r.record).unwrap_or(&[])
        };
        let given_up_unreadable = r.code.as_deref() == Some("unreadable_response")
            && batch_of
                .get(&r.id)
                .is_some_and(|b| b.as_ref().is_some_and(|b| unreadable.contains(b)));
        let code = match r.code.as_deref() {
            _ if given_up_unreadable => Some("unreadable_response"),
            Some(c) if codes.contains(&c) => Some(c),
            _ => codes.first().copied(),
        };
        if let Some(code) = code {
            expect.dead.insert(r.id, code.to_owned());
        }
        if code == Some("unreadable_response") {
            expect.applied_dead.insert(r.id);
        }
    }
    let keys: BTreeSet<Option<String>> = snapshot
        .batches
        .iter()
        .filter(|b| {
            b.items
                .iter()
                .any(|i| i.r.eq_ignore_ascii_case(&hostile.oversized))
        })
        .map(|b| Some(b.key.clone()))
        .collect();
    if keys.len() != 1 {
        problems.push(format!(
            "the oversized record travelled under {} keys: a key answered 2xx was released",
            keys.len()
        ));
    }
    let (stats, verdict) = check(&db, &sim, &expect, problems).await;
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_ends_within_the_bound_whatever_the_api_answers() {
    for round in 0..rounds() {
        on_both_backends(move |b| hostile_answers(b, round)).await;
    }
}
