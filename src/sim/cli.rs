//! `prism-sync simulate`: the simulator as a command, with faults from a profile file and/or flags.
//!
//! Flags override the file field by field, so a saved profile can be varied from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{DEFAULT_API_KEY, DEFAULT_TEAM_ID, FaultProfile, SimConfig, SimTeam, Simulator};

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// The API key clients must send in `x-api-key`.
    #[arg(long, env = "MICRO_API_KEY", default_value = DEFAULT_API_KEY, hide_env_values = true)]
    pub api_key: String,
    /// The primary team id (the one `/_sim/` endpoints mean when they name none); teams the simulator
    /// does not know get 404.
    #[arg(long = "team", env = "MICRO_TEAM_ID", default_value = DEFAULT_TEAM_ID)]
    pub team: String,
    /// `TEAM_ID=API_KEY`: another team and the key that opens it, and only it (repeatable).
    #[arg(long = "extra-team", value_name = "TEAM_ID=API_KEY", value_parser = parse_team)]
    pub extra_teams: Vec<SimTeam>,
    /// Seed for every random fault decision.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How long responses are replayed under their Idempotency-Key (e.g. `24h`, `30s`).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,
    /// Unknown record ids are `not_found` instead of existing implicitly (seed them via /_sim/records).
    #[arg(long)]
    pub strict_records: bool,
    /// Fault profile file: TOML if it ends in `.toml`, JSON otherwise. Flags below override it.
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,
    /// Rate of whole requests answered 500.
    #[arg(long, value_name = "RATE")]
    pub error_rate: Option<f64>,
    /// Rate of whole requests answered 503.
    #[arg(
        long = "error-503-rate",
        alias = "unavailable-rate",
        value_name = "RATE"
    )]
    pub error_503_rate: Option<f64>,
    /// Rate of whole requests answered 429.
    #[arg(long, value_name = "RATE")]
    pub rate_limit_rate: Option<f64>,
    /// `retry-after` seconds on injected 429/503.
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u64>,
    /// `retry-after-ms` on injected 429/503.
    #[arg(long, value_name = "MS")]
    pub retry_after_ms: Option<u64>,
    /// `x-should-retry` on injected 500/503/429.
    #[arg(long, value_name = "BOOL")]
    pub should_retry: Option<bool>,
    /// Fixed latency added to every request (e.g. `20ms`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
    /// Random extra latency, uniformly in 0..JITTER.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency_jitter: Option<Duration>,
    /// Rate of requests whose work takes --slow-work longer while their idempotency key is held
    /// (a re-send meanwhile is answered 409 idempotency_key_in_use).
    #[arg(long, value_name = "RATE")]
    pub slow_work_rate: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub slow_work: Option<Duration>,
    /// Rate of responses held back (after the work is done) for --slow-response.
    #[arg(long, value_name = "RATE")]
    pub slow_response_rate: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub slow_response: Option<Duration>,
    /// Rate of connections dropped after the items were applied.
    #[arg(long, value_name = "RATE")]
    pub drop_after_apply_rate: Option<f64>,
    /// Rate of 200 bodies cut mid-JSON on the wire.
    #[arg(long, value_name = "RATE")]
    pub truncated_body_rate: Option<f64>,
    /// Rate of 200 bodies that are not JSON on the wire.
    #[arg(long, value_name = "RATE")]
    pub non_json_body_rate: Option<f64>,
    /// Rate of 200s that omit some results (the omitted items are not applied).
    #[arg(long, value_name = "RATE")]
    pub missing_results_rate: Option<f64>,
    /// Rate of 200s with one result sent twice.
    #[arg(long, value_name = "RATE")]
    pub duplicate_result_rate: Option<f64>,
    /// Rate of 200s with a result for an id that was not sent.
    #[arg(long, value_name = "RATE")]
    pub unknown_result_id_rate: Option<f64>,
    /// Rate of 200s whose summary disagrees with the results.
    #[arg(long, value_name = "RATE")]
    pub wrong_summary_rate: Option<f64>,
    /// Rate of items failed with a code from --item-error-code.
    #[arg(long, value_name = "RATE")]
    pub item_error_rate: Option<f64>,
    /// Code for --item-error-rate (repeatable; default rate_limited, internal_error, validation_error).
    #[arg(long = "item-error-code", value_name = "CODE")]
    pub item_error_codes: Vec<String>,
    /// `ID=CODE`: this record id always fails with CODE (repeatable).
    #[arg(long = "item-error-for", value_name = "ID=CODE", value_parser = parse_id_code)]
    pub item_errors_for_ids: Vec<(String, String)>,
    /// A record id that makes its whole batch fail with --poison-status (repeatable).
    #[arg(long = "poison-id", value_name = "ID")]
    pub poison_ids: Vec<String>,
    /// Status for poisoned batches (400 by default; 413 and 422 are the usual others).
    #[arg(long, value_name = "STATUS")]
    pub poison_status: Option<u16>,
    /// Injected item errors carry a NUL, an escape sequence and bytes that are not UTF-8.
    #[arg(long)]
    pub hostile_messages: bool,
    /// A record id whose 200s are always padded past the client's response cap (repeatable).
    #[arg(long = "oversized-answer-id", value_name = "ID")]
    pub oversized_answer_ids: Vec<String>,
}

