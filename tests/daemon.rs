//! The daemon as a real process: signals, crashes, telemetry, secrets in logs.

mod common;

use std::time::Duration;

use common::*;
use prism_sync::ops::enqueue::{Change, insert};
use prism_sync::sim::{FaultProfile, SimConfig, SimTeam, Simulator};

const FINISH: Duration = Duration::from_secs(60);

fn distinct_records(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (uuid(), patch(i))).collect()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `/readyz` until it answers `status` (or 5 s pass); returns the last answer.
async fn readyz_until(daemon: &Daemon, status: u16) -> (u16, String) {
    let mut answer = (0, String::new());
    for _ in 0..100 {
        answer = daemon.get("/readyz").await;
        if answer.0 == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    answer
}

fn team_changes(team: &str, n: usize) -> Vec<Change> {
    (0..n)
        .map(|i| Change {
            team_id: team.to_owned(),
            ..Change::update(uuid::Uuid::new_v4(), patch(i))
        })
        .collect()
}

both_backends! {
    async fn http_max_requests_per_second_caps_what_the_api_sees(db) {
        // 32 rows in batches of one: 32 requests, at most 8 a second. Without the ceiling they
        // all arrive within a fraction of a second.
        const RATE: f64 = 8.0;
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(32)).await;
        let mut daemon = spawn_daemon(&db, &sim, &[
            ("PRISM_SYNC__HTTP__MAX_REQUESTS_PER_SECOND", "8"),
            ("PRISM_SYNC__BATCH__SIZE", "1"),
            ("PRISM_SYNC__SYNC__MAX_IN_FLIGHT", "16"),
        ]);
        let done = wait_until_finished(&store, FINISH).await;
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let parse = |at: &str| time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
        let mut times: Vec<time::OffsetDateTime> = sim.requests().iter().map(|r| parse(&r.at)).collect();
        times.sort();
        assert!(times.len() >= 32, "{} requests", times.len());
        // Over every stretch of requests, the count beyond a small burst fits the rate (with a
        // margin for the time between the client's turn and the simulator's clock).
        const BURST: f64 = 2.0;
        for (i, first) in times.iter().enumerate() {
            for (j, last) in times.iter().enumerate().skip(i + 1) {
                let seconds = (*last - *first).as_seconds_f64();
                let allowed = RATE * seconds * 1.25 + BURST;
                assert!((j - i) as f64 <= allowed, "{} requests in {seconds:.3}s (requests {i}..={j}): over {RATE}/s", j - i + 1);
            }
        }
        let span = (times[times.len() - 1] - times[0]).as_seconds_f64();
        assert!(span >= (times.len() as f64 - 1.0 - BURST) / RATE / 1.25, "{} requests took {span:.2}s", times.len());
    }

    async fn readiness_with_several_teams_names_the_team_whose_key_is_refused(db) {
        // Lower case: the config crate lower-cases the keys of PRISM_SYNC__TEAMS__<ID>__….
        const TEAM_B: &str = "teamb";
        let config = SimConfig {
            seed: 3,
            extra_teams: vec![SimTeam { team_id: TEAM_B.into(), api_key: "key-b".into() }],
            ..SimConfig::default()
        };
        let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap()).await.expect("simulator");
        let store = db.store().await;
        let mut changes = team_changes("", 5);
        changes.extend(team_changes(TEAM_B, 5));
        insert(&store, &changes).await.unwrap();
        let mut daemon = spawn_daemon(&db, &sim, &[("PRISM_SYNC__TEAMS__TEAMB__API_KEY", "key-b")]);
        let done = wait_until_finished(&store, FINISH).await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?} {}", daemon.logs());
        assert_eq!(readyz_until(&daemon, 200).await, (200, "ready\n".to_owned()), "every team's key works");
        // Each team's adaptive limit is its own series (it was one unlabelled gauge that every
        // team overwrote).
        let metrics = daemon.get("/metrics").await.1;
        for team in [sim.team_id(), TEAM_B] {
            assert!(metrics.contains(&format!("prism_sync_concurrency_limit{{team=\"{team}\"}}")), "{team}: {metrics}");
        }

        sim.set_api_key_for_team(TEAM_B, "rotated").unwrap();
        insert(&store, &team_changes(TEAM_B, 3)).await.unwrap();
        let (status, body) = readyz_until(&daemon, 503).await;
        assert_eq!(status, 503, "not ready while team B's key is refused: {body}");
        assert!(body.contains(&format!("refuses the API key of team {TEAM_B}")), "the reason names the team: {body}");
        assert!(!body.contains(sim.team_id()), "the default team's key works and is not named: {body}");

        sim.set_api_key_for_team(TEAM_B, "key-b").unwrap();
        assert_eq!(readyz_until(&daemon, 200).await.0, 200, "ready again once team B's key works");
        wait_until_finished(&store, FINISH).await;
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
    }

    async fn error_codes_from_the_api_are_bounded_label_values(db) {
        // Each dead row carries a code of the server's choosing; only known codes become label
        // values, the rest are counted as `other`.
        let hostile: Vec<(String, String)> = (0..12).map(|i| (uuid(), format!("made_up_{i}"))).collect();
        let mut errors: std::collections::BTreeMap<String, String> = hostile.iter().cloned().collect();
        let refused = uuid();
        errors.insert(refused.clone(), "not_found".into());
        let sim = sim(FaultProfile { item_errors_for_ids: errors, ..FaultProfile::default() }).await;
        let store = db.store().await;
        let mut rows_in: Vec<(String, String)> = hostile.iter().enumerate().map(|(i, (r, _))| (r.clone(), patch(i))).collect();
        rows_in.push((refused, patch(99)));
        insert_rows(&store, &rows_in).await;
        let mut daemon = spawn_daemon(&db, &sim, &[("PRISM_SYNC__RETRY__MAX_ATTEMPTS", "1")]);
        let done = wait_until_finished(&store, FINISH).await;
        assert!(done.iter().all(|r| r.state == "dead"), "{done:?}");
        let mut text = String::new();
        for _ in 0..50 {
            text = daemon.get("/metrics").await.1;
            if metric(&text, "prism_sync_dead_rows{code=\"other\"}") == 12.0 { break; }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(metric(&text, "prism_sync_dead_rows{code=\"other\"}"), 12.0, "{text}");
        assert_eq!(metric(&text, "prism_sync_dead_rows{code=\"not_found\"}"), 1.0, "{text}");
        assert_eq!(metric(&text, "prism_sync_item_errors_total{code=\"other\"}"), 12.0, "{text}");
        assert!(!text.contains("made_up_"), "no server-made code is a label value: {text}");
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
    }

    async fn readiness_answers_a_short_reason_and_logs_the_database_error(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let mut daemon = spawn_daemon(&db, &sim, &[]);
        assert_eq!(readyz_until(&daemon, 200).await.0, 200, "{}", daemon.logs());
        // A migrations table the database cannot answer the readiness query from: its error
        // text names the missing column.
        exec(&store, "DROP TABLE _sqlx_migrations; CREATE TABLE _sqlx_migrations (unrelated INTEGER)").await;
        let (status, body) = readyz_until(&daemon, 503).await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: cannot read the applied migrations (the log says why)\n"),
            "a fixed reason, not the database's text"
        );
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
        let logs = daemon.logs();
        assert!(
            logs.lines().any(|l| l.contains("cannot read the applied migrations") && l.contains("version")),
            "the log has the database's own error: {logs}"
        );
    }

    async fn sigterm_mid_batch_lets_the_batch_finish_and_exits_zero(db) {
        let sim = sim(FaultProfile { latency: Duration::from_millis(800), ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(120)).await;
        let mut daemon = spawn_daemon(&db, &sim, &[]);
        // Both batches (100 + 20 rows) on the wire: a batch still in the claim-ahead buffer at
        // SIGTERM is not sent, by design, and stays stored for the next start.
        wait_for("both batches on the wire", Duration::from_secs(20), || sim.stats().idempotency_keys_in_progress == 2).await;
        daemon.signal("TERM");
        let status = daemon.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(0), "{}", daemon.logs());
        let after = rows(&store).await;
        assert!(after.iter().all(|r| r.state == "succeeded"), "the batches in flight finished before exit: {:?}", after.iter().find(|r| r.state != "succeeded"));
    }

    async fn kill_9_mid_request_loses_nothing_and_the_restart_resends_under_the_same_key(db) {
        let sim = sim(FaultProfile { latency: Duration::from_millis(1500), ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(150)).await;
        let mut first = spawn_daemon(&db, &sim, &[("PRISM_SYNC__SYNC__LEASE", "6s"), ("PRISM_SYNC__HTTP__TIMEOUT", "1s")]);
        wait_for("a request on the wire", Duration::from_secs(20), || sim.stats().idempotency_keys_in_progress > 0).await;
        first.signal("KILL");
        first.wait_exit(Duration::from_secs(5)).await;
        sim.set_faults(FaultProfile::default());
        let mut second = spawn_daemon(&db, &sim, &[("PRISM_SYNC__SYNC__LEASE", "6s"), ("PRISM_SYNC__HTTP__TIMEOUT", "1s")]);
        let done = wait_until_finished(&store, FINISH).await;
        second.signal("TERM");
        assert_eq!(second.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
        assert!(done.iter().all(|r| r.state == "succeeded"));
        assert_eq!(assert_applied_in_order_once(&sim), 150, "applied once: the re-send was an idempotent replay or a first send");
        assert_eq!(sim.stats().idempotency_mismatches, 0);
    }

    async fn metrics_count_what_happened_and_readiness_follows_the_key(db) {
        let refused = uuid();
        let faults = FaultProfile {
            item_errors_for_ids: std::collections::BTreeMap::from([(refused.clone(), "not_found".to_owned())]),
            ..FaultProfile::default()
        };
        let sim = sim(faults).await;
        let store = db.store().await;
        let mut rows_in = distinct_records(149);
        rows_in.push((refused, patch(999)));
        insert_rows(&store, &rows_in).await;
        let mut daemon = spawn_daemon(&db, &sim, &[("PRISM_SYNC__LOG__LEVEL", "debug")]);
        wait_until_finished(&store, FINISH).await;
        let mut text = String::new();
        for _ in 0..50 {
            text = daemon.get("/metrics").await.1;
            if metric(&text, "prism_sync_rows{state=\"succeeded\"}") == 149.0 { break; }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(metric(&text, "prism_sync_items_total{outcome=\"succeeded\"}"), 149.0, "{text}");
        assert_eq!(metric(&text, "prism_sync_items_total{outcome=\"dead\"}"), 1.0);
        assert_eq!(metric(&text, "prism_sync_item_errors_total{code=\"not_found\"}"), 1.0);
        assert_eq!(metric(&text, "prism_sync_http_requests_total{status_class=\"2xx\"}"), sim.requests().len() as f64);
        assert_eq!(metric(&text, "prism_sync_rows{state=\"succeeded\"}"), 149.0);
        assert_eq!(metric(&text, "prism_sync_rows{state=\"dead\"}"), 1.0);
        assert_eq!(metric(&text, "prism_sync_dead_rows{code=\"not_found\"}"), 1.0);
        assert!(text.contains("prism_sync_http_request_duration_seconds_bucket"), "latency is a histogram");
        assert!(text.contains("prism_sync_build_info{version="));
        assert_eq!(daemon.get("/livez").await.0, 200);
        assert_eq!(daemon.get("/healthz").await.0, 200);
        assert_eq!(daemon.get("/readyz").await.0, 200);

        sim.set_api_key("revoked");
        insert_rows(&store, &distinct_records(5)).await;
        let mut ready = 200;
        for _ in 0..100 {
            ready = daemon.get("/readyz").await.0;
            if ready == 503 { break; }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ready, 503, "not ready while the key is refused");
        assert_eq!(metric(&daemon.get("/metrics").await.1, "prism_sync_credentials_refused"), 1.0);
        sim.set_api_key(prism_sync::sim::DEFAULT_API_KEY);
        for _ in 0..100 {
            ready = daemon.get("/readyz").await.0;
            if ready == 200 { break; }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ready, 200, "ready again once the key works");
        wait_until_finished(&store, FINISH).await;
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
        let logs = daemon.logs();
        assert!(!logs.contains(prism_sync::sim::DEFAULT_API_KEY), "the API key appears in no log line");
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
            .collect();
        let batch_lines: Vec<&serde_json::Value> = lines.iter().filter(|l| l["span"]["name"] == "batch").collect();
        assert!(!batch_lines.is_empty(), "batch lines are logged");
        for line in batch_lines {
            assert!(line["span"]["batch_id"].is_string() && line["span"]["key"].is_string(), "batch lines carry id and key: {line}");
        }
        assert!(!logs.contains("r999@example.com"), "patch contents are not logged");
    }
}

/// Claim rounds the daemon ran in `window`, read from its claim-duration histogram.
async fn claim_rounds_in(daemon: &Daemon, window: Duration) -> f64 {
    let claims = |text: &str| metric(text, "prism_sync_db_duration_seconds_count{op=\"claim\"}");
    let before = claims(&daemon.get("/metrics").await.1);
    tokio::time::sleep(window).await;
    claims(&daemon.get("/metrics").await.1) - before
}

/// On Postgres an idle daemon listens for NOTIFY, so with `poll.idle_interval = 1s` it polls
/// less often the longer its claims find nothing, where it would run a claim every
/// `poll.interval` (20 ms here); a change committed meanwhile is still synced (the NOTIFY wakes
/// it), and a retry it wrote comes due on its own clock. While a row waits that it cannot take
/// yet (another replica's retry), it polls at the interval. With the idle interval set to the
/// interval, the same measure sees it poll at the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_idle_daemon_polls_less_often_and_still_syncs_what_comes() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let retried = uuid();
    let sim = sim(FaultProfile::default()).await;
    let store = db.store().await;
    let mut daemon = spawn_daemon(&db, &sim, &[("PRISM_SYNC__POLL__IDLE_INTERVAL", "1s")]);
    insert_rows(&store, &[(uuid(), patch(1))]).await;
    wait_until_finished(&store, FINISH).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = claim_rounds_in(&daemon, Duration::from_secs(3)).await;
    assert!(
        idle <= 12.0,
        "an idle daemon that listens ran {idle} claims in 3 s (every 20 ms would be ~150)"
    );

    // Idle still: a change committed now is synced, and so is one whose item fails once with a
    // retryable code (its retry is due in 20-200 ms, sooner than the stretched poll).
    sim.set_faults(FaultProfile {
        item_errors_for_ids: std::collections::BTreeMap::from([(
            retried.clone(),
            "rate_limited".to_owned(),
        )]),
        ..FaultProfile::default()
    });
    insert_rows(&store, &[(retried.clone(), patch(2))]).await;
    let deadline = std::time::Instant::now() + FINISH;
    while sim.stats().items_failed == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was never sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.set_faults(FaultProfile::default());
    let states = wait_until_finished(&store, FINISH).await;
    assert!(states.iter().all(|r| r.state == "succeeded"), "{states:?}");

    // A row another replica put back to retry (an hour from now) is waiting, though not for
    // this daemon's claims yet, and no NOTIFY will say when it comes due: so the daemon polls
    // at the interval while it waits (a stretched poll here is what left a fleet's idle
    // replicas without work), and takes it once it is due, without a wake-up.
    let other = uuid();
    exec(
        &store,
        &format!(
            "INSERT INTO prism_outbox (record_id, patch, state, attempts, next_attempt_at)
             VALUES ('{other}', '{}', 'retrying', 1, now() + interval '1 hour')",
            patch(4)
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = claim_rounds_in(&daemon, Duration::from_secs(3)).await;
    assert!(
        waiting >= 40.0,
        "while a row waits the daemon polls every 20 ms: {waiting} claims in 3 s"
    );
    exec(
        &store,
        &format!("UPDATE prism_outbox SET next_attempt_at = now() WHERE record_id = '{other}'"),
    )
    .await;
    let states = wait_until_finished(&store, FINISH).await;
    assert!(states.iter().all(|r| r.state == "succeeded"), "{states:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = claim_rounds_in(&daemon, Duration::from_secs(3)).await;
    assert!(
        idle <= 12.0,
        "idle again, the daemon polls less often: {idle} claims in 3 s"
    );
    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );

    let daemon = spawn_daemon(&db, &sim, &[("PRISM_SYNC__POLL__IDLE_INTERVAL", "20ms")]);
    insert_rows(&store, &[(uuid(), patch(3))]).await;
    wait_until_finished(&store, FINISH).await;
    let polling = claim_rounds_in(&daemon, Duration::from_secs(3)).await;
    assert!(
        polling >= 40.0,
        "with poll.idle_interval = poll.interval it polls every 20 ms: {polling} claims in 3 s"
    );
}

/// A daemon waiting for its database (down at start: a failover, a cluster restart) answers its
/// probes: `/livez` "starting" (a Kubernetes startup probe must not restart a process that is
/// doing what it should), `/readyz` 503 saying why. The endpoints used to be served only once
/// the database had answered and the migrations were done: two minutes of an unreachable
/// database, or a long migration, and the probe killed the pod, over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waiting_for_its_database_answers_its_probes_and_stops_on_sigterm() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let sim = sim(FaultProfile::default()).await;
    let mut daemon = spawn_daemon(
        &db,
        &sim,
        &[("DATABASE_URL", "postgres://prism@127.0.0.1:1/unreachable")],
    );
    let mut live = (0, String::new());
    for _ in 0..100 {
        live = daemon.get("/livez").await;
        if live.0 != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live, (200, "starting\n".to_owned()), "{}", daemon.logs());
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("starting"), "{body}");
    // At once, not when the connection attempt in progress gives up (up to 10 s).
    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(3)).await.code(),
        Some(0),
        "{}",
        daemon.logs()
    );
}

