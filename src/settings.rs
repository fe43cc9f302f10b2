//! Typed, layered settings: built-in defaults < `config/default.toml` or `--config FILE` <
//! `PRISM_SYNC__SECTION__KEY` environment variables < the well-known `DATABASE_URL`,
//! `MICRO_API_KEY`, `MICRO_TEAM_ID`, `MICRO_BASE_URL`.
//!
//! The API key lives in a [`SecretString`] from the moment it is read, so it cannot reach a log
//! line or a `Debug` print by accident.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://prism-sync.db?mode=rwc";
pub const DEFAULT_BASE_URL: &str = "https://developers.micro.so";
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";
/// The API takes at most this many items per request.
pub const MAX_BATCH_SIZE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("reading the API key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub micro: MicroSettings,
    pub http: HttpSettings,
    pub batch: BatchSettings,
    pub sync: SyncSettings,
    pub poll: PollSettings,
    pub retry: RetrySettings,
    pub auth: AuthSettings,
    pub shutdown: ShutdownSettings,
    pub telemetry: TelemetrySettings,
    pub log: LogSettings,
    pub retention: RetentionSettings,
    pub history: HistorySettings,
    pub fleet: FleetSettings,
    /// More Micro teams, keyed by team id: rows whose `team_id` names one go to that team with
    /// its own key, concurrency and rate limit. `micro.*` is the default team (`team_id = ''`).
    pub teams: BTreeMap<String, TeamSettings>,
}

/// One extra team (`[teams."<team id>"]`). Unset limits inherit `sync.max_in_flight` and
/// `http.max_requests_per_second`.
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TeamSettings {
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    pub max_in_flight: Option<usize>,
    pub max_requests_per_second: Option<f64>,
}

impl std::fmt::Debug for TeamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamSettings")
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("api_key_file", &self.api_key_file)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_requests_per_second", &self.max_requests_per_second)
            .finish()
    }
}

impl TeamSettings {
    /// The key from `api_key`, else from `api_key_file`.
    pub fn resolve_api_key(&self) -> Result<Option<SecretString>, SettingsError> {
        resolve_key(self.api_key.as_ref(), self.api_key_file.as_deref())
    }

    /// The key file the key is read from (none when a key is given inline, which wins).
    pub fn key_file_in_use(&self) -> Option<&Path> {
        key_file_in_use(self.api_key.as_ref(), self.api_key_file.as_deref())
    }
}

fn key_file_in_use<'a>(key: Option<&SecretString>, file: Option<&'a Path>) -> Option<&'a Path> {
    match key {
        Some(key) if !key.expose_secret().is_empty() => None,
        _ => file,
    }
}

/// A key given inline wins over a key file (trailing newline trimmed).
fn resolve_key(
    key: Option<&SecretString>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, SettingsError> {
    if let Some(key) = key
        && !key.expose_secret().is_empty()
    {
        return Ok(Some(key.clone()));
    }
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| SettingsError::KeyFile {
                path: path.to_owned(),
                source,
            })?;
            Ok(Some(SecretString::from(text.trim().to_owned())))
        }
        None => Ok(None),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://FILE?mode=rwc` or `postgres://…`; `DATABASE_URL` overrides it.
    pub url: String,
    pub max_connections: u32,
    /// How long a statement may wait for SQLite's write lock (another process or connection).
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_DATABASE_URL.into(),
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MicroSettings {
    pub base_url: String,
    pub team_id: String,
    /// Prefer `api_key_file` (a mounted secret) or `MICRO_API_KEY`; never logged.
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
}

impl Default for MicroSettings {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.into(),
            team_id: String::new(),
            api_key: None,
            api_key_file: None,
        }
    }
}

impl std::fmt::Debug for MicroSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroSettings")
            .field("base_url", &self.base_url)
            .field("team_id", &self.team_id)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("api_key_file", &self.api_key_file)
            .finish()
    }
}

impl MicroSettings {
    /// The key from `api_key`, else from `api_key_file` (trailing newline trimmed).
    pub fn resolve_api_key(&self) -> Result<Option<SecretString>, SettingsError> {
        resolve_key(self.api_key.as_ref(), self.api_key_file.as_deref())
    }

