//! The outbox stores: one interface, two engines (SQLite, Postgres), each with SQL written for
//! it. The engine talks only to [`Store`].
//!
//! The algorithms are written once, over the private `dialect::Dialect` trait that each engine
//! implements with its statements (River's driver split): `claim.rs` (claim rows, plan and store
//! their batches), `record.rs` (a group of batch ends, in rounds, fenced per batch) and
//! `lease.rs` (lease stored batches and read them back). `sqlite.rs` and `postgres.rs` hold the
//! statements, connection set-up and migrations.
//!
//! **Architecture invariants**
//! - A batch (key + exact bytes + its rows) is committed before its first send: claiming rows and
//!   storing their batch happen in one transaction.
//! - Every write about a batch's outcome is fenced on the batch still being `open` and leased to
//!   the writer ("set state if running"), in the same transaction as the row updates.
//! - Times (`now()`) come from the database's clock, never the host's.

mod claim;
mod controls;
mod dialect;
pub mod fleet;
mod lease;
mod ops_api;
mod postgres;
mod record;
mod sqlite;
pub mod views;

use std::time::Duration;

use uuid::Uuid;

use crate::batch::{BatchItem, NewBatch, PlanLimits, TeamSet};
use crate::model::{ObjectType, Operation, RowState};
use crate::settings::DatabaseSettings;

pub use controls::{
    HistoryAttempt, HistoryBatch, HistoryChange, KeptResponse, Pause, PauseTarget, RecordHistory,
    StoredResponse,
};
pub use ops_api::{OpsTx, RawPool};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite://FILE?mode=rwc or postgres://…")]
    UnsupportedUrl(String),
    #[error("stored batch {batch} is corrupt: {reason}")]
    CorruptBatch { batch: Uuid, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// The database refused the statement for what it holds (a constraint, an encoding, a
    /// value out of range): running it again cannot succeed. Anything else (connection lost,
    /// pool exhausted, SQLite busy, a Postgres serialization failure or shutdown) may pass.
    pub fn is_refused_write(&self) -> bool {
        let StoreError::Db(sqlx::Error::Database(e)) = self else {
            return false;
        };
        let code = e.code();
        let code = code.as_deref().unwrap_or("");
        // SQLite: BUSY and LOCKED (and their extended codes: the low byte is the primary).
        if let Ok(n) = code.parse::<u32>() {
            return !matches!(n & 0xff, 5 | 6);
        }
        // Postgres SQLSTATE classes that pass: connection (08), transaction rollback (40),
        // insufficient resources (53), operator intervention such as a shutdown (57).
        !matches!(code.get(..2), Some("08" | "40" | "53" | "57"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One claim lane: the waiting rows of one team and object type, walked in `id` order through
/// the `prism_outbox_lane` index. A claim takes from its lanes in turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// As stored in `team_id` (`''`: the configured default team).
    pub team: String,
    pub object_type: ObjectType,
}

impl Lane {
    /// Every lane of these teams (as stored): one per object type.
    pub fn all_of<'t>(teams: impl IntoIterator<Item = &'t str>) -> Vec<Lane> {
        teams
            .into_iter()
            .flat_map(|team| {
                ObjectType::ALL.into_iter().map(move |object_type| Lane {
                    team: team.to_owned(),
                    object_type,
                })
            })
            .collect()
    }
}

/// Lanes as the JSON `[[team, object_type], ...]` SQLite binds.
pub(crate) fn lane_pairs(lanes: &[Lane]) -> String {
    let pairs: Vec<(&str, &str)> = lanes
        .iter()
        .map(|l| (l.team.as_str(), l.object_type.as_str()))
        .collect();
    serde_json::to_string(&pairs).expect("serialises")
}

/// What a claim may take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub owner: &'a str,
    pub lease: Duration,
    /// Rows to claim at most (heads; coalesced followers come on top).
    pub max_records: usize,
    pub limits: PlanLimits,
    /// The lanes to take from (a paused team's lanes are left out).
    pub lanes: &'a [Lane],
    /// The `team_id` values that can be sent at all.
    pub teams: &'a TeamSet,
    /// The request bytes the claim may take per team ([`crate::batch::fit_budget`]); `None`:
    /// only `max_records` limits it.
    pub max_bytes: Option<&'a crate::batch::ByteBudget>,
    /// Also take rows outside every known lane (an unknown team or object type), so that they
    /// go dead with a clear code instead of waiting forever. A scan of every waiting row: the
    /// engine asks for it now and then, not on every claim.
    pub strays: bool,
}

impl ClaimRequest<'_> {
    /// The object types every lane may hold, as stored.
    pub fn known_types() -> Vec<&'static str> {
        ObjectType::ALL.iter().map(|t| t.as_str()).collect()
    }
}

