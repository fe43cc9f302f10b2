//! `prism-sync demo`: the newcomer's first minute. Starts the simulator in-process with mild
//! faults, fills an embedded SQLite outbox with a realistic sample, syncs it with a live progress
//! line, then proves the guarantees against what the simulator saw and points at the next
//! commands to try.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::MicroClient;
use crate::engine::{Engine, EngineConfig};
use crate::health::Health;
use crate::ops;
use crate::settings::Settings;
use crate::sim::{FaultProfile, SimConfig, Simulator};
use crate::store::Store;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The demo's own SQLite file (recreated on every run).
    #[arg(long, default_value = "prism-sync-demo.db")]
    pub db: std::path::PathBuf,
    /// How many changes to enqueue.
    #[arg(long, default_value_t = 20_000)]
    pub changes: usize,
    /// Over how many contacts.
    #[arg(long, default_value_t = 1_000)]
    pub contacts: usize,
    /// Seed for the sample and the simulator's faults.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Turn the simulator's faults off.
    #[arg(long)]
    pub no_faults: bool,
}

const FIRST: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Linus",
];
const LAST: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Torvalds",
];
const STAGES: [&str; 5] = ["lead", "qualified", "opportunity", "customer", "churned"];

struct Sample {
    changes: Vec<ops::enqueue::Change>,
    contacts: Vec<Uuid>,
    /// Contacts the simulator fails for good, and the code it uses.
    refused: BTreeMap<Uuid, &'static str>,
    poison: Uuid,
}

fn sample(args: &DemoArgs) -> Sample {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let contacts: Vec<Uuid> = (0..args.contacts.max(4))
        .map(|_| uuid::Builder::from_random_bytes(rng.random()).into_uuid())
        .collect();
    let mut changes = Vec::with_capacity(args.changes);
    for revision in 0..args.changes {
        let contact = contacts[rng.random_range(0..contacts.len())];
        let (first, last) = (FIRST[rng.random_range(0..8)], LAST[rng.random_range(0..8)]);
        let mut default = Map::new();
        default.insert("revision".into(), json!(revision));
        match rng.random_range(0..4) {
            0 => {
                default.insert(
                    "email".into(),
                    json!(
                        format!("{}.{}{}@example.com", first, last, revision % 97).to_lowercase()
                    ),
                );
            }
            1 => {
                default.insert("first_name".into(), json!(first));
                default.insert("last_name".into(), json!(last));
            }
            2 => {
                default.insert(
                    "lifecycle_stage".into(),
                    json!(STAGES[rng.random_range(0..STAGES.len())]),
                );
            }
            _ => {
                default.insert("score".into(), json!(rng.random_range(0..100)));
            }
        }
        let mut patch = json!({ "default": default });
        if rng.random_bool(0.08) {
            patch["list"] = json!({ "tags": ["demo", STAGES[rng.random_range(0..STAGES.len())]] });
        }
        changes.push(ops::enqueue::Change::update(contact, patch.to_string()));
    }
    let refused = BTreeMap::from([
        (contacts[0], "not_found"),
        (contacts[1], "validation_error"),
    ]);
    Sample {
        changes,
        poison: contacts[2],
        contacts,
        refused,
    }
}

fn demo_faults(s: &Sample) -> FaultProfile {
    FaultProfile {
        error_503_rate: 0.03,
        rate_limit_rate: 0.02,
        retry_after_ms: Some(200),
        latency: Duration::from_millis(3),
        latency_jitter: Duration::from_millis(20),
        drop_after_apply_rate: 0.01,
        missing_results_rate: 0.01,
        item_error_rate: 0.01,
        item_error_codes: vec!["rate_limited".into(), "internal_error".into()],
        item_errors_for_ids: s
            .refused
            .iter()
            .map(|(id, code)| (id.to_string(), (*code).to_owned()))
            .collect(),
        poison_ids: vec![s.poison.to_string()],
        poison_status: 400,
        ..FaultProfile::default()
    }
}

