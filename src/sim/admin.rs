//! Inspection and control under `/_sim/`: what tests use to assert on what the server saw, and to
//! change its behaviour while it runs. No API key is needed (these are not part of the real API).
//!
//! - `GET /_sim/stats` → [`SimStats`]
//! - `GET /_sim/requests?limit=N` → recent [`RequestLogEntry`]s, oldest first
//! - `GET /_sim/applied?record=ID&object_type=T&after_seq=N` → [`AppliedChange`]s in apply order
//! - `GET /_sim/records/{objectType}/{id}` → the record, or 404
//! - `POST /_sim/records` with one `{"object_type"?, "id", "default"?, "list"?, "extended"?}` or an
//!   array of them → seeds records (for strict mode), returns them
//! - `GET /_sim/faults`, `PUT /_sim/faults` → the [`FaultProfile`] as JSON
//! - `PUT /_sim/api-key` with `{"api_key": "..."}` → 204 (revoke a key, then restore it)
//! - `POST /_sim/reset` → 204; clears records, log, cache, statistics; keeps key and faults

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::api::error_response;
use super::state::{LogFilter, ObjectType};
use super::{FaultProfile, REQUEST_LOG_CAPACITY, Shared};

pub(crate) async fn stats(State(sim): State<Arc<Shared>>) -> Response {
    Json(sim.stats()).into_response()
}

#[derive(Deserialize)]
pub(crate) struct RequestsQuery {
    limit: Option<usize>,
}

pub(crate) async fn requests(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<RequestsQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(REQUEST_LOG_CAPACITY);
    Json(sim.observations().recent(limit)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct AppliedQuery {
    record: Option<String>,
    object_type: Option<String>,
    after_seq: Option<u64>,
}

pub(crate) async fn applied(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<AppliedQuery>,
) -> Response {
    let record = match query.record.as_deref().map(Uuid::parse_str).transpose() {
        Ok(record) => record,
        Err(_) => return bad_request("record must be a UUID"),
    };
    let object_type = match query.object_type.as_deref().map(str::parse::<ObjectType>) {
        None => None,
        Some(Ok(object_type)) => Some(object_type),
        Some(Err(err)) => return bad_request(&err.to_string()),
    };
    let filter = LogFilter {
        record_id: record,
        object_type,
        after_seq: query.after_seq.unwrap_or(0),
    };
    Json(sim.applied_log(filter)).into_response()
}

pub(crate) async fn record(
    State(sim): State<Arc<Shared>>,
    Path((object_type, id)): Path<(String, String)>,
) -> Response {
    let Ok(object_type) = object_type.parse::<ObjectType>() else {
        return not_found_json("unknown object type");
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return bad_request("id must be a UUID");
    };
    match sim.record(object_type, id) {
        Some(record) => Json(record).into_response(),
        None => not_found_json("no such record"),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SeedBody {
    Many(Vec<SeedRecord>),
    One(SeedRecord),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedRecord {
    #[serde(default = "contact")]
    object_type: ObjectType,
    id: Uuid,
    #[serde(default)]
    default: Map<String, Value>,
    list: Option<Value>,
    extended: Option<Value>,
}

fn contact() -> ObjectType {
    ObjectType::Contact
}

pub(crate) async fn seed_records(State(sim): State<Arc<Shared>>, body: Bytes) -> Response {
    let seeds = match parse::<SeedBody>(&body) {
        Ok(SeedBody::Many(seeds)) => seeds,
        Ok(SeedBody::One(seed)) => vec![seed],
        Err(message) => return bad_request(&message),
    };
    let seeded: Vec<Value> = seeds
        .into_iter()
        .map(|seed| {
            let mut body = Map::new();
            body.insert("default".into(), Value::Object(seed.default));
            if let Some(list) = seed.list {
                body.insert("list".into(), list);
            }
            if let Some(extended) = seed.extended {
                body.insert("extended".into(), extended);
            }
            sim.seed_record(seed.object_type, seed.id, body)
        })
        .collect();
    (StatusCode::CREATED, Json(seeded)).into_response()
}

pub(crate) async fn get_faults(State(sim): State<Arc<Shared>>) -> Response {
    Json(sim.faults().profile.clone()).into_response()
}

pub(crate) async fn put_faults(State(sim): State<Arc<Shared>>, body: Bytes) -> Response {
    let profile = match parse::<FaultProfile>(&body) {
        Ok(profile) => profile,
        Err(message) => return bad_request(&message),
    };
    if let Err(err) = profile.validate() {
        return bad_request(&err.to_string());
    }
    sim.set_faults(profile.clone());
    Json(profile).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyBody {
    api_key: String,
}

pub(crate) async fn put_api_key(State(sim): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse::<ApiKeyBody>(&body) {
        Ok(ApiKeyBody { api_key }) => {
            sim.set_api_key(&api_key);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => bad_request(&message),
    }
}

pub(crate) async fn reset(State(sim): State<Arc<Shared>>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}

/// Everything outside the known routes answers like the API would: JSON, not an empty 404.
pub(crate) async fn not_found() -> Response {
    not_found_json("No such endpoint.")
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| err.to_string())
}

fn bad_request(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn not_found_json(message: &str) -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", message)
}