/// Which stored batches to lease for a (re)send.
#[derive(Debug, Clone, Copy)]
pub struct DueRequest<'a> {
    pub owner: &'a str,
    pub lease: Duration,
    pub limit: usize,
    /// Only batches of these teams (as stored): a team whose key is refused, or whose buffer
    /// is full, waits.
    pub teams: &'a [String],
    /// But not batches of these lanes (paused by an operator).
    pub skip_lanes: &'a [Lane],
}

/// A batch stored and leased to us, ready to send.
#[derive(Debug, Clone)]
pub struct LeasedBatch {
    pub id: Uuid,
    pub idempotency_key: String,
    /// As stored (`''`: the configured default team).
    pub team: String,
    pub object_type: ObjectType,
    pub operation: Operation,
    pub body: bytes::Bytes,
    pub items: Vec<BatchItem>,
    /// Same-key sends already recorded.
    pub attempts: i32,
    /// How long ago the key was first stored (the server forgets it after 24 h).
    pub key_age: Duration,
    /// The API answered 2xx under this key at least once (with a body that could not be read):
    /// it applied the request, so the key is never released to new keys.
    pub answered: bool,
    /// How long ago the batch's oldest row was first put in flight (`retry.give_up_after`
    /// counts from it), as of `leased_at`. Zero for a batch claimed just now.
    pub oldest_row_age: Duration,
    /// When this process leased it.
    pub leased_at: std::time::Instant,
}

impl LeasedBatch {
    pub fn fresh(b: NewBatch) -> LeasedBatch {
        LeasedBatch {
            id: b.id,
            idempotency_key: b.idempotency_key,
            team: b.team,
            object_type: b.object_type,
            operation: b.operation,
            body: b.body.into(),
            items: b.items,
            attempts: 0,
            key_age: Duration::ZERO,
            answered: false,
            oldest_row_age: Duration::ZERO,
            leased_at: std::time::Instant::now(),
        }
    }

    /// How long ago the batch's oldest row was first tried, now.
    pub fn oldest_row_age(&self) -> Duration {
        self.oldest_row_age + self.leased_at.elapsed()
    }

    pub fn row_count(&self) -> usize {
        self.items.iter().map(|i| i.rows.len()).sum()
    }

    pub fn shape(&self) -> crate::batch::BatchShape<'_> {
        crate::batch::BatchShape {
            team: &self.team,
            object_type: self.object_type,
            operation: self.operation,
        }
    }
}

#[derive(Debug, Default)]
pub struct ClaimOutcome {
    pub batches: Vec<LeasedBatch>,
    /// Rows that went dead at once (malformed).
    pub dead: Vec<crate::batch::DeadRow>,
    /// A claim with a linger ([`Store::claim_filled`]) left the partial tail of a flowing lane
    /// waiting: the soonest any such lane must be looked at again.
    pub lingering: Option<Duration>,
    /// A lane the claim asked for held a row waiting to be claimed (`pending`, or `retrying`
    /// whether due or not), whether or not this claim could take it: it may have been locked
    /// by another claimer, held back by its record's earlier row, or not yet due. False when
    /// every lane asked for was empty (the claimer may then poll less often).
    pub waiting: bool,
}

/// A row's new state after its batch was answered or given up.
#[derive(Debug, Clone, PartialEq)]
pub struct RowUpdate {
    pub id: i64,
    pub state: RowState,
    pub code: Option<String>,
    pub message: Option<String>,
    /// For `Retrying`: seconds from the database's now until the next try.
    pub retry_in: f64,
}

/// The message a row that went dead for `unknown_team` in a stranded batch carries.
pub(crate) const STRANDED_MESSAGE: &str =
    "its batch's team is no longer configured; replay the row once the team is back";

