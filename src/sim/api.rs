//! `POST /v2/prism/{teamId}/{objectType}/batch/update` and `.../batch/delete`: the endpoints
//! prism-sync talks to. Both go through one pipeline; only the body's shape and what is done to each
//! record differ ([`Operation`]).
//!
//! A request goes through these steps, in this order, and the order is what a client can observe:
//! 1. authentication (`x-api-key`): a key no team has → 401; a key of another team, or a team the
//!    simulator does not know → 404 `team_not_found`; object type → 404;
//! 2. body read under [`BODY_LIMIT`] → 413; `Idempotency-Key` header shape → 400;
//! 3. the request-level fault and the latency are drawn from the team's fault profile (its own if it
//!    has one, else the global one); a faulted request waits out the latency and gets its 500, 503
//!    or 429;
//! 4. the idempotency claim: a replay, `409 idempotency_key_mismatch` or `409 idempotency_key_in_use`
//!    waits out the latency and is answered; otherwise the request now owns the key;
//! 5. the work, in a task of its own so that it finishes (and is cached) even if the client has gone:
//!    the latency and any slow work (while the key is held, so a concurrent retry sees
//!    `idempotency_key_in_use`; slow work is waited only here, by the request that does it), body
//!    validation, poison check, per-item validation and injected item errors, apply, results (with
//!    injected omissions, duplicates, unknown ids, wrong summaries), then the cache entry;
//! 6. wire faults on the way out: a slow answer, a dropped connection, a truncated or non-JSON body.
//!
//! **Bodies.** An update carries `{"items": [{"id", "default"?, "list"?, "extended"?}, ...]}`, a
//! delete `{"ids": ["<uuid>", ...]}`; either holds 1 to [`MAX_ITEMS`] entries, else 400
//! `invalid_request` (400 `invalid_json` if it is not JSON). An entry whose id is not a UUID is
//! answered `{"id": null, "status": "error", "error": {"code": "invalid_id", ...}}` and the rest still
//! apply. Both answer `{"results": [...], "summary": {"total", "succeeded", "failed"}}`; an update's
//! `ok` result carries the `record` after the change, a delete's carries no `record` (the field is
//! left out, as on any error result). Deleting an id that has no record (never created, or already
//! deleted) is answered `not_found`; after a delete, an update of the id behaves as for a fresh id.
//!
//! **What the idempotency cache holds.** Every response produced in step 5: the 200s (as damaged by
//! step 5's faults) and the 400/413 of body validation and poison items, because those are the
//! server's considered answer to those bytes. Nothing decided before the claim is cached (401, 404,
//! 413 for an oversize body, 400 for a bad key header, injected 500/503/429): those left nothing
//! applied, and a retry deserves a fresh answer. Wire faults (step 6) never reach the cache: a retry
//! under the same key gets the whole, correct body. Keys are scoped per team.
//!
//! **Fingerprint.** A key matches a later request when the path and the exact body bytes hash equal
//! (64-bit SipHash with fixed keys over the path, the body and its length): a different body is a
//! mismatch even if it means the same JSON, and so is the same body sent to another object type or
//! the same key used for an update and then a delete (the path names the operation).

use std::borrow::Cow;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use rand::Rng;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::faults::{ActiveFaults, FaultKind, RequestFault, ResponseFaults, WireFaults};
use super::state::{
    ApplyItem, ApplyOutcome, CachedResponse, Claim, ObjectType, Operation, RequestMeta,
    RequestOutcome, ScopedKey, TeamIndex,
};
use super::{Access, Shared};

/// The most items one request may carry.
pub const MAX_ITEMS: usize = 100;
/// Larger bodies are refused with 413 before they are buffered whole.
pub const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// `Idempotency-Key` length bounds, from the API reference.
const MAX_KEY_LEN: usize = 255;

const JSON: &str = "application/json";
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const API_KEY: &str = "x-api-key";

/// Top-level item keys the API knows; anything else is `invalid_property`.
const ITEM_KEYS: [&str; 4] = ["id", "default", "list", "extended"];

/// The body a proxy in front of an API typically sends where JSON was expected.
const NON_JSON_BODY: &str =
    "<html><head><title>200 OK</title></head><body><h1>Request accepted</h1></body></html>\n";

