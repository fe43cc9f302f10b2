//! Inspection and control under `/_sim/`: what tests use to assert on what the server saw, and to
//! change its behaviour while it runs. No API key is needed (these are not part of the real API).
//!
//! Endpoints that concern one team take `?team=T` (a configured team id; UUIDs in any case); without
//! it they mean the primary team, or for stats and faults, everything; an unknown `T` is 404
//! `team_not_found`.
//! - `GET /_sim/stats` → [`SimStats`] over every request; `?team=T` → counted for team `T` only
//! - `GET /_sim/requests?limit=N` → recent [`RequestLogEntry`]s (with `team`, `operation`, and
//!   `received_at`, when it arrived, beside `at`, when it was answered), oldest first
//! - `GET /_sim/applied?record=ID&object_type=T&after_seq=N&team=T` → [`AppliedChange`]s in apply order
//!   (updates and deletes); the primary team's unless `team` is given, every team's with `team=*`
//! - `GET /_sim/records/{objectType}/{id}?team=T` → the record, or 404
//! - `POST /_sim/records?team=T` with one `{"object_type"?, "id", "default"?, "list"?, "extended"?}` or
//!   an array of them → seeds records (for strict mode), returns them
//! - `GET /_sim/faults`, `PUT /_sim/faults` → the global [`FaultProfile`] as JSON; `DELETE /_sim/faults`
//!   → 204, the global profile back to the default (no faults)
//! - `GET|PUT|DELETE /_sim/faults?team=T` → team `T`'s own profile, used for its requests instead of
//!   the global one: `GET` is 404 `not_found` while it has none, `DELETE` (204) removes it
//! - `PUT /_sim/api-key?team=T` with `{"api_key": "..."}` → 204 (revoke a team's key, then restore it;
//!   the primary team's without `team`)
//! - `POST /_sim/reset` → 204; clears records, log, cache, statistics; keeps keys and faults

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
use super::state::{LogFilter, ObjectType, TeamIndex};
use super::{FaultProfile, PRIMARY, REQUEST_LOG_CAPACITY, Shared, UnknownTeam};

/// `?team=T` on the endpoints that concern one team.
#[derive(Deserialize)]
pub(crate) struct TeamQuery {
    team: Option<String>,
}

impl TeamQuery {
    /// `None` without `team`; the team's index, or which team is unknown.
    fn resolve(&self, sim: &Shared) -> Result<Option<TeamIndex>, UnknownTeam> {
        self.team.as_deref().map(|team| sim.team(team)).transpose()
    }

    /// The named team, or the primary one without `team`.
    fn or_primary(&self, sim: &Shared) -> Result<TeamIndex, UnknownTeam> {
        Ok(self.resolve(sim)?.unwrap_or(PRIMARY))
    }
}

/// An unknown `?team=` answers 404 `team_not_found`, like the API.
impl IntoResponse for UnknownTeam {
    fn into_response(self) -> Response {
        error_response(
            StatusCode::NOT_FOUND,
            "team_not_found",
            &format!("The simulator knows no team {:?}.", self.0),
        )
    }
}

pub(crate) async fn stats(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
) -> Result<Response, UnknownTeam> {
    Ok(Json(sim.stats(query.resolve(&sim)?)).into_response())
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
    /// A team id, or `*` for every team; the primary team when absent.
    team: Option<String>,
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
    let team = match query.team.as_deref() {
        None => Some(PRIMARY),
        Some("*") => None,
        Some(team) => match sim.find_team(team) {
            Some(team) => Some(team),
            None => return UnknownTeam(team.to_owned()).into_response(),
        },
    };
    let filter = LogFilter {
        team,
        record_id: record,
        object_type,
        after_seq: query.after_seq.unwrap_or(0),
    };
    Json(sim.applied_log(filter)).into_response()
}

pub(crate) async fn record(
    State(sim): State<Arc<Shared>>,
    Path((object_type, id)): Path<(String, String)>,
    Query(query): Query<TeamQuery>,
) -> Result<Response, UnknownTeam> {
    let team = query.or_primary(&sim)?;
    let Ok(object_type) = object_type.parse::<ObjectType>() else {
        return Ok(not_found_json("unknown object type"));
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return Ok(bad_request("id must be a UUID"));
    };
    Ok(match sim.record(team, object_type, id) {
        Some(record) => Json(record).into_response(),
        None => not_found_json("no such record"),
    })
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

pub(crate) async fn seed_records(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
    body: Bytes,
) -> Result<Response, UnknownTeam> {
    let team = query.or_primary(&sim)?;
    let seeds = match parse::<SeedBody>(&body) {
        Ok(SeedBody::Many(seeds)) => seeds,
        Ok(SeedBody::One(seed)) => vec![seed],
        Err(message) => return Ok(bad_request(&message)),
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
            sim.seed_record(team, seed.object_type, seed.id, body)
        })
        .collect();
    Ok((StatusCode::CREATED, Json(seeded)).into_response())
}

pub(crate) async fn get_faults(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
) -> Result<Response, UnknownTeam> {
    Ok(match query.resolve(&sim)? {
        None => Json(sim.faults().profile.clone()).into_response(),
        Some(team) => match sim.team_faults(team) {
            Some(faults) => Json(faults.profile.clone()).into_response(),
            None => not_found_json(&format!(
                "Team {} has no fault profile of its own; the global one applies.",
                sim.team_name(team)
            )),
        },
    })
}

pub(crate) async fn put_faults(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
    body: Bytes,
) -> Result<Response, UnknownTeam> {
    let team = query.resolve(&sim)?;
    let profile = match parse::<FaultProfile>(&body) {
        Ok(profile) => profile,
        Err(message) => return Ok(bad_request(&message)),
    };
    if let Err(err) = profile.validate() {
        return Ok(bad_request(&err.to_string()));
    }
    match team {
        None => sim.set_faults(profile.clone()),
        Some(team) => sim.set_team_faults(team, Some(profile.clone())),
    }
    Ok(Json(profile).into_response())
}

pub(crate) async fn delete_faults(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
) -> Result<Response, UnknownTeam> {
    match query.resolve(&sim)? {
        None => sim.set_faults(FaultProfile::default()),
        Some(team) => sim.set_team_faults(team, None),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyBody {
    api_key: String,
}

pub(crate) async fn put_api_key(
    State(sim): State<Arc<Shared>>,
    Query(query): Query<TeamQuery>,
    body: Bytes,
) -> Result<Response, UnknownTeam> {
    let team = query.or_primary(&sim)?;
    Ok(match parse::<ApiKeyBody>(&body) {
        Ok(ApiKeyBody { api_key }) => {
            sim.set_api_key(team, &api_key);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => bad_request(&message),
    })
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
