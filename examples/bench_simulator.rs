//! Benchmark of the simulator alone: N concurrent connections send 100-item batches, each under a
//! fresh Idempotency-Key, for a fixed time; prints requests/s and items/s.
//!
//! `cargo run --release --example bench_simulator -- --connections 16 --seconds 5`
//! (`--url URL --api-key K --team T` benchmarks a simulator that is already running instead).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use prism_sync::sim::{SimConfig, Simulator};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Concurrent connections (one request in flight on each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// How long to measure, after a short warm-up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Items per request.
    #[arg(long, default_value_t = 100)]
    items: usize,
    /// A running simulator's base URL; without it one is started in this process (own threads).
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value = prism_sync::sim::DEFAULT_API_KEY)]
    api_key: String,
    #[arg(long, default_value = prism_sync::sim::DEFAULT_TEAM_ID)]
    team: String,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    latency_micros: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The simulator gets a runtime of its own so the client's work does not run on its workers;
    // both still share this machine's cores, as the daemon and the simulator will.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("simulator")
        .enable_all()
        .build()?;
    let (base_url, handle) = match &args.url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let config = SimConfig {
                api_key: args.api_key.clone(),
                team_id: args.team.clone(),
                ..SimConfig::default()
            };
            let handle = server_runtime
                .block_on(Simulator::start(config, "127.0.0.1:0".parse()?))
                .context("starting the simulator")?;
            (handle.base_url(), Some(handle))
        }
    };
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    client_runtime.block_on(drive(&args, &base_url))?;
    if let Some(handle) = handle {
        let stats = handle.stats();
        println!(
            "simulator: {} requests, {} items applied, {} replays",
            stats.requests_total, stats.items_applied, stats.replays
        );
        server_runtime.block_on(handle.shutdown());
    }
    Ok(())
}

async fn drive(args: &Args, base_url: &str) -> anyhow::Result<()> {
    let url = format!("{base_url}/v2/prism/{}/contact/batch/update", args.team);
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Bodies are built up front so that the client spends its CPU on HTTP, not on JSON.
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..64).map(|_| batch_body(args.items)).collect());
    let counts = Arc::new(Counts::default());
    let warm_up = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let connections = args.connections;
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let (client, url, bodies, counts) =
            (client.clone(), url.clone(), bodies.clone(), counts.clone());
        let api_key = args.api_key.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = connection;
            loop {
                let elapsed = start.elapsed();
                if elapsed >= warm_up + measure {
                    break;
                }
                let counted = elapsed >= warm_up;
                let sent = Instant::now();
                let outcome = client
                    .post(&url)
                    .header("x-api-key", &api_key)
                    .header("content-type", "application/json")
                    .header("Idempotency-Key", Uuid::new_v4().to_string())
                    .body(bodies[n % bodies.len()].clone())
                    .send()
                    .await;
                let ok = match outcome {
                    Ok(response) => {
                        let status = response.status();
                        response.bytes().await.is_ok() && status.is_success()
                    }
                    Err(_) => false,
                };
                if counted && start.elapsed() <= warm_up + measure {
                    let counter = if ok { &counts.ok } else { &counts.failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    counts.latency_micros.fetch_add(micros, Ordering::Relaxed);
                }
                n += connections;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let ok = counts.ok.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let secs = measure.as_secs_f64();
    let mean_ms =
        counts.latency_micros.load(Ordering::Relaxed) as f64 / (ok + failed).max(1) as f64 / 1000.0;
    println!(
        "{} connections, {} items per request, {:.1} s: {:.0} requests/s, {:.0} items/s, {} failed, mean latency {:.2} ms",
        args.connections,
        args.items,
        secs,
        ok as f64 / secs,
        (ok * args.items as u64) as f64 / secs,
        failed,
        mean_ms
    );
    Ok(())
}

fn batch_body(items: usize) -> Bytes {
    let items: Vec<serde_json::Value> = (0..items)
        .map(|i| {
            serde_json::json!({
                "id": Uuid::new_v4().to_string(),
                "default": {"email": format!("user{i}@example.com"), "score": i, "plan": "pro"}
            })
        })
        .collect();
    Bytes::from(serde_json::to_vec(&serde_json::json!({ "items": items })).unwrap_or_default())
}