pub(crate) async fn batch_update(
    State(sim): State<Arc<Shared>>,
    Path((team, object_type)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    batch(
        sim,
        Operation::Update,
        &team,
        &object_type,
        &uri,
        headers,
        body,
    )
    .await
}

pub(crate) async fn batch_delete(
    State(sim): State<Arc<Shared>>,
    Path((team, object_type)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    batch(
        sim,
        Operation::Delete,
        &team,
        &object_type,
        &uri,
        headers,
        body,
    )
    .await
}

/// The pipeline both batch endpoints share (steps 1 to 6 of the module docs), one function per
/// step.
async fn batch(
    sim: Arc<Shared>,
    operation: Operation,
    team: &str,
    object_type: &str,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = time::OffsetDateTime::now_utc();
    let path = uri.path().to_owned();
    let shown_key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    // A request counts for the team its path names, whether or not its key opens that team.
    let meta = RequestMeta {
        path: &path,
        key: shown_key.as_deref(),
        team: sim.find_team(team),
        operation,
        received,
    };
    // Steps 1 and 2.
    let admitted = match admit(&sim, meta.team, team, object_type, &headers, body).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.answer(&sim, &meta, RequestOutcome::default()),
    };
    let team = admitted.team;
    // Step 3.
    let faults = sim.faults_for(team);
    let (request_fault, latency, slow_work) = {
        let mut rng = sim.rng();
        (
            faults.draw_request_fault(&mut rng),
            faults.draw_latency(&mut rng),
            faults.draw_slow_work(&mut rng),
        )
    };
    let mut fault_kinds = Vec::new();
    if !latency.is_zero() {
        fault_kinds.push((FaultKind::Latency, 1));
    }
    if let Some(fault) = request_fault {
        sim.pause(latency).await;
        return request_fault_response(&sim, &meta, &faults, fault, fault_kinds);
    }
    // Step 4.
    let scoped_key = admitted
        .key
        .map(|key| (sim.team_name(team).to_owned(), key));
    let claim = match &scoped_key {
        None => None,
        Some(scoped) => {
            let fingerprint = fingerprint(&path, &admitted.bytes);
            let asked = KeyRequest {
                meta: &meta,
                faults: &faults,
                latency,
            };
            match claim_key(&sim, scoped, fingerprint, asked, &mut fault_kinds).await {
                Ok(claim) => Some(claim),
                Err(answered) => return answered,
            }
        }
    };
    // Steps 5 and 6.
    let work = Work {
        target: Target {
            team,
            object_type: admitted.object_type,
            operation,
        },
        latency,
        slow_work,
        bytes: admitted.bytes,
        faults,
        key: scoped_key.map(|(_, key)| Arc::from(key.as_str())),
        claim,
        fault_kinds,
        path: path.clone(),
        shown_key: shown_key.clone(),
        received,
    };
    let (response, wire) = match work.run(&sim).await {
        Some(done) => done,
        None => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "The simulator failed while processing this request.",
            );
        }
    };
    send_with_wire_faults(&sim, response, wire).await
}

/// A request that passed steps 1 and 2.
struct Admitted {
    team: TeamIndex,
    object_type: ObjectType,
    bytes: Bytes,
    key: Option<String>,
}

/// An error answer decided before any fault or the idempotency claim (never cached).
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    /// Counts the request (with `outcome`'s flags and faults, under the refusal's status) and
    /// answers it.
    fn answer(self, sim: &Shared, meta: &RequestMeta<'_>, outcome: RequestOutcome) -> Response {
        let outcome = RequestOutcome {
            status: self.status.as_u16(),
            ..outcome
        };
        sim.observe(meta, outcome);
        error_response(self.status, self.code, &self.message)
    }
}

/// Steps 1 and 2: authentication, object type, body and `Idempotency-Key` header.
async fn admit(
    sim: &Shared,
    path_team: Option<TeamIndex>,
    team: &str,
    object_type: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Admitted, Refusal> {
    let team = match sim.access(path_team, headers.get(API_KEY).map(HeaderValue::as_bytes)) {
        Access::Granted(team) => team,
        Access::Unauthorized => {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Missing or invalid API key (x-api-key header).",
            ));
        }
        Access::OtherTeam => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "team_not_found",
                format!("Team {team} does not exist or is not accessible with this key."),
            ));
        }
    };
    let Ok(object_type) = object_type.parse::<ObjectType>() else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("Unknown object type {object_type:?}."),
        ));
    };
    let bytes = read_body(headers, body).await.map_err(|e| match e {
        BodyError::TooLarge => Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("Request body exceeds {BODY_LIMIT} bytes."),
        ),
        BodyError::Unreadable => Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body could not be read.",
        ),
    })?;
    let key = idempotency_key(headers).map_err(|message| {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", message)
    })?;
    Ok(Admitted {
        team,
        object_type,
        bytes,
        key,
    })
}