/// The final word on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// Answered; rows take their items' outcomes.
    Done,
    /// Given up under this key; rows go back to be re-batched under new keys.
    Released,
    /// Rejected whole and bisected into children that carry its rows.
    Split,
}

impl BatchEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchEnd::Done => "done",
            BatchEnd::Released => "released",
            BatchEnd::Split => "split",
        }
    }
}

/// One HTTP try, kept for `inspect --batch`.
#[derive(Debug, Clone, Default)]
pub struct AttemptRecord {
    pub http_status: Option<u16>,
    pub outcome: String,
    pub detail: Option<String>,
    pub replay: bool,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct FinishBatch {
    pub batch_id: Uuid,
    pub owner: String,
    pub end: BatchEnd,
    pub rows: Vec<RowUpdate>,
    pub children: Vec<NewBatch>,
    pub lease: Duration,
    pub attempt: AttemptRecord,
    /// `retry.give_up_after`: a row that would go `retrying` but was first tried longer ago
    /// than this goes `dead` instead, with its code (decided in the write, by the database's
    /// clock).
    pub give_up_after: Duration,
}

impl FinishBatch {
    /// This end without any text that came from the API: codes reduced to plain identifiers
    /// (`[a-z0-9_]`), no messages, no attempt detail. Written when the database refused the
    /// end as it was, so that its rows still end.
    pub fn without_texts(&self) -> FinishBatch {
        let plain = |code: &str| {
            let code: String = code
                .chars()
                .map(|c| c.to_ascii_lowercase())
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(MAX_CODE)
                .collect();
            if code.is_empty() {
                "unreadable_code".to_owned()
            } else {
                code
            }
        };
        FinishBatch {
            rows: self
                .rows
                .iter()
                .map(|r| RowUpdate {
                    code: r.code.as_deref().map(plain),
                    message: None,
                    ..r.clone()
                })
                .collect(),
            attempt: AttemptRecord {
                outcome: plain(&self.attempt.outcome),
                detail: None,
                ..self.attempt.clone()
            },
            ..self.clone()
        }
    }

    /// The end of a batch whose every item `owner` saw answered `ok` in a 200: what the
    /// benchmark's bookkeeping loop and the store tests record.
    pub fn all_succeeded(batch: &LeasedBatch, owner: &str) -> FinishBatch {
        FinishBatch {
            batch_id: batch.id,
            owner: owner.to_owned(),
            end: BatchEnd::Done,
            rows: batch
                .items
                .iter()
                .flat_map(|i| i.rows.iter())
                .map(|id| RowUpdate {
                    id: *id,
                    state: RowState::Succeeded,
                    code: None,
                    message: None,
                    retry_in: 0.0,
                })
                .collect(),
            children: Vec::new(),
            lease: Duration::from_secs(60),
            attempt: AttemptRecord {
                http_status: Some(200),
                outcome: "answered".into(),
                ..AttemptRecord::default()
            },
            give_up_after: Duration::from_secs(72 * 3600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeferBatch<'a> {
    pub batch_id: Uuid,
    pub owner: &'a str,
    pub retry_in: Duration,
    /// False for a refused key or a server-requested pause: those burn no attempt.
    pub count_attempt: bool,
    pub attempt: AttemptRecord,
}

/// Numbers sampled for metrics and `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Gauges {
    /// Rows by state, but for `succeeded` (counted apart: [`Store::succeeded_rows`]).
    pub rows_by_state: Vec<(String, i64)>,
    pub dead_by_code: Vec<(String, i64)>,
    pub oldest_pending_age_seconds: f64,
    pub oldest_batch_key_age_seconds: f64,
    pub batches_in_flight: i64,
    pub rows_held_back: i64,
    pub watermark_lag_seconds: f64,
    pub operator_replayed_rows: i64,
}

impl Gauges {
    /// The dead rows' count, from their count by code (one walk of the dead rows, not two).
    pub(crate) fn count_dead(&mut self) {
        let dead: i64 = self.dead_by_code.iter().map(|(_, n)| n).sum();
        self.rows_by_state.push(("dead".to_owned(), dead));
    }
}

/// The outbox, on one of the two engines.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// How often a process checks the lanes' floors for rows below them that no claim reaches
/// ([`Store::audit_floors`]): the check reads each lane's rows below its floor, the whole
/// history kept, so it runs rarely; such a row waits at most this long.
pub const FLOOR_AUDIT_EVERY: Duration = Duration::from_secs(600);

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    pub async fn connect(settings: &DatabaseSettings) -> StoreResult<Store> {
        let url = settings.url.as_str();
        if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::connect(settings).await?))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Store::Postgres(PgStore::connect(settings).await?))
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Whether every migration this binary knows has been applied.
    pub async fn migrations_current(&self) -> StoreResult<bool> {
        dispatch!(self, s => s.migrations_current().await)
    }