    /// The key file the key is read from (none when a key is given inline, which wins).
    pub fn key_file_in_use(&self) -> Option<&Path> {
        key_file_in_use(self.api_key.as_ref(), self.api_key_file.as_deref())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Whole-request timeout for one send; leases must outlive it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Responses larger than this are cut off and treated as a failed send.
    pub max_response_bytes: usize,
    /// Cap on a server-requested delay (`retry-after`, `retry-after-ms`).
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Ceiling on requests per second for each team, shared by every replica on the database
    /// (0: none).
    pub max_requests_per_second: f64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 8 * 1024 * 1024,
            max_retry_after: Duration::from_secs(120),
            max_requests_per_second: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Items per request, 1..=100.
    pub size: usize,
    /// Merge consecutive `default`-only changes of one record into one item.
    pub coalesce: bool,
    /// At most this many rows are merged into one item.
    pub max_coalesce: usize,
    /// A patch larger than this (bytes of JSON) goes dead as `patch_too_large`.
    pub max_patch_bytes: usize,
    /// Same-key re-sends of one batch before its items are released to new batches.
    pub max_attempts: u32,
    /// Release an unanswered batch to new keys before the server forgets its key (24 h).
    #[serde(with = "humantime_serde")]
    pub max_key_age: Duration,
    /// How long a flowing lane's partial batch may wait for more rows (see [`crate::linger`]);
    /// zero turns the wait off.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            size: MAX_BATCH_SIZE,
            coalesce: true,
            max_coalesce: 100,
            max_patch_bytes: 256 * 1024,
            max_attempts: 12,
            max_key_age: Duration::from_secs(23 * 3600),
            linger: Duration::from_millis(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    /// Batches on the wire at once (per team); the claimer keeps up to four times as many ready
    /// on Postgres, twice on SQLite.
    pub max_in_flight: usize,
    /// Per team, the request bytes its claimed, ready batches may take in all (the buffer behind
    /// the `max_in_flight` on the wire): a claim takes rows only up to what is free of it, so
    /// large patches make smaller claims instead of holding hundreds of megabytes. At least
    /// `batch.max_patch_bytes`.
    pub max_buffer_bytes: usize,
    /// How long a batch stays ours without a heartbeat; must exceed `http.timeout`.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Claim rounds that may run at once (1..=4); unset: 2 on Postgres, 1 on SQLite (one
    /// writer: its claims take turns anyway). See [`SyncSettings::claims_in_flight_for`].
    pub claims_in_flight: Option<usize>,
}

/// `sync.max_buffer_bytes` when it is unset: 64 MiB per team.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// The most claim rounds `sync.claims_in_flight` may ask for.
pub const MAX_CLAIMS_IN_FLIGHT: usize = 4;

impl SyncSettings {
    /// `sync.claims_in_flight`, or its default for the database: 2 on Postgres (claims of one
    /// process overlap like those of two replicas, `FOR UPDATE SKIP LOCKED`), 1 on SQLite.
    pub fn claims_in_flight_for(&self, postgres: bool) -> usize {
        self.claims_in_flight
            .unwrap_or_else(|| default_claims_in_flight(postgres))
    }
}

/// `sync.claims_in_flight` when it is unset: 2 on Postgres, 1 on SQLite.
pub fn default_claims_in_flight(postgres: bool) -> usize {
    if postgres { 2 } else { 1 }
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 8,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            lease: Duration::from_secs(45),
            claims_in_flight: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollSettings {
    /// How often an idle daemon looks for new rows (Postgres also listens for NOTIFY).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// On Postgres, while the daemon listens for NOTIFY: how far its polling slows down, from
    /// `interval`, doubling with every claim round that finds no row waiting. A NOTIFY (a change
    /// committed), a batch moving on, or a retry or lingering tail coming due wakes it at once.
    /// Below `interval` it counts as `interval` (so a slower `interval` alone still works).
    /// Only while no row waits in the daemon's lanes: a claim that took nothing while rows wait
    /// (locked by another replica's claim, held back by their record's earlier row, a retry
    /// not yet due) keeps the poll at `interval`, since no NOTIFY says when they can be taken
    /// (a replica that waited longer than the others would leave them a fleet's work).
    #[serde(with = "humantime_serde")]
    pub idle_interval: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            idle_interval: Duration::from_secs(1),
        }
    }
}

impl PollSettings {
    /// The longest the claim loop may wait between two turns: the idle interval, or the
    /// interval if that is longer.
    pub fn longest(&self) -> Duration {
        self.interval.max(self.idle_interval)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Tries for a row whose error code is in neither list below, and for rows whose batch keeps
    /// failing; then the row goes dead.
    pub max_attempts: u32,
    /// How long a row may keep failing, from its first attempt: past it, a row that would be
    /// retried again (whatever its code, including the retryable ones and whole-batch
    /// failures such as 5xx, 429 or a refused key) goes `dead` with its last code, so that no
    /// row, and no later change of its record, waits forever.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    pub retryable_codes: Vec<String>,
    pub permanent_codes: Vec<String>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|c| (*c).to_owned()).collect();
        Self {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_attempts: 10,
            give_up_after: Duration::from_secs(72 * 3600),
            retryable_codes: s(&[
                "rate_limited",
                "internal_error",
                "timeout",
                "unavailable",
                "conflict",
                "locked",
                "missing_result",
            ]),
            permanent_codes: s(&[
                "not_found",
                "validation_error",
                "invalid_id",
                "invalid_property",
                "invalid_value",
                "forbidden",
            ]),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// While the API refuses the key, one stored batch is tried this often.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Where `/metrics`, `/livez`, `/healthz` and `/readyz` are served; empty turns it off.
    pub listen: String,
    /// How often row counts and ages are sampled from the database.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Whether batch, item and request metrics carry a `team` label: `auto` (only while at most
    /// 10 teams are configured, so the series count stays bounded), `always` or `never`.
    pub team_label: TeamLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TeamLabel {
    #[default]
    Auto,
    Always,
    Never,
}

impl TeamLabel {
    /// At most this many teams get a label under `auto`.
    pub const AUTO_MAX_TEAMS: usize = 10;

    pub fn enabled(self, teams: usize) -> bool {
        match self {
            TeamLabel::Auto => teams <= TeamLabel::AUTO_MAX_TEAMS,
            TeamLabel::Always => true,
            TeamLabel::Never => false,
        }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            sample_interval: Duration::from_secs(5),
            team_label: TeamLabel::Auto,
        }
    }
}

impl TelemetrySettings {
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        self.listen
            .parse()
            .map(Some)
            .map_err(|e| SettingsError::Invalid {
                key: "telemetry.listen",
                reason: format!(
                    "{:?} is not an address like 127.0.0.1:9464: {e}",
                    self.listen
                ),
            })
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text, coloured on a terminal.
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `prism_sync=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Delete `succeeded` rows older than this (inside `run`); unset keeps them.
    #[serde(with = "humantime_serde")]
    pub succeeded: Option<Duration>,
    /// Delete `dead` rows older than this; unset keeps them.
    #[serde(with = "humantime_serde")]
    pub dead: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            succeeded: None,
            dead: None,
            interval: Duration::from_secs(600),
        }
    }
}

/// `[history]`: what `prism-sync history` can show beyond the outbox and the stored batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// Keep what the API returned for each record answered `ok` (contact data: off by default).
    pub keep_responses: bool,
    /// Kept responses of batches made longer ago than this are deleted (every
    /// `retention.interval`).
    #[serde(with = "humantime_serde")]
    pub response_retention: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            keep_responses: false,
            response_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The replica registry (`prism_replicas`): how often a `run` process says it is alive, and
/// when an entry that stopped saying so is forgotten.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSettings {
    /// One small UPSERT per interval; a replica not seen for three intervals shows as silent.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Entries silent for longer than this are deleted (a replica that crashed or was killed).
    #[serde(with = "humantime_serde")]
    pub forget_after: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            forget_after: Duration::from_secs(3600),
        }
    }
}

impl Settings {
    /// Loads the layers. `file` is `--config`; without it `config/default.toml` is read if present.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (tests pass their own).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut builder = config::Config::builder();
        builder = match file {
            Some(path) => builder.add_source(config::File::from(path).required(true)),
            None => {
                builder.add_source(config::File::with_name(DEFAULT_CONFIG_FILE).required(false))
            }
        };
        let prefixed: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("PRISM_SYNC__"))
            .cloned()
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("PRISM_SYNC")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("retry.retryable_codes")
                .with_list_parse_key("retry.permanent_codes")
                .source(Some(prefixed)),
        );
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Some(url) = lookup("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        if let Some(team) = lookup("MICRO_TEAM_ID") {
            builder = builder.set_override("micro.team_id", team)?;
        }
        if let Some(base) = lookup("MICRO_BASE_URL") {
            builder = builder.set_override("micro.base_url", base)?;
        }
        if let Some(key) = lookup("MICRO_API_KEY") {
            builder = builder.set_override("micro.api_key", key)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, reason: String| Err(SettingsError::Invalid { key, reason });
        if self.batch.size == 0 || self.batch.size > MAX_BATCH_SIZE {
            return invalid(
                "batch.size",
                format!("{} is not within 1..=100", self.batch.size),
            );
        }
        if self.batch.max_coalesce == 0 {
            return invalid("batch.max_coalesce", "must be at least 1".into());
        }
        if self.sync.max_in_flight == 0 {
            return invalid("sync.max_in_flight", "must be at least 1".into());
        }
        if self.sync.max_buffer_bytes < self.batch.max_patch_bytes {
            return invalid(
                "sync.max_buffer_bytes",
                format!(
                    "{} is less than batch.max_patch_bytes ({}): the buffer of claimed batches must hold at least one change of the largest size",
                    self.sync.max_buffer_bytes, self.batch.max_patch_bytes
                ),
            );
        }
        if let Some(n) = self.sync.claims_in_flight
            && !(1..=MAX_CLAIMS_IN_FLIGHT).contains(&n)
        {
            return invalid(
                "sync.claims_in_flight",
                format!(
                    "{n} is not within 1..={MAX_CLAIMS_IN_FLIGHT} (claim rounds at once; unset: 2 on Postgres, 1 on SQLite)"
                ),
            );
        }
        if self.sync.lease < self.http.timeout + Duration::from_secs(5) {
            return invalid(
                "sync.lease",
                format!(
                    "{} must exceed http.timeout ({}) by at least 5s, or a live batch could be taken over and sent twice at once",
                    humantime::format_duration(self.sync.lease),
                    humantime::format_duration(self.http.timeout)
                ),
            );
        }
        if self.retry.base_delay.is_zero() || self.retry.max_delay < self.retry.base_delay {
            return invalid(
                "retry.max_delay",
                "need 0 < retry.base_delay <= retry.max_delay".into(),
            );
        }
        if self.retry.max_attempts == 0 {
            return invalid("retry.max_attempts", "must be at least 1".into());
        }
        if self.retry.give_up_after.is_zero() {
            return invalid(
                "retry.give_up_after",
                "must be above zero (a row is always tried at least once)".into(),
            );
        }
        // Both are read before a batch's first send ("has this key been used up?"): zero would
        // release every new batch unsent, and every row would end dead without a request.
        if self.batch.max_attempts == 0 {
            return invalid(
                "batch.max_attempts",
                "must be at least 1 (sends of one batch under its key)".into(),
            );
        }
        if self.batch.max_key_age.is_zero() {
            return invalid(
                "batch.max_key_age",
                "must be above zero (how long a key is used before its rows go under new keys)"
                    .into(),
            );
        }
        if self.batch.max_key_age >= Duration::from_secs(24 * 3600) {
            return invalid(
                "batch.max_key_age",
                "must stay below the server's 24h key lifetime".into(),
            );
        }
        if self.batch.linger > crate::linger::MAX_LINGER {
            return invalid(
                "batch.linger",
                format!(
                    "{} is longer than {}: a partial batch of a busy lane would wait that long; use 0s to turn the linger off",
                    humantime::format_duration(self.batch.linger),
                    humantime::format_duration(crate::linger::MAX_LINGER)
                ),
            );
        }
        if self.poll.interval.is_zero() {
            return invalid("poll.interval", "must be above zero".into());
        }
        if self.fleet.heartbeat.is_zero() || self.fleet.forget_after < self.fleet.heartbeat * 3 {
            return invalid(
                "fleet.forget_after",
                "need 0 < fleet.heartbeat and fleet.forget_after >= 3 × fleet.heartbeat".into(),
            );
        }
        if !self.http.max_requests_per_second.is_finite() || self.http.max_requests_per_second < 0.0
        {
            return invalid(
                "http.max_requests_per_second",
                "must be a number >= 0 (0: no ceiling)".into(),
            );
        }
        self.validate_base_url()?;
        for team in std::iter::once(&self.micro.team_id).chain(self.teams.keys()) {
            // The team id is one path segment of every request; `.` and `..` would walk out of it
            // (URL parsers resolve them, even percent-encoded).
            if team == "." || team == ".." {
                return invalid("micro.team_id", format!("{team:?} is not a team id"));
            }
        }
        for (team, t) in &self.teams {
            if team.trim().is_empty() || team.trim() != team {
                return invalid(
                    "teams",
                    format!("{team:?} is not a team id (empty, or with spaces around it)"),
                );
            }
            // The command line's `--team default` names the default team (micro.team_id):
            // a team of that id could never be named apart from it.
            if team.eq_ignore_ascii_case("default") {
                return invalid(
                    "teams",
                    format!(
                        "{team:?}: `default` names micro.team_id's team on the command line; give the team its own id"
                    ),
                );
            }
            if t.max_in_flight == Some(0) {
                return invalid(
                    "teams.*.max_in_flight",
                    format!("team {team}: must be at least 1"),
                );
            }
            if t.max_requests_per_second
                .is_some_and(|r| !r.is_finite() || r < 0.0)
            {
                return invalid(
                    "teams.*.max_requests_per_second",
                    format!("team {team}: must be a number >= 0"),
                );
            }
        }
        self.telemetry.listen_addr()?;
        Ok(())
    }
}

impl Settings {
    /// Refuses a `micro.base_url` with user-info (`https://user:pass@host`), without echoing it.
    /// Refused rather than redacted: the API authenticates with `x-api-key` only, reqwest would
    /// send the user-info to it as an extra `Authorization: Basic` credential on every request,
    /// and the URL appears in many places (errors, `Debug`, logs) that would each have to
    /// remember to redact it.
    fn validate_base_url(&self) -> Result<(), SettingsError> {
        let base = &self.micro.base_url;
        let has_user_info = match url::Url::parse(base) {
            Ok(u) => !u.username().is_empty() || u.password().is_some(),
            // Unparsable: any `@` in the authority may be user-info; the client reports the
            // rest ("not a URL") once this check has passed.
            Err(_) => base
                .split_once("://")
                .map_or(base.as_str(), |(_, rest)| rest)
                .split(['/', '?', '#'])
                .next()
                .is_some_and(|authority| authority.contains('@')),
        };
        if has_user_info {
            return Err(SettingsError::Invalid {
                key: "micro.base_url",
                reason: "must not carry user-info (user:password@host); it is not shown here. \
                         The API key goes in MICRO_API_KEY or micro.api_key_file"
                    .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn environment_keys_override_defaults_with_human_durations() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PRISM_SYNC__RETRY__BASE_DELAY", "50ms"),
                ("PRISM_SYNC__BATCH__SIZE", "25"),
                ("PRISM_SYNC__RETRY__PERMANENT_CODES", "not_found,gone"),
                ("DATABASE_URL", "postgres://x/y"),
                ("MICRO_API_KEY", "k-123"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.retry.base_delay, Duration::from_millis(50));
        assert_eq!(s.batch.size, 25);
        assert_eq!(s.retry.permanent_codes, vec!["not_found", "gone"]);
        assert_eq!(s.database.url, "postgres://x/y");
        assert_eq!(
            s.micro.resolve_api_key().unwrap().unwrap().expose_secret(),
            "k-123"
        );
    }

    #[test]
    fn a_batch_limit_of_zero_is_refused_rather_than_ending_every_row_unsent() {
        for (key, name) in [
            ("PRISM_SYNC__BATCH__MAX_ATTEMPTS", "batch.max_attempts"),
            ("PRISM_SYNC__BATCH__MAX_KEY_AGE", "batch.max_key_age"),
        ] {
            let value = if key.ends_with("AGE") { "0s" } else { "0" };
            let e = Settings::load_from(None, env(&[(key, value)])).unwrap_err();
            assert!(e.to_string().contains(name), "{key}: {e}");
        }
    }

    #[test]
    fn a_batch_size_over_one_hundred_is_refused() {
        let err =
            Settings::load_from(None, env(&[("PRISM_SYNC__BATCH__SIZE", "101")])).unwrap_err();
        assert!(err.to_string().contains("batch.size"), "{err}");
    }

    #[test]
    fn batch_linger_defaults_to_300ms_turns_off_with_0s_and_is_refused_past_30s() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.batch.linger, Duration::from_millis(300));
        let s = Settings::load_from(None, env(&[("PRISM_SYNC__BATCH__LINGER", "0s")])).unwrap();
        assert!(s.batch.linger.is_zero());
        let s = Settings::load_from(None, env(&[("PRISM_SYNC__BATCH__LINGER", "30s")])).unwrap();
        assert_eq!(s.batch.linger, Duration::from_secs(30));
        let err =
            Settings::load_from(None, env(&[("PRISM_SYNC__BATCH__LINGER", "31s")])).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("batch.linger") && shown.contains("0s"),
            "{shown}"
        );
        let err =
            Settings::load_from(None, env(&[("PRISM_SYNC__BATCH__LINGER", "soon")])).unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");
    }