fn parse_id_code(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(id, code)| (id.to_owned(), code.to_owned()))
        .filter(|(id, code)| !id.is_empty() && !code.is_empty())
        .ok_or_else(|| format!("expected ID=CODE, got {text:?}"))
}

fn parse_team(text: &str) -> Result<SimTeam, String> {
    text.split_once('=')
        .filter(|(team, key)| !team.is_empty() && !key.is_empty())
        .map(|(team, key)| SimTeam {
            team_id: team.to_owned(),
            api_key: key.to_owned(),
        })
        .ok_or_else(|| "expected TEAM_ID=API_KEY".to_owned())
}

impl SimulateArgs {
    /// The profile file (if any) with the flags laid over it.
    pub fn fault_profile(&self) -> anyhow::Result<FaultProfile> {
        let mut p = match &self.faults {
            Some(path) => FaultProfile::from_file(path)?,
            None => FaultProfile::default(),
        };
        let rates = [
            (self.error_rate, &mut p.error_500_rate),
            (self.error_503_rate, &mut p.error_503_rate),
            (self.rate_limit_rate, &mut p.rate_limit_rate),
            (self.slow_work_rate, &mut p.slow_work_rate),
            (self.slow_response_rate, &mut p.slow_response_rate),
            (self.drop_after_apply_rate, &mut p.drop_after_apply_rate),
            (self.truncated_body_rate, &mut p.truncated_body_rate),
            (self.non_json_body_rate, &mut p.non_json_body_rate),
            (self.missing_results_rate, &mut p.missing_results_rate),
            (self.duplicate_result_rate, &mut p.duplicate_result_rate),
            (self.unknown_result_id_rate, &mut p.unknown_result_id_rate),
            (self.wrong_summary_rate, &mut p.wrong_summary_rate),
            (self.item_error_rate, &mut p.item_error_rate),
        ];
        for (flag, field) in rates {
            if let Some(rate) = flag {
                *field = rate;
            }
        }
        let durations = [
            (self.latency, &mut p.latency),
            (self.latency_jitter, &mut p.latency_jitter),
            (self.slow_work, &mut p.slow_work),
            (self.slow_response, &mut p.slow_response),
        ];
        for (flag, field) in durations {
            if let Some(duration) = flag {
                *field = duration;
            }
        }
        p.retry_after = self.retry_after.or(p.retry_after);
        p.retry_after_ms = self.retry_after_ms.or(p.retry_after_ms);
        p.should_retry = self.should_retry.or(p.should_retry);
        if !self.item_error_codes.is_empty() {
            p.item_error_codes = self.item_error_codes.clone();
        }
        p.item_errors_for_ids
            .extend(self.item_errors_for_ids.iter().cloned());
        p.poison_ids.extend(self.poison_ids.iter().cloned());
        p.hostile_messages |= self.hostile_messages;
        p.oversized_answer_ids
            .extend(self.oversized_answer_ids.iter().cloned());
        if let Some(status) = self.poison_status {
            p.poison_status = status;
        }
        p.validate()?;
        Ok(p)
    }

    pub fn sim_config(&self) -> anyhow::Result<SimConfig> {
        Ok(SimConfig {
            api_key: self.api_key.clone(),
            team_id: self.team.clone(),
            extra_teams: self.extra_teams.clone(),
            implicit_records: !self.strict_records,
            idempotency_ttl: self.idempotency_ttl,
            faults: self.fault_profile()?,
            seed: self.seed,
        })
    }
}

/// Serves the simulator until `shutdown` is cancelled. Prints one line with the base URL on stdout
/// (`prism-sync simulator listening on http://ADDR team TEAM`, plus ` extra teams T2,T3` when there
/// are any) so that scripts can wait for it.
pub async fn run_simulate(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.sim_config()?;
    let mut team = config.team_id.clone();
    if !config.extra_teams.is_empty() {
        let extra: Vec<&str> = config
            .extra_teams
            .iter()
            .map(|extra| extra.team_id.as_str())
            .collect();
        team = format!("{team} extra teams {}", extra.join(","));
    }
    let quiet = config.faults.is_quiet();
    let handle = Simulator::start(config, args.listen)
        .await
        .with_context(|| format!("starting the simulator on {}", args.listen))?;
    println!(
        "prism-sync simulator listening on {} team {team}",
        handle.base_url()
    );
    if !quiet {
        tracing::info!(faults = ?handle.faults(), "simulator faults enabled");
    }
    shutdown.cancelled().await;
    handle.shutdown().await;
    Ok(())
}