pub async fn run(args: DemoArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let sample = sample(&args);
    let (sim, api_key, settings) = start_simulator(&args, &sample).await?;
    write_intro(&args, &sim, out)?;
    let store = Store::connect(&settings.database)
        .await
        .context("opening the demo database")?;
    store.migrate().await?;
    ops::enqueue::insert(&store, &sample.changes).await?;
    writeln!(
        out,
        "  enqueued {} changes to {} contacts (as your application would, with INSERT INTO prism_outbox)",
        sample.changes.len(),
        sample.contacts.len()
    )?;
    writeln!(out)?;

    let elapsed = sync_with_progress(&settings, api_key, &store, &sample, out).await?;

    let report = ops::status::status(&store).await?;
    let stats = sim.stats();
    writeln!(out)?;
    writeln!(
        out,
        "done in {:.1}s: {} requests, {} idempotent replays, {} faults injected by the simulator",
        elapsed.as_secs_f64(),
        stats.requests_total,
        stats.replays,
        stats.faults_injected.values().sum::<u64>()
    )?;
    let verdict = verify(&sample, &sim, &report)?;
    writeln!(out, "{verdict}")?;
    writeln!(out)?;
    ops::status::render(&report, out)?;
    write_next_steps(&args, &store, out).await?;
    sim.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Starts the simulator (with the demo's faults unless they are off) on a fresh demo database;
/// returns it, its API key and the settings that point the daemon at both.
async fn start_simulator(
    args: &DemoArgs,
    sample: &Sample,
) -> anyhow::Result<(crate::sim::SimHandle, String, Settings)> {
    let faults = if args.no_faults {
        FaultProfile::default()
    } else {
        demo_faults(sample)
    };
    let sim_config = SimConfig {
        faults,
        seed: args.seed,
        ..SimConfig::default()
    };
    let (api_key, team) = (sim_config.api_key.clone(), sim_config.team_id.clone());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().expect("an address"))
        .await
        .context("starting the simulator")?;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = args.db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let mut settings = Settings::default();
    settings.database.url = format!("sqlite://{}?mode=rwc", args.db.display());
    settings.micro.base_url = sim.base_url();
    settings.micro.team_id = team;
    settings.retry.base_delay = Duration::from_millis(100);
    settings.retry.max_delay = Duration::from_secs(2);
    settings.retry.max_attempts = 6;
    settings.auth.probe_interval = Duration::from_secs(1);
    settings.http.timeout = Duration::from_secs(5);
    settings.sync.lease = Duration::from_secs(15);
    settings.validate()?;
    Ok((sim, api_key, settings))
}

fn write_intro(
    args: &DemoArgs,
    sim: &crate::sim::SimHandle,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(out, "prism-sync demo")?;
    writeln!(
        out,
        "  simulator (Micro API stand-in) on {}, faults: {}",
        sim.base_url(),
        if args.no_faults {
            "off"
        } else {
            "503s, 429s, dropped connections, missing results, item errors, one poison item"
        }
    )?;
    writeln!(
        out,
        "  outbox: {} (SQLite, WAL, synchronous=FULL)",
        args.db.display()
    )?;
    Ok(())
}

/// Runs the engine until every row has ended (or 50 s have passed), with a progress line;
/// returns how long it took.
async fn sync_with_progress(
    settings: &Settings,
    api_key: String,
    store: &Store,
    sample: &Sample,
    out: &mut impl Write,
) -> anyhow::Result<Duration> {
    let client = MicroClient::new(
        &settings.micro.base_url,
        &settings.micro.team_id,
        Some(api_key.into()),
        &settings.http,
    )?;
    let health = Arc::new(Health::default());
    let engine = Engine::new(
        store.clone(),
        client,
        EngineConfig::from_settings(settings),
        health.clone(),
    );
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(engine.run(stop.clone()));
    let total = sample.changes.len() as u64;
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // On a terminal the progress line is indicatif's; in a pipe, a plain line a second.
    let progress = tty.then(|| progress_bar(total));
    let deadline = started + Duration::from_secs(50);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = ops::status::status(store).await?;
        let open = ["pending", "in_flight", "retrying"]
            .iter()
            .map(|s| report.rows.get(*s).copied().unwrap_or(0))
            .sum::<i64>();
        let done = report.rows.get("succeeded").copied().unwrap_or(0);
        let dead = report.rows.get("dead").copied().unwrap_or(0);
        let rate = (done + dead) as f64 / started.elapsed().as_secs_f64().max(0.001);
        let detail = format!(
            "retried {} · dead {dead} · {:.0} rows/s · {} requests",
            Health::read(&health.rows_retried),
            rate,
            Health::read(&health.sends),
        );
        match &progress {
            Some(bar) => {
                bar.set_position((done + dead) as u64);
                bar.set_message(detail);
            }
            None if last_line.elapsed() >= Duration::from_secs(1) || open == 0 => {
                writeln!(out, "  synced {}/{total} · {detail}", done + dead)?;
                last_line = Instant::now();
            }
            None => {}
        }
        if open == 0 || Instant::now() > deadline {
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    let elapsed = started.elapsed();
    stop.cancel();
    running.await.context("engine task")??;
    Ok(elapsed)
}

async fn write_next_steps(
    args: &DemoArgs,
    store: &Store,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let dead_row = dead_row_id(store).await?;
    writeln!(out)?;
    writeln!(
        out,
        "Next, try (the demo's database stays in {}):",
        args.db.display()
    )?;
    let env = format!("DATABASE_URL=sqlite://{}", args.db.display());
    writeln!(
        out,
        "  {env} cargo run --release -- status     # exits 3 while dead rows exist, by design"
    )?;
    if let Some(id) = dead_row {
        writeln!(out, "  {env} cargo run --release -- inspect {id}")?;
    }
    writeln!(
        out,
        "  {env} cargo run --release -- replay --error-code not_found --dry-run"
    )?;
    writeln!(
        out,
        "  {env} cargo run --release -- rows --state dead --csv     # export them for whoever owns the data"
    )?;
    writeln!(
        out,
        "  cargo run --release -- simulate --help     # the simulator and its fault flags"
    )?;
    Ok(())
}

/// The live progress line on a terminal: a bar, synced/total and what the engine is doing.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stdout(),
    );
    // The template is a constant: it parses, and if it ever did not the default style is fine.
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("  [{bar:24}] synced {pos}/{len} · {msg}")
    {
        bar.set_style(style.progress_chars("#>."));
    }
    bar
}