    pub async fn ping(&self) -> StoreResult<()> {
        dispatch!(self, s => s.ping().await)
    }

    /// Claims due rows in per-record order, stores their batches and leases them to `owner`,
    /// all in one transaction; malformed rows go dead in the same transaction.
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> StoreResult<ClaimOutcome> {
        self.claim_filled(req, Duration::ZERO).await
    }

    /// [`Store::claim`] with a `linger` (`batch.linger`, see [`crate::linger`]): the partial
    /// tail of a flowing lane is left waiting until its oldest row has been due for `linger`
    /// (the outcome's `lingering` says when to look again); full batches, and lanes that are not
    /// flowing, are claimed at once. A zero linger claims as [`Store::claim`].
    pub async fn claim_filled(
        &self,
        req: &ClaimRequest<'_>,
        linger: Duration,
    ) -> StoreResult<ClaimOutcome> {
        dispatch!(self, s => claim::claim(s, req, linger).await)
    }

    /// Leases stored batches that are due for a (re)send: retries, and batches whose owner's
    /// lease lapsed (it crashed or hung).
    pub async fn lease_due_batches(&self, req: &DueRequest<'_>) -> StoreResult<Vec<LeasedBatch>> {
        dispatch!(self, s => lease::lease_due_batches(s, req).await)
    }

    /// Heartbeat: extends the leases of `batches`, those `owner` is still working on. A batch
    /// it gave up on (its outcome could not be written) is left to lapse, so that it is re-sent.
    pub async fn extend_leases(
        &self,
        owner: &str,
        lease: Duration,
        batches: &[Uuid],
    ) -> StoreResult<u64> {
        dispatch!(self, s => s.extend_leases(owner, lease, batches).await)
    }

    /// Gives up `owner`'s leases at once (clean shutdown), so a restart need not wait.
    pub async fn drop_leases(&self, owner: &str) -> StoreResult<u64> {
        dispatch!(self, s => s.drop_leases(owner).await)
    }