/// Step 3's answer for a request that drew a request-level fault (the latency already waited).
fn request_fault_response(
    sim: &Shared,
    meta: &RequestMeta<'_>,
    faults: &ActiveFaults,
    fault: RequestFault,
    mut fault_kinds: Vec<(FaultKind, u64)>,
) -> Response {
    let (status, kind, code, message) = match fault {
        RequestFault::Error500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            FaultKind::Error500,
            "internal_error",
            "Simulated internal error.",
        ),
        RequestFault::Error503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            FaultKind::Error503,
            "unavailable",
            "Simulated service unavailable.",
        ),
        RequestFault::RateLimit => (
            StatusCode::TOO_MANY_REQUESTS,
            FaultKind::RateLimit,
            "rate_limited",
            "Simulated rate limit.",
        ),
    };
    fault_kinds.push((kind, 1));
    sim.observe(
        meta,
        RequestOutcome {
            status: status.as_u16(),
            faults: fault_kinds,
            ..RequestOutcome::default()
        },
    );
    fault_response(faults, fault, status, code, message)
}

/// What step 4 needs to answer a request that does not get its key.
struct KeyRequest<'a> {
    meta: &'a RequestMeta<'a>,
    faults: &'a ActiveFaults,
    latency: Duration,
}

/// Step 4: the idempotency claim. `Ok`: the request now owns the key; `Err`: it was answered
/// here (a replay, `idempotency_key_mismatch` or `idempotency_key_in_use`, after the latency).
async fn claim_key(
    sim: &Arc<Shared>,
    scoped: &ScopedKey,
    fingerprint: u64,
    asked: KeyRequest<'_>,
    fault_kinds: &mut Vec<(FaultKind, u64)>,
) -> Result<KeyClaim, Response> {
    let conflict = |code: &'static str, message: &'static str, flags: RequestOutcome| {
        let refusal = Refusal::new(StatusCode::CONFLICT, code, message);
        refusal.answer(sim, asked.meta, flags)
    };
    match sim.claim_key(scoped, fingerprint) {
        Claim::Fresh => Ok(KeyClaim {
            sim: Arc::clone(sim),
            key: scoped.clone(),
            settled: false,
        }),
        Claim::Replay(cached) => {
            // The network treats a replay like any other answer: it can be slow, cut or lost.
            let wire = if cached.status == 200 {
                asked.faults.draw_wire_faults(&mut sim.rng())
            } else {
                WireFaults::default()
            };
            fault_kinds.extend(wire.kinds().map(|kind| (kind, 1)));
            sim.pause(asked.latency).await;
            let outcome = RequestOutcome {
                status: cached.status,
                replay: true,
                faults: std::mem::take(fault_kinds),
                ..RequestOutcome::default()
            };
            sim.observe(asked.meta, outcome);
            let mut response = send_with_wire_faults(sim, cached, wire).await;
            response.headers_mut().insert(
                HeaderName::from_static("idempotent-replay"),
                HeaderValue::from_static("true"),
            );
            Err(response)
        }
        Claim::Mismatch => {
            sim.pause(asked.latency).await;
            let flags = RequestOutcome {
                mismatch: true,
                faults: std::mem::take(fault_kinds),
                ..RequestOutcome::default()
            };
            Err(conflict(
                "idempotency_key_mismatch",
                "This Idempotency-Key was already used with a different request body.",
                flags,
            ))
        }
        Claim::InProgress => {
            sim.pause(asked.latency).await;
            let flags = RequestOutcome {
                in_progress: true,
                faults: std::mem::take(fault_kinds),
                ..RequestOutcome::default()
            };
            Err(conflict(
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry later.",
                flags,
            ))
        }
    }
}

/// Step 5 for one request that owns its key (or sent none).
struct Work {
    target: Target,
    latency: Duration,
    /// Extra work time under `slow_work_rate`, waited only by the request that does the work.
    slow_work: Option<Duration>,
    bytes: Bytes,
    faults: Arc<ActiveFaults>,
    key: Option<Arc<str>>,
    claim: Option<KeyClaim>,
    /// The faults drawn so far (latency).
    fault_kinds: Vec<(FaultKind, u64)>,
    path: String,
    shown_key: Option<String>,
    /// When the request arrived (for the request log).
    received: time::OffsetDateTime,
}

