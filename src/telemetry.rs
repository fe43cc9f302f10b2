//! Logs, metrics and health endpoints: `/metrics` (Prometheus text), `/livez` (alias
//! `/healthz`) and `/readyz`, plus the sampler that turns database counts into gauges.
//!
//! Metric names are part of the contract (dashboards and alerts use them): see README.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::classify::CodePolicy;
use crate::health::Health;
use crate::model::{RowState, codes};
use crate::settings::{LogFormat, LogSettings};
use crate::store::Store;

/// Sets up `tracing`: text (coloured on a terminal) or JSON lines, filtered by `log.level` or
/// `RUST_LOG`. Logs go to stderr so that stdout stays for command output.
pub fn init_logging(settings: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    // A bare level applies to prism-sync; the libraries below it log every statement and frame
    // at debug, which buries the daemon's own lines. A full directive (`sqlx=debug`) is taken as is.
    let directives = if settings.level.contains('=') {
        settings.level.clone()
    } else {
        format!(
            "{},sqlx=warn,hyper=info,hyper_util=info,h2=info,reqwest=info,rustls=info",
            settings.level
        )
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match settings.format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
    };
    // A second initialisation (tests, the demo) keeps the first subscriber.
    let _ = result;
}

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("prism_sync_http_request_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("prism_sync_db_duration_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ],
                )
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            metrics::gauge!("prism_sync_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            metrics::gauge!("prism_sync_credentials_refused").set(0.0);
            // Counters exist from the start at zero, so rate() and alerts see them before the
            // first event rather than "no data".
            for outcome in ["succeeded", "retried", "dead"] {
                metrics::counter!("prism_sync_items_total", "outcome" => outcome).increment(0);
            }
            for result in [
                "ok",
                "partial",
                "retry",
                "auth_refused",
                "bisected",
                "released",
            ] {
                metrics::counter!("prism_sync_batches_total", "result" => result).increment(0);
            }
            metrics::counter!("prism_sync_idempotent_replays_total").increment(0);
            metrics::counter!("prism_sync_key_mismatches_total").increment(0);
            metrics::counter!("prism_sync_operator_replayed_rows_total").increment(0);
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "prism_sync_db_duration_seconds",
        Unit::Seconds,
        "Database time per claim (claim and store batches, one transaction; op=claim) and per outcome write (op=record)."
    );
    describe_counter!(
        "prism_sync_batches_claimed_total",
        "Batches built and stored by claims."
    );
    describe_gauge!(
        "prism_sync_fleet_replicas",
        "Replicas in the registry (prism_replicas) as this replica read it on its last heartbeat: state=live, or silent (not seen for three of its heartbeats)."
    );
    describe_counter!(
        "prism_sync_fleet_slot_reservations_total",
        "Round trips to the database for request slots under a fleet-wide max_requests_per_second (each reserves a small chunk)."
    );
    describe_gauge!(
        "prism_sync_concurrency_limit",
        "Requests allowed on the wire now (adaptive, at most sync.max_in_flight); per team (label team) where telemetry.team_label gives per-team metrics."
    );
    describe_counter!(
        "prism_sync_items_total",
        "Outbox rows by the outcome recorded for them (succeeded, retried, dead)."
    );
    describe_counter!(
        "prism_sync_item_errors_total",
        "Per-item error codes from the API or prism-sync (unknown codes as other)."
    );
    describe_counter!(
        "prism_sync_batches_total",
        "Batches by result (ok, partial, retry, auth_refused, bisected, released)."
    );
    describe_counter!(
        "prism_sync_http_requests_total",
        "Requests to the Micro API by status class (error: no response)."
    );
    describe_histogram!(
        "prism_sync_http_request_duration_seconds",
        Unit::Seconds,
        "Duration of requests to the Micro API."
    );
    describe_counter!(
        "prism_sync_idempotent_replays_total",
        "Answers the API replayed from its idempotency cache."
    );
    describe_counter!(
        "prism_sync_key_mismatches_total",
        "409 idempotency_key_mismatch answers (never expected)."
    );
    describe_gauge!(
        "prism_sync_rows",
        "Outbox rows by state (sampled from the database)."
    );
    describe_gauge!("prism_sync_dead_rows", "Dead rows by error code (sampled).");
    describe_gauge!(
        "prism_sync_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest row not yet succeeded or dead."
    );
    describe_gauge!(
        "prism_sync_oldest_batch_key_age_seconds",
        Unit::Seconds,
        "Age of the oldest unanswered batch's idempotency key."
    );
    describe_gauge!(
        "prism_sync_batches_in_flight",
        "Batches stored and not yet answered (all replicas)."
    );
    describe_gauge!(
        "prism_sync_rows_held_back",
        "Rows waiting on an older row of their record, counted among the first 10,000 waiting rows."
    );
    describe_gauge!(
        "prism_sync_watermark_lag_seconds",
        Unit::Seconds,
        "Postgres: how long the open writer of the outbox that holds the visibility watermark back has run."
    );
    describe_gauge!(
        "prism_sync_credentials_refused",
        "1 while the API refuses the key (of any team)."
    );
    describe_counter!(
        "prism_sync_team_items_total",
        "Outbox rows by team, operation and outcome (while telemetry.team_label is on)."
    );
    describe_gauge!(
        "prism_sync_team_credentials_refused",
        "1 while the API refuses this team's key (only this team pauses)."
    );
    describe_counter!(
        "prism_sync_operator_replayed_rows_total",
        "Rows requeued by prism-sync replay."
    );
    describe_gauge!(
        "prism_sync_last_progress_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last recorded outcome."
    );
    describe_gauge!("prism_sync_build_info", "Build information.");
}

