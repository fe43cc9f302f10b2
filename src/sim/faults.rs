//! Fault profiles: what the simulator should get wrong, and how often.
//!
//! A [`FaultProfile`] is plain data (JSON, TOML, command-line flags, `PUT /_sim/faults`). Every random
//! decision is drawn from one seeded `StdRng` in a fixed order per request, so a sequential client that
//! sends the same requests against the same seed and profile sees the same faults.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Per-item error codes used by `item_error_rate` when the profile names none: one retryable and one
/// permanent code, so that a default run exercises both paths of a client.
pub const DEFAULT_ITEM_ERROR_CODES: [&str; 3] =
    ["rate_limited", "internal_error", "validation_error"];

/// What the simulator does wrong. Every rate is a probability in `0.0..=1.0`, drawn once per request
/// (or per item for `item_error_rate`); the default profile injects nothing.
///
/// Durations are human strings in files and JSON (`"250ms"`, `"2s"`). A profile file
/// (`prism-sync simulate --faults faults.toml`) names only what it changes:
///
/// ```toml
/// rate_limit_rate = 0.05
/// retry_after = 1
/// latency = "5ms"
/// latency_jitter = "20ms"
/// item_error_rate = 0.02
/// item_error_codes = ["rate_limited", "validation_error"]
/// poison_ids = ["182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"]
///
/// [item_errors_for_ids]
/// "282bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e" = "not_found"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultProfile {
    /// Whole request answered `500 internal_error` before anything is applied (not cached).
    pub error_500_rate: f64,
    /// Whole request answered `503 unavailable` before anything is applied (not cached).
    pub error_503_rate: f64,
    /// Whole request answered `429 rate_limited` before anything is applied (not cached).
    pub rate_limit_rate: f64,
    /// `retry-after` (whole seconds) sent with injected 429 and 503 responses.
    pub retry_after: Option<u64>,
    /// `retry-after-ms` sent with injected 429 and 503 responses.
    pub retry_after_ms: Option<u64>,
    /// `x-should-retry` sent with every injected request-level error (500, 503, 429), which the
    /// official SDKs obey over everything else.
    pub should_retry: Option<bool>,
    /// Added to every request past authentication; for a request that carries an idempotency key it
    /// runs while the key is held, which is how a test provokes `idempotency_key_in_use`.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// A uniformly random extra delay in `0..latency_jitter` on top of `latency`.
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// The work of a request takes `slow_work` longer (after `latency`), while its idempotency key
    /// is held: a re-send under that key meanwhile is answered `409 idempotency_key_in_use`, and
    /// one after it gets the cached answer. Unlike `latency`, only the request that does the work
    /// waits it, so a 409 or a replay comes as quickly as the latency lets it.
    pub slow_work_rate: f64,
    #[serde(with = "humantime_serde")]
    pub slow_work: Duration,
    /// The work is done and cached, then the response is held for `slow_response`, so a client with a
    /// shorter timeout gives up on a request that in fact succeeded.
    pub slow_response_rate: f64,
    #[serde(with = "humantime_serde")]
    pub slow_response: Duration,
    /// The work is done and cached, then the connection is aborted before a complete response.
    pub drop_after_apply_rate: f64,
    /// A 200 whose body is cut mid-JSON on the wire; the cache keeps the whole body.
    pub truncated_body_rate: f64,
    /// A 200 whose body is not JSON at all on the wire; the cache keeps the real body.
    ///
    /// These wire faults (slow, dropped, truncated, non-JSON) strike replays of a 200 too, drawn
    /// afresh: a retry can be unlucky again, but the cached body underneath stays whole.
    pub non_json_body_rate: f64,
    /// A 200 that omits some results. The omitted items are *not* applied, and the omission is what
    /// the cache replays under the key (as the real API would).
    pub missing_results_rate: f64,
    /// A 200 in which one result appears twice (cached as sent).
    pub duplicate_result_rate: f64,
    /// A 200 with an extra result for an id that was not in the request (cached as sent).
    pub unknown_result_id_rate: f64,
    /// A 200 whose `summary` disagrees with its `results` (cached as sent).
    pub wrong_summary_rate: f64,
    /// Each item independently fails (not applied) with a code drawn from `item_error_codes`.
    pub item_error_rate: f64,
    /// Codes for `item_error_rate`; empty means [`DEFAULT_ITEM_ERROR_CODES`].
    pub item_error_codes: Vec<String>,
    /// These record ids always fail with the given code (not applied).
    pub item_errors_for_ids: BTreeMap<String, String>,
    /// A batch carrying any of these ids is refused whole with `poison_status`.
    pub poison_ids: Vec<String>,
    /// 400 by default; 413 and 422 are the other statuses a real API uses to refuse a whole body.
    pub poison_status: u16,
    /// Injected item errors carry hostile messages: a NUL (`\u0000`), a terminal escape
    /// sequence and, raw on the wire, bytes that are not UTF-8. Cached as sent.
    pub hostile_messages: bool,
    /// A 200 carrying any of these ids is padded (with JSON whitespace) to
    /// `oversized_answer_bytes`: records whose answers are always too large to read. Cached as
    /// sent, so a replay under the same key is as large.
    pub oversized_answer_ids: Vec<String>,
    pub oversized_answer_bytes: usize,
}