impl Work {
    /// Runs the work in its own task: a client that times out or disconnects must not cancel a
    /// request the server has accepted, just as with a real server. `None`: the task failed.
    async fn run(self, sim: &Arc<Shared>) -> Option<(CachedResponse, WireFaults)> {
        let sim = Arc::clone(sim);
        tokio::spawn(async move {
            let mut work = self;
            sim.pause(work.latency).await;
            if let Some(slow) = work.slow_work {
                work.fault_kinds.push((FaultKind::SlowWork, 1));
                sim.pause(slow).await;
            }
            let processed = process_batch(
                &sim,
                &work.faults,
                work.target,
                &work.bytes,
                work.key.as_ref(),
            );
            if let Some(claim) = work.claim.take() {
                claim.settle(processed.response.clone());
            }
            let mut outcome = processed.outcome;
            work.fault_kinds.append(&mut outcome.faults);
            outcome.faults = work.fault_kinds;
            let meta = RequestMeta {
                path: &work.path,
                key: work.shown_key.as_deref(),
                team: Some(work.target.team),
                operation: work.target.operation,
                received: work.received,
            };
            sim.observe(&meta, outcome);
            (processed.response, processed.wire)
        })
        .await
        .ok()
    }
}

/// Holds a fresh idempotency key for the request that claimed it; releases the key if the request
/// ends without settling it (a panic, a shutdown), so the key does not stay "in use" forever.
struct KeyClaim {
    sim: Arc<Shared>,
    key: ScopedKey,
    settled: bool,
}

impl KeyClaim {
    fn settle(mut self, response: CachedResponse) {
        self.sim.complete_key(&self.key, response);
        self.settled = true;
    }
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        if !self.settled {
            self.sim.release_key(&self.key);
        }
    }
}

async fn send_with_wire_faults(
    sim: &Shared,
    response: CachedResponse,
    wire: WireFaults,
) -> Response {
    if let Some(hold) = wire.slow {
        sim.pause(hold).await;
    }
    if wire.drop_after_apply {
        return dropped_connection();
    }
    if let Some(permille) = wire.truncate_permille {
        let len = response.body.len();
        let cut = (len * usize::from(permille) / 1000).clamp(1, len.saturating_sub(1).max(1));
        let truncated = CachedResponse {
            body: response.body.slice(..cut.min(len)),
            ..response
        };
        return cached_response(&truncated);
    }
    if wire.non_json {
        return (
            StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            NON_JSON_BODY,
        )
            .into_response();
    }
    cached_response(&response)
}

/// A response whose body fails before its first byte: hyper aborts the connection, so the client sees
/// a transport error and never a complete response.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated connection drop after apply",
        ))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, JSON)],
        Body::from_stream(failing),
    )
        .into_response()
}

enum BodyError {
    TooLarge,
    Unreadable,
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|len| len > BODY_LIMIT) {
        return Err(BodyError::TooLarge);
    }
    let mut buffer = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if buffer.len() + chunk.len() > BODY_LIMIT {
            return Err(BodyError::TooLarge);
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, &'static str> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let Ok(key) = value.to_str() else {
        return Err("Idempotency-Key must be visible ASCII.");
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err("Idempotency-Key must be 1 to 255 characters long.");
    }
    Ok(Some(key.to_owned()))
}

fn fingerprint(path: &str, body: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    path.hash(&mut hasher);
    body.hash(&mut hasher);
    hasher.finish()
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

pub(crate) fn error_bytes(code: &str, message: &str) -> Bytes {
    let body = ErrorBody {
        error: ErrorDetail { code, message },
    };
    // Serialising two strings cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, JSON)],
        error_bytes(code, message),
    )
        .into_response()
}

fn fault_response(
    faults: &ActiveFaults,
    fault: RequestFault,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response {
    let mut response = error_response(status, code, message);
    let headers = response.headers_mut();
    let p = &faults.profile;
    if matches!(fault, RequestFault::RateLimit | RequestFault::Error503) {
        if let Some(secs) = p.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(ms) = p.retry_after_ms {
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(ms),
            );
        }
    }
    if let Some(retry) = p.should_retry {
        let value = if retry { "true" } else { "false" };
        headers.insert(
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static(value),
        );
    }
    response
}

fn cached_response(cached: &CachedResponse) -> Response {
    (
        StatusCode::from_u16(cached.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, cached.content_type)],
        cached.body.clone(),
    )
        .into_response()
}