    /// Ends a batch with its rows' new states (and any children), fenced on our lease.
    /// `false` when the batch is no longer ours: nothing was written.
    pub async fn finish_batch(&self, f: &FinishBatch) -> StoreResult<bool> {
        Ok(self
            .finish_batches(std::slice::from_ref(f))
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// [`Store::finish_batch`] for several batches in one transaction (one commit, one fsync):
    /// each batch is fenced on its own; the result says, per batch, whether it was written.
    pub async fn finish_batches(&self, batches: &[FinishBatch]) -> StoreResult<Vec<bool>> {
        dispatch!(self, s => record::finish_batches(s, batches).await)
    }

    /// Puts a batch back to wait (same key, same bytes), fenced on our lease.
    pub async fn defer_batch(&self, d: &DeferBatch<'_>) -> StoreResult<bool> {
        dispatch!(self, s => s.defer_batch(d).await)
    }

    /// Ends the open batches of teams that are no longer configured (their lease lapsed, so no
    /// live process of the old configuration still holds them): nothing can send them, and
    /// their rows would stay `in_flight`, blocking their records, for ever. The rows go `dead`
    /// as `unknown_team` (an operator can replay them once the team is back); the batches end
    /// `released`. Returns how many rows went dead.
    pub async fn end_stranded_batches(&self, teams: &TeamSet) -> StoreResult<u64> {
        dispatch!(self, s => s.end_stranded_batches(teams).await)
    }

    pub async fn gauges(&self) -> StoreResult<Gauges> {
        dispatch!(self, s => s.gauges().await)
    }

    /// Postgres: moves a lane's floor back under any row below it that no claim can reach (a
    /// row that arrived out of id order: restored, copied by logical replication, or moved
    /// into the lane by an `UPDATE`), at most once every [`FLOOR_AUDIT_EVERY`] per process;
    /// returns how many lanes it moved back. It also deletes the claim rows left by outbox
    /// rows deleted outside prism-sync. SQLite has no floors: 0.
    pub async fn audit_floors(&self) -> StoreResult<u64> {
        match self {
            Store::Sqlite(_) => Ok(0),
            Store::Postgres(s) => s.audit_floors(FLOOR_AUDIT_EVERY).await,
        }
    }

    /// The succeeded rows kept. Unlike [`Store::gauges`], which walks only unfinished and dead
    /// rows, this reads the whole outbox, so the gauge sampler runs it on a budget of its own
    /// (`telemetry::next_full_count`). One statement for both engines.
    pub async fn succeeded_rows(&self) -> StoreResult<i64> {
        const SUCCEEDED: &str = "SELECT count(*) FROM prism_outbox_rows WHERE state = 'succeeded'";
        dispatch!(self, s => Ok(sqlx::query_scalar(SUCCEEDED).fetch_one(s.pool()).await?))
    }
}

/// `(text, count)` pairs, such as counts by state or by error code, from either engine.
pub(crate) fn text_counts<'r, R>(rows: &'r [R]) -> Result<Vec<(String, i64)>, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// A database URL with its secrets replaced, for messages: the user-info's password and the
/// value of every query parameter that can carry one (libpq's `password` and `sslpassword`, and
/// anything named like a secret). A URL that does not parse is redacted as text, so that a typo
/// cannot put a password into an error or a log line either.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if let Some(query) = u.query().map(redact_query) {
                u.set_query(Some(&query));
            }
            u.to_string()
        }
        Err(_) => {
            let (head, query) = match url.split_once('?') {
                Some((head, query)) => (head, Some(redact_query(query))),
                None => (url, None),
            };
            let start = head.find("://").map_or(0, |i| i + 3);
            let head = match head[start..].rfind('@').map(|at| start + at) {
                Some(at) => match head[start..at].find(':') {
                    Some(colon) => format!("{}:***{}", &head[..start + colon], &head[at..]),
                    None => head.to_owned(),
                },
                None => head.to_owned(),
            };
            match query {
                Some(query) => format!("{head}?{query}"),
                None => head,
            }
        }
    }
}

/// A query string with the value of every secret-looking parameter replaced by `***`.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_param(key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `password`, `sslpassword`, `db_pass`, `pwd`, `auth_token`, `secret`, `api_key`, … in any
/// case or percent-encoding: over-redacting a harmless parameter costs nothing.
fn is_secret_param(key: &str) -> bool {
    let key: String = url::form_urlencoded::parse(key.as_bytes())
        .map(|(k, _)| k.to_lowercase())
        .collect();
    ["pass", "pwd", "secret", "token", "key"]
        .iter()
        .any(|word| key.contains(word))
}

/// `row updates` as parallel arrays, the shape both engines bind. Codes and messages are
/// [`storable`]: whatever the API sent, the write cannot fail on it.
pub(crate) struct RowColumns {
    pub ids: Vec<i64>,
    pub states: Vec<&'static str>,
    pub codes: Vec<Option<String>>,
    pub messages: Vec<Option<String>>,
    pub retry_in: Vec<f64>,
    /// `retry.give_up_after` of the row's batch end, in seconds.
    pub give_up_after: Vec<f64>,
}

impl RowColumns {
    pub fn of<'r>(rows: impl IntoIterator<Item = (&'r RowUpdate, Duration)>) -> RowColumns {
        let mut c = RowColumns {
            ids: Vec::new(),
            states: Vec::new(),
            codes: Vec::new(),
            messages: Vec::new(),
            retry_in: Vec::new(),
            give_up_after: Vec::new(),
        };
        for (r, give_up_after) in rows {
            c.ids.push(r.id);
            c.states.push(r.state.as_str());
            c.codes
                .push(r.code.as_deref().map(|t| storable(t, MAX_CODE)));
            c.messages
                .push(r.message.as_deref().map(|t| storable(t, MAX_MESSAGE)));
            c.retry_in.push(r.retry_in);
            c.give_up_after
                .push(give_up_after.as_secs_f64().min(GIVE_UP_NEVER));
        }
        c
    }
}

/// A `give_up_after` past any real age (about 3,000 years), so that the SQL's interval
/// arithmetic never overflows.
const GIVE_UP_NEVER: f64 = 1e11;