async fn dead_row_id(store: &Store) -> anyhow::Result<Option<i64>> {
    let view = ops::replay::preview(
        store,
        &ops::replay::ReplayFilter {
            all: true,
            ..Default::default()
        },
        1,
    )
    .await?;
    Ok(view.sample.first().map(|c| c.id))
}

/// Checks the guarantees on what the simulator saw: every contact that was not refused ends at
/// its last change, every contact's changes were applied in order, and none twice.
fn verify(
    s: &Sample,
    sim: &crate::sim::SimHandle,
    report: &ops::status::StatusReport,
) -> anyhow::Result<String> {
    let unfinished: i64 = ["pending", "in_flight", "retrying"]
        .iter()
        .map(|k| report.rows.get(*k).copied().unwrap_or(0))
        .sum();
    let mut expected: HashMap<Uuid, Map<String, Value>> = HashMap::new();
    for c in &s.changes {
        let patch: Value = serde_json::from_str(&c.patch)?;
        if let Some(Value::Object(d)) = patch.get("default") {
            let entry = expected.entry(c.record_id).or_default();
            for (k, v) in d {
                entry.insert(k.clone(), v.clone());
            }
        }
    }
    let mut wrong = 0;
    let mut checked = 0;
    for (id, want) in &expected {
        if s.refused.contains_key(id) || *id == s.poison {
            continue;
        }
        checked += 1;
        let got = sim.record(crate::sim::ObjectType::Contact, *id);
        let got_default = got
            .as_ref()
            .and_then(|r| r.get("default"))
            .cloned()
            .unwrap_or(Value::Null);
        if got_default != Value::Object(want.clone()) {
            wrong += 1;
        }
    }
    let mut last_revision: HashMap<Uuid, i64> = HashMap::new();
    let (mut out_of_order, mut twice) = (0, 0);
    for change in sim.applied_log() {
        let revision = change
            .item
            .pointer("/default/revision")
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        match last_revision.insert(change.record_id, revision) {
            Some(prev) if prev == revision => twice += 1,
            Some(prev) if prev > revision => out_of_order += 1,
            _ => {}
        }
    }
    Ok(format!(
        "checked against the simulator: {checked} contacts at their last change ({wrong} wrong), {out_of_order} applied out of order, {twice} applied twice, {unfinished} rows unfinished"
    ))
}