impl Default for FaultProfile {
    fn default() -> Self {
        Self {
            error_500_rate: 0.0,
            error_503_rate: 0.0,
            rate_limit_rate: 0.0,
            retry_after: None,
            retry_after_ms: None,
            should_retry: None,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            slow_work_rate: 0.0,
            slow_work: Duration::from_secs(5),
            slow_response_rate: 0.0,
            slow_response: Duration::from_secs(5),
            drop_after_apply_rate: 0.0,
            truncated_body_rate: 0.0,
            non_json_body_rate: 0.0,
            missing_results_rate: 0.0,
            duplicate_result_rate: 0.0,
            unknown_result_id_rate: 0.0,
            wrong_summary_rate: 0.0,
            item_error_rate: 0.0,
            item_error_codes: Vec::new(),
            item_errors_for_ids: BTreeMap::new(),
            poison_ids: Vec::new(),
            poison_status: 400,
            hostile_messages: false,
            oversized_answer_ids: Vec::new(),
            oversized_answer_bytes: 9 * 1024 * 1024,
        }
    }
}

/// Why a fault profile was refused.
#[derive(Debug, thiserror::Error)]
pub enum FaultProfileError {
    #[error("{field} must be between 0 and 1, got {value}")]
    RateOutOfRange { field: &'static str, value: f64 },
    #[error("poison_status must be a 4xx status, got {0}")]
    PoisonStatus(u16),
    #[error("item error codes must not be empty strings")]
    EmptyCode,
    #[error("reading fault profile {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing fault profile {path}: {message}")]
    Parse { path: String, message: String },
}

impl FaultProfile {
    /// Checks ranges so that a typo fails loudly instead of silently injecting nothing (or everything).
    pub fn validate(&self) -> Result<(), FaultProfileError> {
        let rates = [
            ("error_500_rate", self.error_500_rate),
            ("error_503_rate", self.error_503_rate),
            ("rate_limit_rate", self.rate_limit_rate),
            ("slow_work_rate", self.slow_work_rate),
            ("slow_response_rate", self.slow_response_rate),
            ("drop_after_apply_rate", self.drop_after_apply_rate),
            ("truncated_body_rate", self.truncated_body_rate),
            ("non_json_body_rate", self.non_json_body_rate),
            ("missing_results_rate", self.missing_results_rate),
            ("duplicate_result_rate", self.duplicate_result_rate),
            ("unknown_result_id_rate", self.unknown_result_id_rate),
            ("wrong_summary_rate", self.wrong_summary_rate),
            ("item_error_rate", self.item_error_rate),
        ];
        for (field, value) in rates {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultProfileError::RateOutOfRange { field, value });
            }
        }
        if !(400..=499).contains(&self.poison_status) {
            return Err(FaultProfileError::PoisonStatus(self.poison_status));
        }
        let codes = self
            .item_error_codes
            .iter()
            .chain(self.item_errors_for_ids.values());
        if codes.into_iter().any(|code| code.is_empty()) {
            return Err(FaultProfileError::EmptyCode);
        }
        Ok(())
    }

    /// Reads a profile file: TOML when the name ends in `.toml`, JSON otherwise.
    pub fn from_file(path: &Path) -> Result<Self, FaultProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FaultProfileError::Read {
            path: shown.clone(),
            source,
        })?;
        let is_toml = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("toml"));
        let parsed = if is_toml {
            Self::from_toml_str(&text)
        } else {
            serde_json::from_str(&text).map_err(|err| err.to_string())
        };
        let profile = parsed.map_err(|message| FaultProfileError::Parse {
            path: shown,
            message,
        })?;
        profile.validate()?;
        Ok(profile)
    }

    /// TOML goes through the `config` crate the project already uses, rather than another dependency.
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|built| built.try_deserialize())
            .map_err(|err| err.to_string())
    }

    pub fn is_quiet(&self) -> bool {
        *self == Self::default()
    }
}