/// prism-sync's own error codes (besides `http_<status>`): always their own label value.
const OWN_CODES: [&str; 16] = [
    codes::INVALID_RECORD_ID,
    codes::INVALID_PATCH,
    codes::PATCH_TOO_LARGE,
    codes::INVALID_OBJECT_TYPE,
    codes::MISSING_RESULT,
    codes::BATCH_RELEASED,
    codes::INVALID_OPERATION,
    codes::UNKNOWN_TEAM,
    "idempotency_key_mismatch",
    "response_too_large",
    "connection_interrupted",
    codes::UNREADABLE_RESPONSE,
    codes::CORRUPT_BATCH,
    "discarded",
    "connection_error",
    "timeout",
];

/// The `code` label value of an error code: prism-sync's own codes, `http_<3 digits>` and the
/// configured `retry.retryable_codes`/`retry.permanent_codes` as they are, any other code as
/// `other`. Codes come from the API (and so from whoever answers in its place): unbounded label
/// values would grow the series count, and the memory of every Prometheus scraping it, without
/// limit.
pub fn code_label(policy: &CodePolicy, code: &str) -> String {
    let http_status = code
        .strip_prefix("http_")
        .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()));
    if http_status
        || OWN_CODES.contains(&code)
        || policy.retryable.contains(code)
        || policy.permanent.contains(code)
    {
        code.to_owned()
    } else {
        "other".to_owned()
    }
}

/// Dead rows by error code as label values: codes [`code_label`] does not know are added up
/// under `other`.
fn dead_by_label(policy: &CodePolicy, dead_by_code: &[(String, i64)]) -> BTreeMap<String, i64> {
    let mut by_label = BTreeMap::new();
    for (code, n) in dead_by_code {
        *by_label.entry(code_label(policy, code)).or_insert(0) += n;
    }
    by_label
}

/// The succeeded rows are counted by reading the whole outbox (on Postgres here, a million
/// finished rows: 156 ms, about 400 ms of server CPU with its parallel workers), where
/// everything else the sampler reads is bounded by the backlog and the dead rows. Counted every
/// sample on every replica, that kept an idle daemon at 6-8 % of a core. So the next such count
/// waits a second for every this many rows the last one found: up to 100,000 finished rows are
/// counted every sample (at the default 5 s), a million every 50 s, five million every 250 s.
/// A rule on the rows found, not on the time the count took, so that a busy moment does not
/// put the next count off.
const FULL_COUNT_ROWS_PER_SECOND: f64 = 20_000.0;