/// What step 5 produced: the response to cache and send, how to damage it on the wire, and the counts.
struct Processed {
    response: CachedResponse,
    wire: WireFaults,
    outcome: RequestOutcome,
}

fn refused(status: StatusCode, code: &str, message: &str, items: usize) -> Processed {
    Processed {
        response: CachedResponse {
            status: status.as_u16(),
            content_type: JSON,
            body: error_bytes(code, message),
        },
        wire: WireFaults::default(),
        outcome: RequestOutcome {
            status: status.as_u16(),
            items,
            ..RequestOutcome::default()
        },
    }
}

/// An item after validation. A valid item owns its parsed body (which moves into the record) and a
/// zero-copy slice of its exact bytes (which goes into the apply log).
enum CheckedItem {
    Valid {
        id: Uuid,
        body: Map<String, Value>,
        raw: Bytes,
    },
    Invalid {
        id: Option<Uuid>,
        code: &'static str,
        message: Cow<'static, str>,
    },
}

/// A delete's entry: a UUID string, nothing else.
fn check_id(entry: &Value) -> CheckedItem {
    match entry.as_str().map(Uuid::parse_str) {
        Some(Ok(id)) => CheckedItem::Valid {
            id,
            body: Map::new(),
            raw: Bytes::new(),
        },
        _ => CheckedItem::Invalid {
            id: None,
            code: "invalid_id",
            message: "Each id must be a UUID string.".into(),
        },
    }
}

fn check_item(item: Value, raw: Bytes) -> CheckedItem {
    let Value::Object(body) = item else {
        return CheckedItem::Invalid {
            id: None,
            code: "validation_error",
            message: "Each item must be a JSON object.".into(),
        };
    };
    let Some(id) = body
        .get("id")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok())
    else {
        return CheckedItem::Invalid {
            id: None,
            code: "invalid_id",
            message: "Item id is missing or is not a UUID.".into(),
        };
    };
    if let Some(unknown) = body.keys().find(|key| !ITEM_KEYS.contains(&key.as_str())) {
        return CheckedItem::Invalid {
            id: Some(id),
            code: "invalid_property",
            message: format!(
                "Unknown item property {unknown:?}; expected default, list or extended."
            )
            .into(),
        };
    }
    if body
        .get("default")
        .is_some_and(|default| !default.is_object())
    {
        return CheckedItem::Invalid {
            id: Some(id),
            code: "validation_error",
            message: "Item default must be an object of property values.".into(),
        };
    }
    CheckedItem::Valid { id, body, raw }
}

#[derive(Serialize, Clone)]
struct ItemResult {
    /// Always present: null where the input id was unparseable.
    id: Option<Uuid>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ItemError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<Box<RawValue>>,
}

#[derive(Serialize, Clone)]
struct ItemError {
    code: Cow<'static, str>,
    message: Cow<'static, str>,
}

#[derive(Serialize)]
struct Summary {
    total: u64,
    succeeded: u64,
    failed: u64,
}

#[derive(Serialize)]
struct BulkResponse {
    results: Vec<ItemResult>,
    summary: Summary,
}

/// The request body as far as the simulator reads it before looking at items: `items` (an update's)
/// or `ids` (a delete's) stays raw so that each entry's exact bytes can be kept.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    #[serde(borrow)]
    ids: Option<&'a RawValue>,
}

fn failed(
    id: Option<Uuid>,
    code: impl Into<Cow<'static, str>>,
    message: impl Into<Cow<'static, str>>,
) -> ItemResult {
    ItemResult {
        id,
        status: "error",
        error: Some(ItemError {
            code: code.into(),
            message: message.into(),
        }),
        record: None,
    }
}

/// Stands, in a hostile message, where the wire carries bytes that are not UTF-8.
const NOT_UTF8_MARK: &str = "@@not-utf8@@";

/// An injected item error's message made hostile: a NUL, a terminal escape sequence and (once
/// [`splice_invalid_utf8`] has run over the serialised body) bytes that are not UTF-8.
fn hostile_message(code: &str) -> String {
    format!("{} \u{0}\u{1b}[2J {NOT_UTF8_MARK}", injected_message(code))
}

