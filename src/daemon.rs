//! `prism-sync run`: serves telemetry (answering `starting` until the store is ready), connects
//! (waiting for the database if it is not up yet; a signal ends the wait), migrates, tells
//! systemd it is ready, and runs the engine until a signal asks it to drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::MicroClient;
use crate::engine::{Engine, EngineConfig, TeamClient};
use crate::health::Health;
use crate::settings::Settings;
use crate::store::{Store, redact_url};
use crate::telemetry;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Skip migrations (a separate `prism-sync migrate` job owns the schema).
    pub no_migrate: bool,
}

/// Connects to the database, retrying with backoff until it answers or `shutdown` fires.
pub async fn connect_with_retry(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let mut failures = 0u32;
    loop {
        // An attempt can take the pool's whole acquire timeout (10 s): a signal ends it.
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = Store::connect(&settings.database) => attempt,
        };
        match attempt {
            Ok(store) => return Ok(Some(store)),
            Err(e @ crate::store::StoreError::UnsupportedUrl(_)) => return Err(e.into()),
            Err(e) => {
                failures += 1;
                let wait = crate::backoff::RetryPolicy {
                    base_delay: Duration::from_millis(250),
                    max_delay: Duration::from_secs(15),
                }
                .ceiling(failures);
                warn!(error = %e, database = %redact_url(&settings.database.url), retry_in = ?wait, "database not reachable yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
}

/// One client per team: the default team from `micro.*`, then every `[teams."<id>"]` entry
/// (its own key, concurrency and rate limit; the rest inherited).
pub fn team_clients(settings: &Settings) -> anyhow::Result<Vec<TeamClient>> {
    let default = MicroClient::new(
        &settings.micro.base_url,
        &settings.micro.team_id,
        settings.micro.resolve_api_key()?,
        &settings.http,
    )
    .context("configuring the Micro API client")?
    .with_key_file(settings.micro.key_file_in_use());
    let mut clients = vec![TeamClient {
        client: default,
        max_in_flight: settings.sync.max_in_flight,
        default: true,
    }];
    for (team, t) in &settings.teams {
        if *team == settings.micro.team_id {
            anyhow::bail!(
                "[teams.\"{team}\"] names the default team (micro.team_id); configure it under [micro] instead"
            );
        }
        let http = crate::settings::HttpSettings {
            max_requests_per_second: t
                .max_requests_per_second
                .unwrap_or(settings.http.max_requests_per_second),
            ..settings.http.clone()
        };
        let client = MicroClient::new(&settings.micro.base_url, team, t.resolve_api_key()?, &http)
            .with_context(|| format!("configuring the Micro API client of team {team}"))?
            .with_key_file(t.key_file_in_use());
        clients.push(TeamClient {
            client,
            max_in_flight: t.max_in_flight.unwrap_or(settings.sync.max_in_flight),
            default: false,
        });
    }
    Ok(clients)
}

pub async fn run(
    settings: Settings,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut clients = team_clients(&settings)?;
    let health = Arc::new(Health::default());
    let watchdog = spawn_watchdog(health.clone(), settings.poll.longest(), shutdown.clone());
    telemetry::metrics_handle();
    let background = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    // The endpoints answer from the start: while the database does not answer yet, or a long
    // migration runs, `/livez` says "starting" (a probe must not restart a process that is
    // waiting, as systemd's watchdog is fed meanwhile) and `/readyz` 503.
    let slot = telemetry::StoreSlot::default();
    if let Some(addr) = settings.telemetry.listen_addr()? {
        let listener = telemetry::bind(addr).await.with_context(|| {
            format!(
                "binding telemetry.listen {addr} (set another address, or empty to turn it off)"
            )
        })?;
        info!(address = %listener.local_addr()?, "serving /metrics, /livez, /healthz, /readyz");
        let stuck_after = (settings.poll.longest() * 20).max(Duration::from_secs(30))
            + settings.database.busy_timeout;
        let (slot, health, stop) = (slot.clone(), health.clone(), background.clone());
        tasks.spawn(async move {
            if let Err(e) = telemetry::serve(listener, slot, health, stuck_after, stop).await {
                warn!(error = %e, "telemetry server stopped");
            }
        });
    }
    let store = match start_store(&settings, &options, &shutdown).await {
        Ok(Some(store)) => store,
        stopped_or_failed => {
            background.cancel();
            while tasks.join_next().await.is_some() {}
            if let Some(w) = watchdog {
                w.abort();
            }
            return stopped_or_failed.map(|_| ());
        }
    };
    let _ = slot.set(store.clone());
    tasks.spawn(telemetry::sample_gauges(
        store.clone(),
        health.clone(),
        EngineConfig::from_settings(&settings).codes,
        settings.telemetry.sample_interval,
        background.clone(),
    ));
    if settings.retention.succeeded.is_some() || settings.retention.dead.is_some() {
        tasks.spawn(crate::ops::purge::retention_loop(
            store.clone(),
            settings.retention.clone(),
            background.clone(),
        ));
    }
    // Kept API answers past history.response_retention go even once keep_responses is off.
    tasks.spawn(crate::ops::history::response_retention_loop(
        store.clone(),
        settings.history.response_retention,
        settings.retention.interval,
        background.clone(),
    ));
    let gates = crate::fleet::join(&store, &mut clients);
    let engine = Engine::with_teams(
        store.clone(),
        clients,
        EngineConfig::from_settings(&settings),
        health,
    );
    // The registry outlives the engine's drain (a draining replica still holds batches) and
    // deregisters once it is over.
    let registry_stop = CancellationToken::new();
    let registry = tokio::spawn(crate::fleet::run(
        store,
        crate::fleet::Member::new(engine.owner(), &settings.fleet),
        engine.load_probe(),
        gates,
        registry_stop.clone(),
    ));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let result = engine.run(shutdown.clone()).await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    registry_stop.cancel();
    let _ = registry.await;
    background.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(w) = watchdog {
        w.abort();
    }
    result?;
    Ok(())
}

/// Connects (waiting for the database as long as it takes) and migrates unless told not to;
/// `None` when a signal came first.
async fn start_store(
    settings: &Settings,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let Some(store) = connect_with_retry(settings, shutdown).await? else {
        return Ok(None);
    };
    if !options.no_migrate {
        store.migrate().await.context("applying migrations")?;
    }
    Ok(Some(store))
}

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(states);
}

/// Feeds systemd's watchdog at half its interval, but only while the main loop keeps turning:
/// a wedged loop stops the pings and systemd restarts the service.
fn spawn_watchdog(
    health: Arc<Health>,
    poll: Duration,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = interval / 2;
    let stuck_after = interval.max(poll * 20);
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {},
            }
            // Before the loop's first turn (migrating, waiting for the database) the process is
            // alive and working; after it, the loop must keep turning.
            if health.since_tick().is_none_or(|d| d < stuck_after) {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }))
}

/// Cancels `token` on SIGTERM or SIGINT; a second signal exits at once.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining (press Ctrl-C again to stop at once)"),
        }
        token.cancel();
        // Now, not once the drain is over: a drain can outlast systemd's watchdog interval,
        // and the watchdog is not fed once shutdown begins.
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        warn!(
            "second signal: exiting without draining; unanswered batches are re-sent on the next start"
        );
        std::process::exit(130);
    });
}