/// The kinds of fault the simulator counts in its statistics (the keys of `faults_injected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Error500,
    Error503,
    RateLimit,
    Latency,
    SlowWork,
    SlowResponse,
    DropAfterApply,
    TruncatedBody,
    NonJsonBody,
    MissingResults,
    DuplicateResult,
    UnknownResultId,
    WrongSummary,
    ItemError,
    ItemErrorForId,
    Poison,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error500 => "error_500",
            Self::Error503 => "error_503",
            Self::RateLimit => "rate_limit",
            Self::Latency => "latency",
            Self::SlowWork => "slow_work",
            Self::SlowResponse => "slow_response",
            Self::DropAfterApply => "drop_after_apply",
            Self::TruncatedBody => "truncated_body",
            Self::NonJsonBody => "non_json_body",
            Self::MissingResults => "missing_results",
            Self::DuplicateResult => "duplicate_result",
            Self::UnknownResultId => "unknown_result_id",
            Self::WrongSummary => "wrong_summary",
            Self::ItemError => "item_error",
            Self::ItemErrorForId => "item_error_for_id",
            Self::Poison => "poison",
        }
    }
}

/// A profile with its id lists normalised once, so matching an item is a set look-up.
#[derive(Debug)]
pub(crate) struct ActiveFaults {
    pub profile: FaultProfile,
    poison: HashSet<String>,
    errors_for_ids: HashMap<String, String>,
    oversized: HashSet<String>,
}

/// UUIDs compare by value (any case, braces or not); anything else compares as written, so a poison
/// entry can also name a malformed id.
pub(crate) fn normalise_id(id: &str) -> String {
    match uuid::Uuid::parse_str(id) {
        Ok(uuid) => uuid.to_string(),
        Err(_) => id.to_owned(),
    }
}

impl ActiveFaults {
    pub fn new(profile: FaultProfile) -> Self {
        let poison = profile
            .poison_ids
            .iter()
            .map(|id| normalise_id(id))
            .collect();
        let errors_for_ids = profile
            .item_errors_for_ids
            .iter()
            .map(|(id, code)| (normalise_id(id), code.clone()))
            .collect();
        let oversized = profile
            .oversized_answer_ids
            .iter()
            .map(|id| normalise_id(id))
            .collect();
        Self {
            profile,
            poison,
            errors_for_ids,
            oversized,
        }
    }

    /// Whether a 200 naming this id is padded past `oversized_answer_bytes`.
    pub fn is_oversized(&self, normalised_id: &str) -> bool {
        self.oversized.contains(normalised_id)
    }

    pub fn is_poison(&self, normalised_id: &str) -> bool {
        self.poison.contains(normalised_id)
    }

    pub fn has_poison(&self) -> bool {
        !self.poison.is_empty()
    }

    pub fn has_errors_for_ids(&self) -> bool {
        !self.errors_for_ids.is_empty()
    }

    pub fn error_for_id(&self, normalised_id: &str) -> Option<&str> {
        self.errors_for_ids.get(normalised_id).map(String::as_str)
    }
}

/// A request-level fault, decided before anything is looked up or applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFault {
    Error500,
    Error503,
    RateLimit,
}

/// Draws with probability `rate`, touching the generator only when the fault is switched on, so that
/// a profile with one fault draws the same sequence whatever the other (zero) rates are.
pub(crate) fn chance(rng: &mut StdRng, rate: f64) -> bool {
    rate > 0.0 && rng.random_bool(rate.min(1.0))
}

impl ActiveFaults {
    pub fn draw_request_fault(&self, rng: &mut StdRng) -> Option<RequestFault> {
        let p = &self.profile;
        if chance(rng, p.error_500_rate) {
            Some(RequestFault::Error500)
        } else if chance(rng, p.error_503_rate) {
            Some(RequestFault::Error503)
        } else if chance(rng, p.rate_limit_rate) {
            Some(RequestFault::RateLimit)
        } else {
            None
        }
    }

    pub fn draw_latency(&self, rng: &mut StdRng) -> Duration {
        let p = &self.profile;
        let jitter = if p.latency_jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = u64::try_from(p.latency_jitter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(rng.random_range(0..nanos))
        };
        p.latency + jitter
    }

    /// How much longer the work of this request takes under `slow_work_rate`, if it does.
    pub fn draw_slow_work(&self, rng: &mut StdRng) -> Option<Duration> {
        let p = &self.profile;
        chance(rng, p.slow_work_rate).then_some(p.slow_work)
    }

    /// The code an item fails with under `item_error_rate`, if it does.
    pub fn draw_item_error(&self, rng: &mut StdRng) -> Option<String> {
        if !chance(rng, self.profile.item_error_rate) {
            return None;
        }
        let codes = &self.profile.item_error_codes;
        let code = if codes.is_empty() {
            DEFAULT_ITEM_ERROR_CODES[rng.random_range(0..DEFAULT_ITEM_ERROR_CODES.len())].to_owned()
        } else {
            codes[rng.random_range(0..codes.len())].clone()
        };
        Some(code)
    }
}