/// Replaces every [`NOT_UTF8_MARK`] in a serialised body with bytes that are not UTF-8.
fn splice_invalid_utf8(body: Vec<u8>) -> Vec<u8> {
    let mark = NOT_UTF8_MARK.as_bytes();
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = rest.windows(mark.len()).position(|w| w == mark) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(&[0xff, 0xfe, 0xc3]);
        rest = &rest[at + mark.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The ids a 200's results name.
fn applied_ids_or_sent(results: &[ItemResult]) -> impl Iterator<Item = Uuid> + '_ {
    results.iter().filter_map(|r| r.id)
}

fn injected_message(code: &str) -> Cow<'static, str> {
    match code {
        "rate_limited" => "Too many updates to this record; retry later.".into(),
        "internal_error" => "Internal error while updating this record.".into(),
        "validation_error" => "A property value failed validation.".into(),
        "not_found" => "Record not found.".into(),
        other => format!("Simulated item error {other}.").into(),
    }
}

/// Why a body has no items to look at: the error code and message of its 400.
type BodyRefusal = (&'static str, &'static str);

/// The array a body of this operation carries.
fn entries_field(operation: Operation) -> &'static str {
    match operation {
        Operation::Update => "items",
        Operation::Delete => "ids",
    }
}

/// Splits a body into its entries (each as a raw slice of `body`), or says why it cannot.
fn split_items(body: &Bytes, operation: Operation) -> Result<Vec<&RawValue>, BodyRefusal> {
    let shape: BodyRefusal = match operation {
        Operation::Update => (
            "invalid_request",
            "The request body must be an object with an \"items\" array.",
        ),
        Operation::Delete => (
            "invalid_request",
            "The request body must be an object with an \"ids\" array.",
        ),
    };
    let envelope = match serde_json::from_slice::<Envelope<'_>>(body) {
        Ok(envelope) => envelope,
        Err(_) if serde_json::from_slice::<IgnoredAny>(body).is_ok() => return Err(shape),
        Err(_) => return Err(("invalid_json", "The request body is not valid JSON.")),
    };
    // serde also reads a struct from a JSON array; the API wants an object.
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let entries = match operation {
        Operation::Update => envelope.items,
        Operation::Delete => envelope.ids,
    };
    let entries = entries.filter(|_| is_object).ok_or(shape)?;
    serde_json::from_str::<Vec<&RawValue>>(entries.get()).map_err(|_| shape)
}

/// Where a batch's changes go.
#[derive(Clone, Copy)]
struct Target {
    team: TeamIndex,
    object_type: ObjectType,
    operation: Operation,
}

/// Step 5: validate, apply and answer. Synchronous: it holds locks only for in-memory work.
fn process_batch(
    sim: &Shared,
    faults: &ActiveFaults,
    target: Target,
    body: &Bytes,
    key: Option<&Arc<str>>,
) -> Processed {
    let checked = match check_body(faults, target.operation, body) {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    let count = checked.len();
    let mut outcome = RequestOutcome {
        status: 200,
        items: count,
        ..RequestOutcome::default()
    };
    let draws = draw_response(sim, faults, &checked);
    let mut results = answer_items(sim, faults, target, checked, &draws, key, &mut outcome);
    add_stray_results(&mut results, &draws, target.operation, &mut outcome);
    let summary = summary(count, &draws.response, &mut outcome);
    outcome
        .faults
        .extend(draws.wire.kinds().map(|kind| (kind, 1)));
    Processed {
        response: CachedResponse {
            status: 200,
            content_type: JSON,
            body: Bytes::from(response_body(faults, body.len(), results, summary)),
        },
        wire: draws.wire,
        outcome,
    }
}

/// The body's entries, each checked, or the 400 (or the poison fault's refusal) for the whole
/// request (boxed: it is large, and rare).
fn check_body(
    faults: &ActiveFaults,
    operation: Operation,
    body: &Bytes,
) -> Result<Vec<CheckedItem>, Box<Processed>> {
    let raw_items = split_items(body, operation)
        .map_err(|(code, message)| Box::new(refused(StatusCode::BAD_REQUEST, code, message, 0)))?;
    let count = raw_items.len();
    if count == 0 || count > MAX_ITEMS {
        return Err(Box::new(refused(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "{} must hold 1 to {MAX_ITEMS} entries, got {count}.",
                entries_field(operation)
            ),
            count,
        )));
    }
    // Each raw item is valid JSON already, so parsing it again cannot fail.
    let values: Vec<Value> = raw_items
        .iter()
        .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
        .collect();
    if faults.has_poison()
        && values
            .iter()
            .any(|entry| is_poison(faults, entry_id(operation, entry)))
    {
        return Err(Box::new(poisoned(faults, count)));
    }
    Ok(match operation {
        Operation::Update => values
            .into_iter()
            .zip(&raw_items)
            .map(|(value, raw)| check_item(value, body.slice_ref(raw.get().as_bytes())))
            .collect(),
        Operation::Delete => values.iter().map(check_id).collect(),
    })
}