    #[test]
    fn max_buffer_bytes_defaults_to_64_mib_and_must_hold_the_largest_patch() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.sync.max_buffer_bytes, 64 * 1024 * 1024);
        let s = Settings::load_from(
            None,
            env(&[("PRISM_SYNC__SYNC__MAX_BUFFER_BYTES", "1048576")]),
        )
        .unwrap();
        assert_eq!(s.sync.max_buffer_bytes, 1 << 20);
        let err = Settings::load_from(
            None,
            env(&[("PRISM_SYNC__SYNC__MAX_BUFFER_BYTES", "100000")]),
        )
        .unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("sync.max_buffer_bytes") && shown.contains("batch.max_patch_bytes"),
            "{shown}"
        );
    }

    #[test]
    fn claims_in_flight_is_within_one_to_four_and_defaults_by_database() {
        for bad in ["0", "5"] {
            let err =
                Settings::load_from(None, env(&[("PRISM_SYNC__SYNC__CLAIMS_IN_FLIGHT", bad)]))
                    .unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains("sync.claims_in_flight"), "{shown}");
            assert!(shown.contains("1..=4"), "{shown}");
        }
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(
            (
                s.sync.claims_in_flight_for(true),
                s.sync.claims_in_flight_for(false)
            ),
            (2, 1)
        );
        let s =
            Settings::load_from(None, env(&[("PRISM_SYNC__SYNC__CLAIMS_IN_FLIGHT", "3")])).unwrap();
        assert_eq!(
            (
                s.sync.claims_in_flight_for(true),
                s.sync.claims_in_flight_for(false)
            ),
            (3, 3)
        );
    }

    #[test]
    fn a_misspelt_key_is_an_error_not_silently_ignored() {
        let err =
            Settings::load_from(None, env(&[("PRISM_SYNC__RETRY__BASE_DELYA", "1s")])).unwrap_err();
        assert!(err.to_string().contains("base_delya"), "{err}");
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let s = Settings::load_from(None, env(&[("MICRO_API_KEY", "super-secret-key")])).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("super-secret-key"), "{shown}");
    }

    #[test]
    fn the_api_key_can_come_from_a_mounted_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "from-file\n").unwrap();
        let s = Settings::load_from(
            None,
            env(&[("PRISM_SYNC__MICRO__API_KEY_FILE", path.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(
            s.micro.resolve_api_key().unwrap().unwrap().expose_secret(),
            "from-file"
        );
    }

    #[test]
    fn a_base_url_with_user_info_is_refused_without_echoing_it() {
        for url in [
            "https://alice:hunter2-secret@developers.micro.so",
            "https://hunter2-secret@developers.micro.so/",
            "https://alice:hunter2-secret@developers.micro.so:notaport",
        ] {
            let err = Settings::load_from(None, env(&[("MICRO_BASE_URL", url)])).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(shown.contains("micro.base_url"), "{shown}");
            assert!(shown.contains("user-info"), "{shown}");
            assert!(!shown.contains("hunter2-secret"), "{url}: {shown}");
        }
        let s = Settings::load_from(None, env(&[("MICRO_BASE_URL", "https://api.example/v")]));
        assert!(s.is_ok(), "a URL without user-info loads: {s:?}");
    }

    #[test]
    fn a_team_called_default_is_refused() {
        for team in ["default", "DEFAULT"] {
            let key = format!("PRISM_SYNC__TEAMS__{team}__API_KEY");
            let err = Settings::load_from(None, env(&[(key.as_str(), "k")])).unwrap_err();
            assert!(
                err.to_string().contains("names micro.team_id"),
                "{team}: {err}"
            );
        }
    }

    #[test]
    fn a_team_id_that_is_a_dot_segment_is_refused() {
        for team in [".", ".."] {
            let err = Settings::load_from(None, env(&[("MICRO_TEAM_ID", team)])).unwrap_err();
            assert!(err.to_string().contains("not a team id"), "{err}");
        }
    }
}