/// How a successful (200) response is damaged, decided after the items are known.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ResponseFaults {
    /// Indices of items whose results are left out (and which are therefore not applied).
    pub omitted: Vec<usize>,
    /// Position (modulo the number of results) of the result that is sent twice.
    pub duplicate: Option<usize>,
    pub unknown_id: bool,
    pub wrong_summary: bool,
}

/// How the response travels on the wire, after it has been cached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireFaults {
    pub slow: Option<Duration>,
    pub drop_after_apply: bool,
    /// Cut the body to this fraction (in thousandths) of its length.
    pub truncate_permille: Option<u16>,
    pub non_json: bool,
}

impl WireFaults {
    /// The kinds that will show, for the statistics.
    pub fn kinds(&self) -> impl Iterator<Item = FaultKind> + use<> {
        [
            (self.slow.is_some(), FaultKind::SlowResponse),
            (self.drop_after_apply, FaultKind::DropAfterApply),
            (self.truncate_permille.is_some(), FaultKind::TruncatedBody),
            (self.non_json, FaultKind::NonJsonBody),
        ]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
    }
}

impl ActiveFaults {
    pub fn draw_response_faults(&self, rng: &mut StdRng, items: usize) -> ResponseFaults {
        let p = &self.profile;
        let mut faults = ResponseFaults::default();
        if items > 0 && chance(rng, p.missing_results_rate) {
            // Between one and half of the results (at least one) go missing, at random positions.
            let count = rng.random_range(1..=(items / 2).max(1));
            let mut picked = rand::seq::index::sample(rng, items, count).into_vec();
            picked.sort_unstable();
            faults.omitted = picked;
        }
        faults.duplicate =
            chance(rng, p.duplicate_result_rate).then(|| rng.random_range(0..items.max(1)));
        faults.unknown_id = chance(rng, p.unknown_result_id_rate);
        faults.wrong_summary = chance(rng, p.wrong_summary_rate);
        faults
    }

    /// Every switched-on fault is drawn (so the sequence does not depend on the outcome), then only the
    /// one that shows wins: a dropped connection hides any body, a truncated body hides its content.
    pub fn draw_wire_faults(&self, rng: &mut StdRng) -> WireFaults {
        let p = &self.profile;
        let mut wire = WireFaults {
            slow: chance(rng, p.slow_response_rate).then_some(p.slow_response),
            drop_after_apply: chance(rng, p.drop_after_apply_rate),
            truncate_permille: chance(rng, p.truncated_body_rate)
                .then(|| rng.random_range(1..1000)),
            non_json: chance(rng, p.non_json_body_rate),
        };
        if wire.drop_after_apply {
            wire.truncate_permille = None;
        }
        if wire.drop_after_apply || wire.truncate_permille.is_some() {
            wire.non_json = false;
        }
        wire
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_toml_profile_reads_like_its_json_twin() {
        let toml = r#"
            error_500_rate = 0.25
            rate_limit_rate = 1
            retry_after = 2
            latency = "15ms"
            item_error_codes = ["rate_limited"]
            poison_ids = ["182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"]
            poison_status = 413

            [item_errors_for_ids]
            "282bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e" = "validation_error"
        "#;
        let json = r#"{"error_500_rate": 0.25, "rate_limit_rate": 1.0, "retry_after": 2,
            "latency": "15ms", "item_error_codes": ["rate_limited"],
            "poison_ids": ["182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"], "poison_status": 413,
            "item_errors_for_ids": {"282bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e": "validation_error"}}"#;
        let from_toml = FaultProfile::from_toml_str(toml).expect("toml parses");
        let from_json: FaultProfile = serde_json::from_str(json).expect("json parses");
        assert_eq!(from_toml, from_json);
        assert_eq!(from_toml.latency, Duration::from_millis(15));
        from_toml.validate().expect("valid");
    }

    #[test]
    fn a_misspelt_field_is_refused() {
        assert!(serde_json::from_str::<FaultProfile>(r#"{"eror_500_rate": 1}"#).is_err());
        assert!(FaultProfile::from_toml_str("eror_500_rate = 1").is_err());
    }

    #[test]
    fn a_rate_above_one_is_refused() {
        let profile = FaultProfile {
            item_error_rate: 1.5,
            ..FaultProfile::default()
        };
        assert!(profile.validate().is_err());
    }

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let faults = ActiveFaults::new(FaultProfile {
            missing_results_rate: 0.5,
            item_error_rate: 0.3,
            ..FaultProfile::default()
        });
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| {
                    (
                        faults.draw_item_error(&mut rng),
                        faults.draw_response_faults(&mut rng, 10),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