/// The refusal of a request that carries a poison item.
fn poisoned(faults: &ActiveFaults, count: usize) -> Processed {
    let status =
        StatusCode::from_u16(faults.profile.poison_status).unwrap_or(StatusCode::BAD_REQUEST);
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable_entity",
        _ => "invalid_request",
    };
    let mut processed = refused(
        status,
        code,
        "The request was refused because of one of its items.",
        count,
    );
    processed.outcome.faults.push((FaultKind::Poison, 1));
    processed
}

/// All random draws for one answered request, in one fixed order.
struct Draws {
    response: ResponseFaults,
    /// Per item: the error injected into its result, if any.
    injected: Vec<Option<(String, FaultKind)>>,
    wire: WireFaults,
    unknown_id: Option<Uuid>,
}

fn draw_response(sim: &Shared, faults: &ActiveFaults, checked: &[CheckedItem]) -> Draws {
    let mut rng = sim.rng();
    let response = faults.draw_response_faults(&mut rng, checked.len());
    let injected = checked
        .iter()
        .enumerate()
        .map(|(index, item)| match item {
            CheckedItem::Valid { id, .. } if !response.omitted.contains(&index) => {
                let for_id = faults
                    .has_errors_for_ids()
                    .then(|| faults.error_for_id(&id.to_string()))
                    .flatten()
                    .map(|code| (code.to_owned(), FaultKind::ItemErrorForId));
                for_id.or_else(|| {
                    faults
                        .draw_item_error(&mut rng)
                        .map(|code| (code, FaultKind::ItemError))
                })
            }
            _ => None,
        })
        .collect();
    let wire = faults.draw_wire_faults(&mut rng);
    let unknown_id = response
        .unknown_id
        .then(|| uuid::Builder::from_random_bytes(rng.random()).into_uuid());
    Draws {
        response,
        injected,
        wire,
        unknown_id,
    }
}

/// One result per item not omitted, in request order: its validation error, its injected
/// error, or what applying it did. Counts applied and failed items and the item faults.
fn answer_items(
    sim: &Shared,
    faults: &ActiveFaults,
    target: Target,
    checked: Vec<CheckedItem>,
    draws: &Draws,
    key: Option<&Arc<str>>,
    outcome: &mut RequestOutcome,
) -> Vec<ItemResult> {
    // Results in request order; the applied ones are filled in after the store has answered.
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(checked.len());
    let mut to_apply = Vec::with_capacity(checked.len());
    let mut applied_at = Vec::with_capacity(checked.len());
    let (mut item_errors, mut id_errors) = (0u64, 0u64);
    for (index, (item, injected)) in checked.into_iter().zip(&draws.injected).enumerate() {
        if draws.response.omitted.contains(&index) {
            continue;
        }
        let result = match (item, injected.clone()) {
            (CheckedItem::Invalid { id, code, message }, _) => Some(failed(id, code, message)),
            (CheckedItem::Valid { id, .. }, Some((code, kind))) => {
                match kind {
                    FaultKind::ItemErrorForId => id_errors += 1,
                    _ => item_errors += 1,
                }
                let message = if faults.profile.hostile_messages {
                    hostile_message(&code).into()
                } else {
                    injected_message(&code)
                };
                Some(failed(Some(id), code, message))
            }
            (CheckedItem::Valid { id, body, raw }, None) => {
                to_apply.push(ApplyItem { id, body, raw });
                applied_at.push(results.len());
                None
            }
        };
        results.push(result);
    }
    let applied_ids: Vec<Uuid> = to_apply.iter().map(|item| item.id).collect();
    let applied = sim.apply(
        target.team,
        target.object_type,
        target.operation,
        to_apply,
        key,
    );
    for ((slot, id), applied) in applied_at.into_iter().zip(applied_ids).zip(applied) {
        results[slot] = Some(applied_result(id, applied));
    }
    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let succeeded = results.iter().filter(|r| r.status == "ok").count() as u64;
    outcome.items_applied = succeeded;
    outcome.items_failed = results.len() as u64 - succeeded;
    if item_errors > 0 {
        outcome.faults.push((FaultKind::ItemError, item_errors));
    }
    if id_errors > 0 {
        outcome.faults.push((FaultKind::ItemErrorForId, id_errors));
    }
    if !draws.response.omitted.is_empty() {
        outcome.faults.push((FaultKind::MissingResults, 1));
    }
    results
}