/// The API refuses the key; the operator rotates it in the key file (a Kubernetes Secret's
/// mounted file changes in place), as the alert's runbook says. The daemon used to keep probing
/// with the key it read at start until someone restarted it, while the backlog grew towards
/// `retry.give_up_after`; it now reads the file again when the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_in_its_file_is_taken_up_without_a_restart() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let sim = sim(FaultProfile::default()).await;
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("micro-api-key");
    std::fs::write(&key_file, "revoked-key\n").unwrap();
    insert_rows(&store, &[(uuid(), patch(1))]).await;
    let mut daemon = spawn_daemon(
        &db,
        &sim,
        &[
            ("MICRO_API_KEY", ""),
            (
                "PRISM_SYNC__MICRO__API_KEY_FILE",
                key_file.to_str().unwrap(),
            ),
        ],
    );
    let mut refused = String::new();
    for _ in 0..200 {
        refused = daemon.get("/readyz").await.1;
        if refused.contains("refuses the API key") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused.contains("refuses the API key"), "{refused}");
    std::fs::write(&key_file, format!("{}\n", prism_sync::sim::DEFAULT_API_KEY)).unwrap();
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(readyz_until(&daemon, 200).await.0, 200);
    assert!(
        daemon.logs().contains("the API key file changed"),
        "{}",
        daemon.logs()
    );
    daemon.signal("TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
}
