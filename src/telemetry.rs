//! Logs, metrics and health endpoints: `/metrics` (Prometheus text), `/livez` (alias
//! `/healthz`) and `/readyz`, plus the sampler that turns database counts into gauges.
//!
//! Metric names are part of the contract (dashboards and alerts use them): see README.md.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::health::Health;
use crate::model::RowState;
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
        "prism_sync_concurrency_limit",
        "Requests allowed on the wire now (adaptive, at most sync.max_in_flight)."
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

/// Samples row counts and ages into gauges every `every`, until `stop`.
pub async fn sample_gauges(
    store: Store,
    health: Arc<Health>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut known_codes: Vec<String> = Vec::new();
    loop {
        match store.gauges().await {
            Ok(g) => {
                // Reads succeed while another process holds SQLite's write lock: only the
                // engine's claims (writes) may say the database is usable again.
                for state in RowState::ALL {
                    let n = g
                        .rows_by_state
                        .iter()
                        .find(|(s, _)| s == state.as_str())
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("prism_sync_rows", "state" => state.as_str()).set(n as f64);
                }
                // Codes that disappeared (replayed, purged) drop to zero rather than linger.
                for code in &known_codes {
                    if !g.dead_by_code.iter().any(|(c, _)| c == code) {
                        metrics::gauge!("prism_sync_dead_rows", "code" => code.clone()).set(0.0);
                    }
                }
                for (code, n) in g.dead_by_code.iter().take(50) {
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

#[derive(Clone)]
struct Probe {
    store: Store,
    health: Arc<Health>,
    handle: Option<PrometheusHandle>,
    /// The loop counts as stuck when it has not turned for this long.
    stuck_after: Duration,
}

/// Serves the telemetry endpoints on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
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

async fn readyz(State(p): State<Probe>) -> Response {
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), p.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("database unreachable: {e}")),
        Err(_) => problems.push("database did not answer within 2s".to_owned()),
    }
    if problems.is_empty() {
        match p.store.migrations_current().await {
            Ok(true) => {}
            Ok(false) => {
                problems.push("migrations not applied (run prism-sync migrate)".to_owned())
            }
            Err(e) => problems.push(format!("cannot read migrations: {e}")),
        }
    }
    if problems.is_empty() && !p.health.db_ok() {
        problems.push(
            "the database refuses the engine's writes (its last claim failed; the log says why)"
                .to_owned(),
        );
    }
    if p.health.credentials_refused() {
        problems.push("the Micro API refuses the API key of a team".to_owned());
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