/// When the succeeded rows are counted next, after a count that found `rows`.
fn next_full_count(counted_at: Instant, rows: i64) -> Instant {
    let wait = (rows.max(0) as f64 / FULL_COUNT_ROWS_PER_SECOND).min(86_400.0);
    counted_at + Duration::from_secs_f64(wait)
}

/// Samples row counts and ages into gauges every `every`, until `stop`.
pub async fn sample_gauges(
    store: Store,
    health: Arc<Health>,
    policy: CodePolicy,
    every: Duration,
    stop: CancellationToken,
) {
    let mut known_codes: Vec<String> = Vec::new();
    let mut full_count_due = Instant::now();
    loop {
        let mut succeeded = None;
        if Instant::now() >= full_count_due {
            match store.succeeded_rows().await {
                Ok(n) => {
                    succeeded = Some(n);
                    full_count_due = next_full_count(Instant::now(), n);
                }
                Err(e) => {
                    health.set_db_ok(false);
                    debug!(error = %e, "counting the succeeded rows failed");
                }
            }
        }
        let gauges = store.gauges().await;
        // Set with the sample's other row counts, not a read earlier: a scrape between the two
        // reads would see this sample's succeeded rows beside the last sample's dead ones.
        if let Some(n) = succeeded {
            metrics::gauge!("prism_sync_rows", "state" => RowState::Succeeded.as_str())
                .set(n as f64);
        }
        match gauges {
            Ok(g) => {
                // Reads succeed while another process holds SQLite's write lock: only the
                // engine's claims (writes) may say the database is usable again.
                for state in RowState::ALL {
                    if state == RowState::Succeeded {
                        continue;
                    }
                    let n = g
                        .rows_by_state
                        .iter()
                        .find(|(s, _)| s == state.as_str())
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("prism_sync_rows", "state" => state.as_str()).set(n as f64);
                }
                let dead = dead_by_label(&policy, &g.dead_by_code);
                // Codes that disappeared (replayed, purged) drop to zero rather than linger.
                for code in &known_codes {
                    if !dead.contains_key(code) {
                        metrics::gauge!("prism_sync_dead_rows", "code" => code.clone()).set(0.0);
                    }
                }
                for (code, n) in &dead {
                    metrics::gauge!("prism_sync_dead_rows", "code" => code.clone()).set(*n as f64);
                    if !known_codes.contains(code) {
                        known_codes.push(code.clone());
                    }
                }
                metrics::gauge!("prism_sync_oldest_pending_age_seconds")
                    .set(g.oldest_pending_age_seconds);
                metrics::gauge!("prism_sync_oldest_batch_key_age_seconds")
                    .set(g.oldest_batch_key_age_seconds);
                metrics::gauge!("prism_sync_batches_in_flight").set(g.batches_in_flight as f64);
                metrics::gauge!("prism_sync_rows_held_back").set(g.rows_held_back as f64);
                metrics::gauge!("prism_sync_watermark_lag_seconds").set(g.watermark_lag_seconds);
                metrics::counter!("prism_sync_operator_replayed_rows_total")
                    .absolute(u64::try_from(g.operator_replayed_rows).unwrap_or(0));
            }
            Err(e) => {
                health.set_db_ok(false);
                debug!(error = %e, "sampling gauges failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {},
        }
    }
}

/// The store once the daemon has connected to it and migrated: the endpoints answer before
/// (`/livez` "starting", `/readyz` 503), so that a probe does not restart a process that is
/// waiting for its database or running a long migration.
pub type StoreSlot = Arc<std::sync::OnceLock<Store>>;

#[derive(Clone)]
struct Probe {
    store: StoreSlot,
    health: Arc<Health>,
    handle: Option<PrometheusHandle>,
    /// The loop counts as stuck when it has not turned for this long.
    stuck_after: Duration,
}

/// Serves the telemetry endpoints on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: StoreSlot,
    health: Arc<Health>,
    stuck_after: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let probe = Probe {
        store,
        health,
        handle: metrics_handle(),
        stuck_after,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/healthz", get(livez))
        .route("/readyz", get(readyz))
        .with_state(probe);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_text(State(p): State<Probe>) -> Response {
    match &p.handle {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

async fn livez(State(p): State<Probe>) -> Response {
    match p.health.since_tick() {
        Some(d) if d <= p.stuck_after => (StatusCode::OK, "alive\n").into_response(),
        Some(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("main loop has not turned for {d:?}\n"),
        )
            .into_response(),
        None => (StatusCode::OK, "starting\n").into_response(),
    }
}

/// Readiness, with short fixed reasons: the endpoint is often reachable by more than the
/// operators (a load balancer, a status page), so the database's own error text (host names,
/// database and role names, SQL) goes to the log, never into the answer.
async fn readyz(State(p): State<Probe>) -> Response {
    let Some(store) = p.store.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting (connecting to the database, or migrating; the log says which)\n",
        )
            .into_response();
    };
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "readiness: the database does not answer");
            problems.push("database unreachable (the log says why)".to_owned());
        }
        Err(_) => problems.push("database did not answer within 2s".to_owned()),
    }
    if problems.is_empty() {
        match store.migrations_current().await {
            Ok(true) => {}
            Ok(false) => {
                problems.push("migrations not applied (run prism-sync migrate)".to_owned())
            }
            Err(e) => {
                warn!(error = %e, "readiness: cannot read the applied migrations");
                problems.push("cannot read the applied migrations (the log says why)".to_owned());
            }
        }
    }
    if problems.is_empty() && !p.health.db_ok() {
        problems.push(
            "the database refuses the engine's writes (its last claim failed; the log says why)"
                .to_owned(),
        );
    }
    let refused = p.health.refused_teams();
    if !refused.is_empty() {
        problems.push(format!(
            "the Micro API refuses the API key of team {}",
            refused.join(", team ")
        ));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        warn!(problems = ?problems, "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_succeeded_rows_are_counted_less_often_the_more_there_are() {
        let now = Instant::now();
        // A small outbox: counted again at the next sample.
        assert!(next_full_count(now, 149) < now + Duration::from_millis(10));
        assert_eq!(next_full_count(now, 0), now);
        assert_eq!(
            next_full_count(now, -1),
            now,
            "a nonsense count waits for nothing"
        );
        // A million finished rows: every 50 s, not every sample.
        assert_eq!(
            next_full_count(now, 1_000_000),
            now + Duration::from_secs(50)
        );
        // However many, the count comes again within a day.
        assert_eq!(
            next_full_count(now, i64::MAX),
            now + Duration::from_secs(86_400)
        );
    }

    fn policy() -> CodePolicy {
        CodePolicy {
            retryable: ["rate_limited".to_owned()].into(),
            permanent: ["not_found".to_owned()].into(),
            max_attempts: 5,
        }
    }

    #[test]
    fn known_codes_are_their_own_label_and_every_other_code_is_other() {
        let p = policy();
        for known in [
            "rate_limited",
            "not_found",
            "patch_too_large",
            "http_503",
            "discarded",
        ] {
            assert_eq!(code_label(&p, known), known);
        }
        for unknown in [
            "made_up",
            "http_5x3",
            "http_\0\0\0",
            "http_5030",
            "",
            "NOT_FOUND",
        ] {
            assert_eq!(code_label(&p, unknown), "other", "{unknown:?}");
        }
    }

    #[test]
    fn dead_rows_of_unknown_codes_add_up_under_other() {
        let dead = [
            ("not_found".to_owned(), 2),
            ("made_up_1".to_owned(), 3),
            ("made_up_2".to_owned(), 4),
        ];
        let by_label: Vec<_> = dead_by_label(&policy(), &dead).into_iter().collect();
        assert_eq!(
            by_label,
            [("not_found".to_owned(), 2), ("other".to_owned(), 7)]
        );
    }
}