/// Longest error code stored (codes are identifiers; anything longer is not one).
pub(crate) const MAX_CODE: usize = 100;
/// Longest error message or attempt detail stored.
pub(crate) const MAX_MESSAGE: usize = 1000;

/// Text that came from the API or the network, made safe to store in either database: NUL
/// (which a Postgres `text` cannot hold) and other control characters but tab and newline
/// become U+FFFD, and the text is clipped to `max` bytes on a character boundary. Invalid UTF-8
/// never gets this far (responses are read lossily), so one hostile answer cannot make an
/// outcome write fail.
pub fn storable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max + 3));
    for ch in text.chars() {
        let ch = if ch.is_control() && ch != '\n' && ch != '\t' {
            char::REPLACEMENT_CHARACTER
        } else {
            ch
        };
        if out.len() + ch.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(ch);
    }
    out
}

impl AttemptRecord {
    /// The outcome (a code) and detail as they are stored: see [`storable`].
    pub(crate) fn stored_outcome(&self) -> String {
        storable(&self.outcome, MAX_CODE)
    }

    pub(crate) fn stored_detail(&self) -> Option<String> {
        self.detail.as_deref().map(|d| storable(d, MAX_MESSAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_text_has_no_nul_or_control_characters_and_is_clipped_on_a_char_boundary() {
        assert_eq!(
            storable("a\0b\u{1b}[2J\nc\td", 100),
            "a\u{FFFD}b\u{FFFD}[2J\nc\td"
        );
        let clipped = storable(&"é".repeat(100), 11);
        assert_eq!(clipped, format!("{}…", "é".repeat(5)));
        assert!(storable(&"x".repeat(5000), MAX_MESSAGE).len() <= MAX_MESSAGE + '…'.len_utf8());
    }

    #[test]
    fn without_texts_keeps_outcomes_and_drops_what_the_api_wrote() {
        let f = FinishBatch {
            batch_id: uuid::Uuid::nil(),
            owner: "me".into(),
            end: BatchEnd::Done,
            rows: vec![RowUpdate {
                id: 1,
                state: RowState::Dead,
                code: Some("Bad\0Code!".into()),
                message: Some("hostile".into()),
                retry_in: 0.0,
            }],
            children: Vec::new(),
            lease: Duration::from_secs(1),
            attempt: AttemptRecord {
                outcome: "\0".into(),
                detail: Some("x".into()),
                ..AttemptRecord::default()
            },
            give_up_after: Duration::from_secs(1),
        };
        let plain = f.without_texts();
        assert_eq!(plain.rows[0].code.as_deref(), Some("badcode"));
        assert_eq!(plain.rows[0].message, None);
        assert_eq!(plain.rows[0].state, RowState::Dead);
        assert_eq!(plain.attempt.outcome, "unreadable_code");
        assert_eq!(plain.attempt.detail, None);
    }

    #[test]
    fn redact_url_hides_the_user_infos_password_and_secret_query_parameters() {
        let shown = redact_url(
            "postgres://app:s3cret-a@db.internal:5432/outbox?sslmode=require&password=s3cret-b&sslpassword=s3cret-c&PassWord=s3cret-d&pass%77ord=s3cret-e",
        );
        for secret in ["s3cret-a", "s3cret-b", "s3cret-c", "s3cret-d", "s3cret-e"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("app:***@db.internal:5432/outbox"), "{shown}");
        assert!(
            shown.contains("sslmode=require"),
            "harmless parameters stay: {shown}"
        );
        assert!(shown.contains("sslpassword=***"), "{shown}");
    }

    #[test]
    fn redact_url_hides_secrets_in_a_url_that_does_not_parse() {
        // A port that is not a number: `url` refuses it, the message must still not leak.
        let shown = redact_url("postgres://app:s3cret-a@db:port/outbox?password=s3cret-b");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown, "postgres://app:***@db:port/outbox?password=***");
    }

    #[test]
    fn redact_url_leaves_a_url_without_secrets_as_it_was() {
        assert_eq!(
            redact_url("sqlite://prism-sync.db?mode=rwc"),
            "sqlite://prism-sync.db?mode=rwc"
        );
        assert_eq!(redact_url("prism-sync.db"), "prism-sync.db");
    }
}