fn applied_result(id: Uuid, applied: ApplyOutcome) -> ItemResult {
    match applied {
        ApplyOutcome::Applied(record) => ItemResult {
            id: Some(id),
            status: "ok",
            error: None,
            record: Some(record),
        },
        ApplyOutcome::Deleted => ItemResult {
            id: Some(id),
            status: "ok",
            error: None,
            record: None,
        },
        ApplyOutcome::NotFound => failed(Some(id), "not_found", "Record not found."),
    }
}

/// The drawn result faults that add results: one sent twice, one for an id never sent.
fn add_stray_results(
    results: &mut Vec<ItemResult>,
    draws: &Draws,
    operation: Operation,
    outcome: &mut RequestOutcome,
) {
    if let Some(position) = draws.response.duplicate
        && !results.is_empty()
    {
        let position = position % results.len();
        let copy = results[position].clone();
        results.insert(position + 1, copy);
        outcome.faults.push((FaultKind::DuplicateResult, 1));
    }
    if let Some(stranger) = draws.unknown_id {
        let record = match operation {
            Operation::Update => serde_json::value::to_raw_value(&serde_json::json!({
                "id": stranger, "default": {}
            }))
            .ok(),
            Operation::Delete => None,
        };
        results.push(ItemResult {
            id: Some(stranger),
            status: "ok",
            error: None,
            record,
        });
        outcome.faults.push((FaultKind::UnknownResultId, 1));
    }
}

/// The answer's summary of what was applied (swapped, when the fault was drawn).
fn summary(count: usize, drawn: &ResponseFaults, outcome: &mut RequestOutcome) -> Summary {
    let mut summary = Summary {
        total: count as u64,
        succeeded: outcome.items_applied,
        failed: outcome.items_failed,
    };
    if drawn.wrong_summary {
        std::mem::swap(&mut summary.succeeded, &mut summary.failed);
        if summary.succeeded == summary.failed {
            summary.succeeded += 1;
        }
        outcome.faults.push((FaultKind::WrongSummary, 1));
    }
    summary
}

/// The 200's bytes, made hostile or oversized when the profile says so.
fn response_body(
    faults: &ActiveFaults,
    request_len: usize,
    results: Vec<ItemResult>,
    summary: Summary,
) -> Vec<u8> {
    // A response is roughly twice its request (each item comes back with its record).
    let mut out = Vec::with_capacity(request_len * 2 + 256);
    let oversized = applied_ids_or_sent(&results).any(|id| faults.is_oversized(&id.to_string()));
    // Serialising owned strings, numbers and already-valid raw JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &BulkResponse { results, summary });
    if faults.profile.hostile_messages {
        out = splice_invalid_utf8(out);
    }
    if oversized {
        // Trailing white space keeps the JSON valid; only its size is hostile.
        let pad = faults
            .profile
            .oversized_answer_bytes
            .saturating_sub(out.len());
        out.resize(out.len() + pad, b' ');
    }
    out
}

/// The id an entry names, as written: an update item's `id`, or a delete's entry itself.
fn entry_id(operation: Operation, entry: &Value) -> Option<&str> {
    match operation {
        Operation::Update => entry.get("id").and_then(Value::as_str),
        Operation::Delete => entry.as_str(),
    }
}

fn is_poison(faults: &ActiveFaults, id: Option<&str>) -> bool {
    id.is_some_and(|id| faults.is_poison(&super::faults::normalise_id(id)))
}

impl Shared {
    /// Sleeps for `delay`, cut short by shutdown so that a stopping simulator does not wait on
    /// injected latency.
    pub(crate) async fn pause(&self, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    fn claim_key(&self, key: &ScopedKey, fingerprint: u64) -> Claim {
        self.idempotency().claim(key, fingerprint, Instant::now())
    }

    fn complete_key(&self, key: &ScopedKey, response: CachedResponse) {
        self.idempotency().complete(key, response, Instant::now());
    }

    fn release_key(&self, key: &ScopedKey) {
        // Runs in Drop: a poisoned lock is left alone rather than panicking during unwinding.
        if let Ok(mut cache) = self.idempotency.lock() {
            cache.release(key);
        }
    }
}
