//! The simulator through real HTTP: every rule of the bulk update and delete API, teams and their keys,
//! and every fault it can inject.
//!
//! Each test starts its own simulator on port 0 and talks to it with reqwest, as prism-sync will.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prism_sync::sim::{
    FaultKind, FaultProfile, ObjectType, Operation, SimConfig, SimHandle, SimTeam, SimulateArgs,
    Simulator, UnknownTeam,
};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use uuid::Uuid;

struct Api {
    sim: SimHandle,
    http: reqwest::Client,
}

/// A complete answer: status, headers and the exact body bytes.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A malformed body's answer: 400 with `invalid_json` or `invalid_request`.
    fn assert_body_refused(&self, body: &[u8]) {
        assert_eq!(
            self.status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(["invalid_json", "invalid_request"].contains(&self.error_code().as_str()));
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn is_replay(&self) -> bool {
        self.header("idempotent-replay") == Some("true")
    }
}

async fn start(config: SimConfig) -> Api {
    let sim = Simulator::start(config, "127.0.0.1:0".parse().expect("address"))
        .await
        .expect("simulator starts");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    Api { sim, http }
}

async fn start_default() -> Api {
    start(SimConfig::default()).await
}

fn with_faults(faults: FaultProfile) -> SimConfig {
    SimConfig {
        faults,
        ..SimConfig::default()
    }
}

fn item(id: Uuid, default: Value) -> Value {
    json!({"id": id.to_string(), "default": default})
}

/// `n` items with fresh ids, each setting `n` to its position.
fn fresh_items(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| item(Uuid::new_v4(), json!({"n": i})))
        .collect()
}

fn body(items: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "items": items })).expect("serialises")
}

fn delete_body(ids: &[Uuid]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "ids": ids })).expect("serialises")
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["id"].as_str().expect("id").to_owned())
        .collect()
}

fn result_ids(answer: &Answer) -> Vec<Option<String>> {
    answer.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

impl Api {
    fn update_url(&self, team: &str, object_type: &str) -> String {
        format!(
            "{}/v2/prism/{team}/{object_type}/batch/update",
            self.sim.base_url()
        )
    }

    fn admin_url(&self, path: &str) -> String {
        format!("{}/_sim/{path}", self.sim.base_url())
    }

    fn request(
        &self,
        object_type: &str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(self.update_url(self.sim.team_id(), object_type))
            .header("x-api-key", "sim-key")
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request completes");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body completes");
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, key: Option<&str>, body: Vec<u8>) -> Answer {
        self.send(self.request("contact", key, body)).await
    }

    async fn update(&self, key: Option<&str>, items: &[Value]) -> Answer {
        self.post(key, self::body(items)).await
    }

    async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin request");
        assert!(
            response.status().is_success(),
            "GET /_sim/{path}: {}",
            response.status()
        );
        serde_json::from_slice(&response.bytes().await.expect("admin body")).expect("admin json")
    }

    async fn admin_send(&self, method: reqwest::Method, path: &str, body: Value) -> StatusCode {
        self.http
            .request(method, self.admin_url(path))
            .body(serde_json::to_vec(&body).expect("serialises"))
            .send()
            .await
            .expect("admin request")
            .status()
    }

    /// A batch request to any team's endpoint with any key.
    fn batch_request(
        &self,
        team: &str,
        api_key: &str,
        operation: &str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let url = format!(
            "{}/v2/prism/{team}/contact/batch/{operation}",
            self.sim.base_url()
        );
        let mut request = self
            .http
            .post(url)
            .header("x-api-key", api_key)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request
    }

    /// `batch/delete` of the primary team's contacts.
    async fn delete_raw(&self, key: Option<&str>, body: Vec<u8>) -> Answer {
        let team = self.sim.team_id().to_owned();
        self.send(self.batch_request(&team, "sim-key", "delete", key, body))
            .await
    }

    async fn delete(&self, key: Option<&str>, ids: &[Uuid]) -> Answer {
        self.delete_raw(key, delete_body(ids)).await
    }

    fn applied_ids(&self) -> Vec<String> {
        self.sim
            .applied_log()
            .iter()
            .map(|change| change.record_id.to_string())
            .collect()
    }
}

// --- the API's rules -------------------------------------------------------------------------------

#[tokio::test]
async fn a_batch_is_applied_and_each_item_answered_with_its_record() {
    let api = start_default().await;
    let items = fresh_items(3);
    let answer = api.update(Some("k-1"), &items).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("idempotent-replay"), None);
    let json = answer.json();
    assert_eq!(
        json["summary"],
        json!({"total": 3, "succeeded": 3, "failed": 0})
    );
    for (result, sent) in json["results"]
        .as_array()
        .expect("results")
        .iter()
        .zip(&items)
    {
        assert_eq!(result["id"], sent["id"]);
        assert_eq!(result["status"], "ok");
        assert!(result.get("error").is_none());
        assert_eq!(result["record"]["id"], sent["id"]);
        assert_eq!(result["record"]["default"], sent["default"]);
    }
    let log = api.sim.applied_log();
    assert_eq!(log.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(api.applied_ids(), ids(&items));
    assert_eq!(log[0].item, items[0]);
    assert_eq!(log[0].idempotency_key.as_deref(), Some("k-1"));
    assert_eq!(log[0].object_type, ObjectType::Contact);
}

#[tokio::test]
async fn every_object_type_has_the_endpoint_and_others_are_404() {
    let api = start_default().await;
    for object_type in ObjectType::ALL {
        let answer = api
            .send(api.request(object_type.as_str(), None, body(&fresh_items(1))))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{object_type}");
    }
    let answer = api
        .send(api.request("invoice", None, body(&fresh_items(1))))
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.error_code(), "not_found");
    let log = api.sim.applied_log();
    let types: HashSet<ObjectType> = log.iter().map(|c| c.object_type).collect();
    assert_eq!(types.len(), 7);
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_gets_401_with_a_json_error() {
    let api = start_default().await;
    let url = api.update_url(api.sim.team_id(), "contact");
    let no_key = api
        .send(api.http.post(&url).body(body(&fresh_items(1))))
        .await;
    let wrong_key = api
        .send(
            api.http
                .post(&url)
                .header("x-api-key", "not-the-key")
                .body(body(&fresh_items(1))),
        )
        .await;
    for answer in [no_key, wrong_key] {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(answer.error_code(), "unauthorized");
        assert!(answer.json()["error"]["message"].is_string());
    }
    assert!(api.sim.applied_log().is_empty());
}

#[tokio::test]
async fn an_unknown_team_gets_404() {
    let api = start_default().await;
    let url = api.update_url("11111111-1111-4111-8111-111111111111", "contact");
    let answer = api
        .send(
            api.http
                .post(url)
                .header("x-api-key", "sim-key")
                .body(body(&fresh_items(1))),
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.error_code(), "team_not_found");
}

#[tokio::test]
async fn a_team_id_matches_in_any_case() {
    let api = start_default().await;
    let url = api.update_url(&api.sim.team_id().to_uppercase(), "contact");
    let answer = api
        .send(
            api.http
                .post(url)
                .header("x-api-key", "sim-key")
                .body(body(&fresh_items(1))),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn a_batch_of_none_or_of_101_items_is_refused_with_400() {
    let api = start_default().await;
    assert_eq!(
        api.update(None, &fresh_items(100)).await.status,
        StatusCode::OK
    );
    for n in [0, 101] {
        let answer = api.update(None, &fresh_items(n)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{n} items");
        assert_eq!(answer.error_code(), "invalid_request");
    }
    assert_eq!(api.sim.applied_log().len(), 100);
}

#[tokio::test]
async fn a_body_that_is_not_an_items_object_is_refused_with_400() {
    let api = start_default().await;
    let bodies: [&[u8]; 6] = [
        b"not json",
        b"[]",
        b"[[{\"id\": \"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e\"}]]",
        b"{\"records\": []}",
        b"{\"items\": {\"id\": \"x\"}}",
        b"",
    ];
    for bad in bodies {
        api.post(None, bad.to_vec()).await.assert_body_refused(bad);
    }
}

#[tokio::test]
async fn a_body_over_16_mib_is_refused_with_413() {
    let api = start_default().await;
    let mut huge = b"{\"items\": [{\"id\": \"".to_vec();
    huge.resize(17 * 1024 * 1024, b'x');
    let answer = api.post(None, huge).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.error_code(), "payload_too_large");
}

#[tokio::test]
async fn an_item_whose_id_is_not_a_uuid_gets_a_null_id_and_the_rest_still_apply() {
    let api = start_default().await;
    let good = Uuid::new_v4();
    let items = vec![
        json!({"id": "not-a-uuid", "default": {"a": 1}}),
        item(good, json!({"a": 2})),
        json!({"default": {"a": 3}}),
        json!(42),
        json!({"id": Uuid::new_v4().to_string(), "nonsense": true}),
        json!({"id": Uuid::new_v4().to_string(), "default": "flat"}),
    ];
    let answer = api.update(None, &items).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    let results = json["results"].as_array().expect("results");
    let codes: Vec<&str> = results
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        codes,
        [
            "invalid_id",
            "-",
            "invalid_id",
            "validation_error",
            "invalid_property",
            "validation_error"
        ]
    );
    assert_eq!(results[0]["id"], Value::Null);
    assert_eq!(results[0]["status"], "error");
    assert!(results[0]["error"]["message"].is_string());
    assert!(results[0].get("record").is_none());
    assert_eq!(results[1]["status"], "ok");
    assert_eq!(results[2]["id"], Value::Null);
    assert_eq!(results[3]["id"], Value::Null);
    assert_eq!(results[4]["id"], items[4]["id"]);
    assert_eq!(
        json["summary"],
        json!({"total": 6, "succeeded": 1, "failed": 5})
    );
    assert_eq!(api.applied_ids(), vec![good.to_string()]);
}

#[tokio::test]
async fn an_item_default_is_merged_into_the_stored_record() {
    let api = start_default().await;
    let id = Uuid::new_v4();
    api.update(
        None,
        &[item(id, json!({"email": "a@example.com", "name": "A"}))],
    )
    .await;
    let answer = api
        .update(None, &[json!({"id": id.to_string(), "default": {"name": "B", "city": "Oslo"}, "list": {"l1": true}})])
        .await;
    let expected = json!({"email": "a@example.com", "name": "B", "city": "Oslo"});
    assert_eq!(answer.json()["results"][0]["record"]["default"], expected);
    assert_eq!(
        answer.json()["results"][0]["record"]["list"],
        json!({"l1": true})
    );
    let record = api
        .sim
        .record(ObjectType::Contact, id)
        .expect("record exists");
    assert_eq!(record["default"], expected);
    assert_eq!(
        api.admin_get(&format!("records/contact/{id}")).await,
        record
    );
    assert!(api.sim.record(ObjectType::Deal, id).is_none());
    let history = api.sim.applied_to(ObjectType::Contact, id);
    assert_eq!(history.len(), 2);
    assert!(history[0].seq < history[1].seq);
    assert_eq!(history[1].item["default"]["name"], "B");
}

#[tokio::test]
async fn strict_mode_answers_not_found_for_unseeded_ids_and_applies_seeded_ones() {
    let api = start(SimConfig {
        implicit_records: false,
        ..SimConfig::default()
    })
    .await;
    let seeded_by_api = Uuid::new_v4();
    let seeded_by_http = Uuid::new_v4();
    let unknown = Uuid::new_v4();
    api.sim.seed_record(
        ObjectType::Contact,
        seeded_by_api,
        json!({"old": 1}).as_object().cloned().expect("object"),
    );
    let status = api
        .admin_send(
            reqwest::Method::POST,
            "records",
            json!([{"id": seeded_by_http.to_string(), "default": {"old": 2}}]),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let items = [
        item(seeded_by_api, json!({"new": 1})),
        item(unknown, json!({"new": 2})),
        item(seeded_by_http, json!({"new": 3})),
    ];
    let json = api.update(None, &items).await.json();
    assert_eq!(json["results"][0]["status"], "ok");
    assert_eq!(
        json["results"][0]["record"]["default"],
        json!({"old": 1, "new": 1})
    );
    assert_eq!(json["results"][1]["status"], "error");
    assert_eq!(json["results"][1]["id"], unknown.to_string());
    assert_eq!(json["results"][1]["error"]["code"], "not_found");
    assert_eq!(
        json["results"][2]["record"]["default"],
        json!({"old": 2, "new": 3})
    );
    assert!(api.sim.record(ObjectType::Contact, unknown).is_none());
    assert_eq!(
        api.applied_ids(),
        vec![seeded_by_api.to_string(), seeded_by_http.to_string()]
    );
}

// --- idempotency -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_repeated_key_is_replayed_byte_for_byte_and_applies_nothing_again() {
    let api = start_default().await;
    let items = fresh_items(5);
    let first = api.update(Some("replay-me"), &items).await;
    let second = api.update(Some("replay-me"), &items).await;

    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.is_replay());
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.is_replay());
    assert_eq!(second.header("content-type"), Some("application/json"));
    assert_eq!(first.body, second.body);
    assert_eq!(api.sim.applied_log().len(), 5);
    let stats = api.sim.stats();
    assert_eq!(stats.replays, 1);
    assert_eq!(stats.items_applied, 5);
}

#[tokio::test]
async fn a_validation_400_is_replayed_under_its_key_too() {
    let api = start_default().await;
    let first = api
        .post(Some("bad-body"), b"{\"items\": []}".to_vec())
        .await;
    let second = api
        .post(Some("bad-body"), b"{\"items\": []}".to_vec())
        .await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST);
    assert_eq!(second.status, StatusCode::BAD_REQUEST);
    assert!(second.is_replay());
    assert_eq!(first.body, second.body);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_a_409_mismatch() {
    let api = start_default().await;
    let items = fresh_items(2);
    api.update(Some("k"), &items).await;
    // The same JSON with other whitespace is other bytes: a mismatch, as with the real API.
    let respaced = serde_json::to_vec_pretty(&json!({ "items": items })).expect("serialises");
    for other in [body(&fresh_items(2)), respaced] {
        let answer = api.post(Some("k"), other).await;
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert_eq!(answer.error_code(), "idempotency_key_mismatch");
    }
    let elsewhere = api.send(api.request("deal", Some("k"), body(&items))).await;
    assert_eq!(elsewhere.error_code(), "idempotency_key_mismatch");
    assert_eq!(api.sim.applied_log().len(), 2);
    assert_eq!(api.sim.stats().idempotency_mismatches, 3);
}

#[tokio::test]
async fn a_retry_while_the_first_request_still_runs_gets_409_in_use() {
    let api = start(with_faults(FaultProfile {
        latency: Duration::from_millis(400),
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(3);
    let first = tokio::spawn(api.request("contact", Some("busy"), body(&items)).send());
    let deadline = Instant::now() + Duration::from_secs(5);
    while api.sim.stats().idempotency_keys_in_progress == 0 {
        assert!(
            Instant::now() < deadline,
            "the first request never took its key"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = api.update(Some("busy"), &items).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.error_code(), "idempotency_key_in_use");

    let first = first.await.expect("joins").expect("first completes");
    assert_eq!(first.status(), StatusCode::OK);
    let third = api.update(Some("busy"), &items).await;
    assert!(third.is_replay());
    assert_eq!(api.sim.applied_log().len(), 3);
    assert_eq!(api.sim.stats().idempotency_in_progress, 1);
}

#[tokio::test]
async fn slow_work_holds_the_key_so_a_resend_gets_409_in_use_without_waiting_it() {
    let api = start(with_faults(FaultProfile {
        slow_work_rate: 1.0,
        slow_work: Duration::from_secs(2),
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(3);
    let timed_out = api
        .request("contact", Some("slow-work"), body(&items))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(timed_out.expect_err("the client gives up").is_timeout());
    // The re-send is answered while the first request still works: it does no work, so it
    // does not wait the slow work out.
    let resent = api.update(Some("slow-work"), &items).await;
    assert_eq!(resent.status, StatusCode::CONFLICT);
    assert_eq!(resent.error_code(), "idempotency_key_in_use");
    assert_eq!(api.sim.stats().idempotency_keys_in_progress, 1);
    assert!(api.sim.applied_log().is_empty());

    let deadline = Instant::now() + Duration::from_secs(10);
    while api.sim.stats().idempotency_keys_in_progress > 0 {
        assert!(Instant::now() < deadline, "the slow work never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replayed = api.update(Some("slow-work"), &items).await;
    assert!(replayed.is_replay());
    assert_eq!(replayed.json()["summary"]["succeeded"], 3);
    assert_eq!(api.sim.applied_log().len(), 3);
    let stats = api.sim.stats();
    assert_eq!(stats.faults(FaultKind::SlowWork), 1, "only the work waits");
    assert_eq!(stats.idempotency_in_progress, 1);
    // The log says when each request arrived besides when it was answered: the slow one was
    // sent first and answered after the re-send it made wait.
    let parse = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
    };
    let log = api.sim.requests();
    let slow = log
        .iter()
        .find(|r| r.faults.iter().any(|f| f == "slow_work"))
        .expect("the slow request is logged");
    let in_use = log
        .iter()
        .find(|r| r.status == 409)
        .expect("the 409 is logged");
    assert!(
        parse(&slow.at) - parse(&slow.received_at) >= time::Duration::seconds(2),
        "{slow:?}"
    );
    assert!(
        parse(&slow.received_at) <= parse(&in_use.received_at),
        "{log:?}"
    );
    assert!(parse(&slow.at) > parse(&in_use.at), "{log:?}");
    api.sim.shutdown().await;
}

#[tokio::test]
async fn a_key_is_forgotten_after_its_ttl() {
    let api = start(SimConfig {
        idempotency_ttl: Duration::from_millis(150),
        ..SimConfig::default()
    })
    .await;
    let items = fresh_items(1);
    api.update(Some("short"), &items).await;
    assert!(api.update(Some("short"), &items).await.is_replay());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = api.update(Some("short"), &items).await;
    assert!(!after.is_replay());
    assert_eq!(api.sim.applied_log().len(), 2);
}

#[tokio::test]
async fn an_empty_or_overlong_idempotency_key_is_refused_with_400() {
    let api = start_default().await;
    for key in [String::new(), "k".repeat(256)] {
        let answer = api.update(Some(&key), &fresh_items(1)).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "key of {} chars",
            key.len()
        );
        assert_eq!(answer.error_code(), "invalid_idempotency_key");
    }
    let longest = api.update(Some(&"k".repeat(255)), &fresh_items(1)).await;
    assert_eq!(longest.status, StatusCode::OK);
    assert!(api.sim.applied_log().len() == 1);
}

#[tokio::test]
async fn requests_without_a_key_are_applied_every_time() {
    let api = start_default().await;
    let items = fresh_items(1);
    api.update(None, &items).await;
    let again = api.update(None, &items).await;
    assert!(!again.is_replay());
    assert_eq!(api.sim.applied_log().len(), 2);
}

// --- request-level faults --------------------------------------------------------------------------

#[tokio::test]
async fn an_injected_500_or_503_applies_nothing_and_is_not_cached() {
    for (profile, status, code) in [
        (
            FaultProfile {
                error_500_rate: 1.0,
                ..FaultProfile::default()
            },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
        ),
        (
            FaultProfile {
                error_503_rate: 1.0,
                retry_after: Some(3),
                ..FaultProfile::default()
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        ),
    ] {
        let api = start(with_faults(profile)).await;
        let items = fresh_items(2);
        let answer = api.update(Some("k"), &items).await;
        assert_eq!(answer.status, status);
        assert_eq!(answer.error_code(), code);
        assert!(api.sim.applied_log().is_empty());

        api.sim.set_faults(FaultProfile::default());
        let retry = api.update(Some("k"), &items).await;
        assert_eq!(retry.status, StatusCode::OK);
        assert!(!retry.is_replay());
        assert_eq!(api.sim.applied_log().len(), 2);
    }
}

#[tokio::test]
async fn an_injected_429_carries_retry_after_and_retry_after_ms() {
    let api = start(with_faults(FaultProfile {
        rate_limit_rate: 1.0,
        retry_after: Some(2),
        retry_after_ms: Some(1500),
        should_retry: Some(true),
        ..FaultProfile::default()
    }))
    .await;
    let answer = api.update(None, &fresh_items(1)).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.error_code(), "rate_limited");
    assert_eq!(answer.header("retry-after"), Some("2"));
    assert_eq!(answer.header("retry-after-ms"), Some("1500"));
    assert_eq!(answer.header("x-should-retry"), Some("true"));
    assert_eq!(api.sim.stats().faults(FaultKind::RateLimit), 1);
}

#[tokio::test]
async fn x_should_retry_false_can_be_sent_with_an_injected_error() {
    let api = start(with_faults(FaultProfile {
        error_500_rate: 1.0,
        should_retry: Some(false),
        ..FaultProfile::default()
    }))
    .await;
    let answer = api.update(None, &fresh_items(1)).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.header("x-should-retry"), Some("false"));
    assert_eq!(answer.header("retry-after"), None);
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let api = start(with_faults(FaultProfile {
        latency: Duration::from_millis(100),
        latency_jitter: Duration::from_millis(50),
        ..FaultProfile::default()
    }))
    .await;
    let started = Instant::now();
    let answer = api.update(None, &fresh_items(1)).await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(took >= Duration::from_millis(100), "took {took:?}");
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert_eq!(api.sim.stats().faults(FaultKind::Latency), 1);
}

// --- faults after apply ----------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_answer_outlasts_the_client_but_the_work_is_done_and_replayed() {
    let api = start(with_faults(FaultProfile {
        slow_response_rate: 1.0,
        slow_response: Duration::from_secs(3),
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(4);
    let timed_out = api
        .request("contact", Some("slow"), body(&items))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(timed_out.expect_err("the client gives up").is_timeout());
    assert_eq!(api.applied_ids(), ids(&items));

    api.sim.set_faults(FaultProfile::default());
    let retry = api.update(Some("slow"), &items).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.is_replay());
    assert_eq!(retry.json()["summary"]["succeeded"], 4);
    assert_eq!(api.sim.applied_log().len(), 4);
    assert_eq!(api.sim.stats().faults(FaultKind::SlowResponse), 1);
    api.sim.shutdown().await;
}

#[tokio::test]
async fn a_connection_dropped_after_apply_gives_no_response_but_the_retry_replays() {
    let api = start(with_faults(FaultProfile {
        drop_after_apply_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(3);
    let dropped = async {
        let response = api
            .request("contact", Some("dropped"), body(&items))
            .send()
            .await?;
        response.bytes().await
    }
    .await;
    assert!(
        dropped.is_err(),
        "expected a transport error, got {dropped:?}"
    );
    assert_eq!(api.applied_ids(), ids(&items));

    api.sim.set_faults(FaultProfile::default());
    let retry = api.update(Some("dropped"), &items).await;
    assert!(retry.is_replay());
    assert_eq!(retry.json()["summary"]["succeeded"], 3);
    assert_eq!(api.sim.applied_log().len(), 3);
    assert_eq!(api.sim.stats().faults(FaultKind::DropAfterApply), 1);
}

#[tokio::test]
async fn a_truncated_200_is_cut_mid_json_but_the_replay_is_whole() {
    let api = start(with_faults(FaultProfile {
        truncated_body_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(10);
    let cut = api.update(Some("cut"), &items).await;
    assert_eq!(cut.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&cut.body).is_err());
    assert!(!cut.body.is_empty());

    // The network can cut a replay too (at another point); the cache underneath is whole.
    let cut_again = api.update(Some("cut"), &items).await;
    assert!(cut_again.is_replay());
    assert!(serde_json::from_slice::<Value>(&cut_again.body).is_err());

    api.sim.set_faults(FaultProfile::default());
    let whole = api.update(Some("cut"), &items).await;
    assert!(whole.is_replay());
    // The replay is the same response with the wire fault undone: the cut body is its prefix.
    assert!(whole.body.starts_with(&cut.body));
    assert!(whole.body.len() > cut.body.len());
    assert_eq!(whole.json()["summary"]["succeeded"], 10);
    assert_eq!(api.sim.applied_log().len(), 10);
    assert_eq!(api.sim.stats().faults(FaultKind::TruncatedBody), 2);
}

#[tokio::test]
async fn a_non_json_200_is_on_the_wire_only() {
    let api = start(with_faults(FaultProfile {
        non_json_body_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(2);
    let garbled = api.update(Some("html"), &items).await;
    assert_eq!(garbled.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&garbled.body).is_err());
    api.sim.set_faults(FaultProfile::default());
    let replay = api.update(Some("html"), &items).await;
    assert!(replay.is_replay());
    assert_eq!(replay.json()["summary"]["succeeded"], 2);
    assert_eq!(api.sim.applied_log().len(), 2);
}

#[tokio::test]
async fn a_200_missing_results_leaves_those_items_unapplied_and_replays_the_omission() {
    let api = start(with_faults(FaultProfile {
        missing_results_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(10);
    let first = api.update(Some("holes"), &items).await;
    assert_eq!(first.status, StatusCode::OK);
    let answered: Vec<String> = result_ids(&first).into_iter().flatten().collect();
    assert!(
        answered.len() < 10 && answered.len() >= 5,
        "{} answered",
        answered.len()
    );
    assert_eq!(
        api.applied_ids(),
        answered,
        "only answered items are applied"
    );
    assert_eq!(first.json()["summary"]["total"], 10);

    api.sim.set_faults(FaultProfile::default());
    let replay = api.update(Some("holes"), &items).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(api.sim.stats().faults(FaultKind::MissingResults), 1);
}

#[tokio::test]
async fn a_200_can_carry_a_duplicate_result() {
    let api = start(with_faults(FaultProfile {
        duplicate_result_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(4);
    let answer = api.update(None, &items).await;
    let answered = result_ids(&answer);
    assert_eq!(answered.len(), 5);
    let distinct: HashSet<_> = answered.iter().collect();
    assert_eq!(distinct.len(), 4);
    assert_eq!(api.sim.applied_log().len(), 4);
}

#[tokio::test]
async fn a_200_can_carry_a_result_for_an_id_that_was_not_sent() {
    let api = start(with_faults(FaultProfile {
        unknown_result_id_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let items = fresh_items(3);
    let answer = api.update(None, &items).await;
    let sent: HashSet<String> = ids(&items).into_iter().collect();
    let strangers: Vec<String> = result_ids(&answer)
        .into_iter()
        .flatten()
        .filter(|id| !sent.contains(id))
        .collect();
    assert_eq!(strangers.len(), 1);
    assert!(Uuid::parse_str(&strangers[0]).is_ok());
    assert_eq!(api.sim.applied_log().len(), 3);
}

#[tokio::test]
async fn a_200_can_carry_a_summary_that_disagrees_with_its_results() {
    let api = start(with_faults(FaultProfile {
        wrong_summary_rate: 1.0,
        ..FaultProfile::default()
    }))
    .await;
    let json = api.update(None, &fresh_items(3)).await.json();
    let ok = json["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|r| r["status"] == "ok")
        .count();
    assert_eq!(ok, 3);
    assert_ne!(json["summary"]["succeeded"], 3);
}

// --- item-level faults -----------------------------------------------------------------------------

#[tokio::test]
async fn injected_item_errors_use_the_listed_codes_and_apply_nothing() {
    let api = start(with_faults(FaultProfile {
        item_error_rate: 1.0,
        item_error_codes: vec!["rate_limited".into(), "validation_error".into()],
        ..FaultProfile::default()
    }))
    .await;
    let json = api.update(None, &fresh_items(20)).await.json();
    let codes: HashSet<&str> = json["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "error");
            assert!(r["id"].is_string());
            r["error"]["code"].as_str().expect("code")
        })
        .collect();
    assert_eq!(codes, HashSet::from(["rate_limited", "validation_error"]));
    assert_eq!(
        json["summary"],
        json!({"total": 20, "succeeded": 0, "failed": 20})
    );
    assert!(api.sim.applied_log().is_empty());
    assert_eq!(api.sim.stats().faults(FaultKind::ItemError), 20);
}

#[tokio::test]
async fn an_item_error_rate_fails_about_that_share_of_items() {
    let api = start(with_faults(FaultProfile {
        item_error_rate: 0.3,
        ..FaultProfile::default()
    }))
    .await;
    let json = api.update(None, &fresh_items(100)).await.json();
    let failed = json["summary"]["failed"].as_u64().expect("failed");
    assert!((10..=50).contains(&failed), "{failed} of 100 failed");
    assert_eq!(api.sim.applied_log().len() as u64, 100 - failed);
}

#[tokio::test]
async fn a_chosen_id_always_fails_with_its_code() {
    let target = Uuid::new_v4();
    let api = start(with_faults(FaultProfile {
        item_errors_for_ids: [(target.to_string().to_uppercase(), "locked".to_owned())].into(),
        ..FaultProfile::default()
    }))
    .await;
    for _ in 0..2 {
        let mut items = fresh_items(2);
        items.insert(1, item(target, json!({"x": 1})));
        let json = api.update(None, &items).await.json();
        assert_eq!(json["results"][1]["id"], target.to_string());
        assert_eq!(json["results"][1]["error"]["code"], "locked");
        assert_eq!(json["results"][0]["status"], "ok");
        assert_eq!(json["results"][2]["status"], "ok");
    }
    assert!(!api.applied_ids().contains(&target.to_string()));
    assert_eq!(api.sim.applied_log().len(), 4);
}

#[tokio::test]
async fn a_poison_item_fails_its_whole_batch_with_400_or_413() {
    let poison = Uuid::new_v4();
    for status in [400, 413] {
        let api = start(with_faults(FaultProfile {
            poison_ids: vec![poison.to_string()],
            poison_status: status,
            ..FaultProfile::default()
        }))
        .await;
        let mut items = fresh_items(5);
        items.push(item(poison, json!({})));
        let answer = api.update(Some("poisoned"), &items).await;
        assert_eq!(answer.status.as_u16(), status);
        assert!(answer.json()["error"]["code"].is_string());
        assert!(api.sim.applied_log().is_empty());

        let clean = api.update(None, &items[..5]).await;
        assert_eq!(clean.status, StatusCode::OK);
        assert_eq!(api.sim.applied_log().len(), 5);
        assert_eq!(api.sim.stats().faults(FaultKind::Poison), 1);
    }
}

// --- batch/delete ----------------------------------------------------------------------------------

#[tokio::test]
async fn a_delete_removes_existing_records_and_is_logged_as_a_delete() {
    let api = start_default().await;
    let items = fresh_items(3);
    api.update(Some("create"), &items).await;
    let [a, b, c]: [Uuid; 3] = ids(&items)
        .iter()
        .map(|id| Uuid::parse_str(id).expect("uuid"))
        .collect::<Vec<_>>()
        .try_into()
        .expect("three ids");

    let answer = api.delete(Some("del-1"), &[a, c]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(
        answer.json(),
        json!({
            "results": [
                {"id": a.to_string(), "status": "ok"},
                {"id": c.to_string(), "status": "ok"}
            ],
            "summary": {"total": 2, "succeeded": 2, "failed": 0}
        })
    );
    assert!(api.sim.record(ObjectType::Contact, a).is_none());
    assert!(api.sim.record(ObjectType::Contact, b).is_some());
    assert!(api.sim.record(ObjectType::Contact, c).is_none());

    let log = api.sim.applied_log();
    assert_eq!(log.len(), 5);
    assert_eq!(
        log.iter().map(|change| change.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(log[..3].iter().all(|c| c.operation == Operation::Update));
    for (change, id) in log[3..].iter().zip([a, c]) {
        assert_eq!(change.operation, Operation::Delete);
        assert_eq!(change.record_id, id);
        assert_eq!(change.item, Value::Null, "a delete carries no patch");
        assert_eq!(change.idempotency_key.as_deref(), Some("del-1"));
        assert_eq!(change.team, api.sim.team_id());
        assert_eq!(change.object_type, ObjectType::Contact);
    }
    let history = api.sim.applied_to(ObjectType::Contact, a);
    assert_eq!(
        history.iter().map(|c| c.operation).collect::<Vec<_>>(),
        [Operation::Update, Operation::Delete]
    );

    let over_http = api.admin_get(&format!("applied?record={a}")).await;
    assert_eq!(over_http[0]["operation"], "update");
    assert_eq!(over_http[1]["operation"], "delete");
    assert_eq!(over_http[1]["item"], Value::Null);
    assert_eq!(over_http[1]["seq"], 4);
    assert_eq!(over_http[1]["team"], api.sim.team_id());

    let stats = api.sim.stats();
    assert_eq!(stats.items_applied, 5);
    assert_eq!(stats.records, 1);
    let requests = api.sim.requests();
    assert_eq!(requests[1].operation, Operation::Delete);
    assert_eq!(requests[1].items, 2);
    assert_eq!(requests[1].team.as_deref(), Some(api.sim.team_id()));
    assert!(requests[1].path.ends_with("/contact/batch/delete"));
    assert_eq!(requests[0].operation, Operation::Update);
}

#[tokio::test]
async fn deleting_a_record_that_does_not_exist_is_not_found_and_not_logged() {
    let api = start_default().await;
    let existing = Uuid::new_v4();
    let never = Uuid::new_v4();
    api.update(None, &[item(existing, json!({"a": 1}))]).await;

    // The second mention of `existing` finds it already gone.
    let json = api.delete(None, &[never, existing, existing]).await.json();
    let codes: Vec<&str> = json["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(codes, ["not_found", "-", "not_found"]);
    assert_eq!(json["results"][0]["id"], never.to_string());
    assert_eq!(json["results"][0]["status"], "error");
    assert!(json["results"][0]["error"]["message"].is_string());
    assert_eq!(json["results"][2]["id"], existing.to_string());
    assert_eq!(
        json["summary"],
        json!({"total": 3, "succeeded": 1, "failed": 2})
    );
    let again = api.delete(None, &[existing]).await.json();
    assert_eq!(again["results"][0]["error"]["code"], "not_found");

    let log = api.sim.applied_log();
    assert_eq!(
        log.len(),
        2,
        "one update and one delete: not_found is not applied"
    );
    assert_eq!(log[1].operation, Operation::Delete);
    assert_eq!(api.sim.stats().items_failed, 3);
}

#[tokio::test]
async fn a_delete_checks_its_body_and_ids_like_an_update() {
    let api = start_default().await;
    let good = Uuid::new_v4();
    api.update(None, &[item(good, json!({}))]).await;
    let answer = api
        .delete_raw(
            None,
            serde_json::to_vec(&json!({"ids": ["not-a-uuid", good.to_string(), 42]}))
                .expect("serialises"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    let results = json["results"].as_array().expect("results");
    assert_eq!(results[0]["id"], Value::Null);
    assert_eq!(results[0]["error"]["code"], "invalid_id");
    assert_eq!(results[1]["status"], "ok");
    assert_eq!(results[2]["id"], Value::Null);
    assert_eq!(results[2]["error"]["code"], "invalid_id");
    assert_eq!(
        json["summary"],
        json!({"total": 3, "succeeded": 1, "failed": 2})
    );

    let bodies: [&[u8]; 6] = [
        b"not json",
        b"[]",
        b"{\"items\": []}",
        b"{\"ids\": \"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e\"}",
        b"{\"ids\": []}",
        b"",
    ];
    for bad in bodies {
        api.delete_raw(None, bad.to_vec())
            .await
            .assert_body_refused(bad);
    }
    let many: Vec<Uuid> = (0..101).map(|_| Uuid::new_v4()).collect();
    let too_many = api.delete(None, &many).await;
    assert_eq!(too_many.status, StatusCode::BAD_REQUEST);
    assert_eq!(too_many.error_code(), "invalid_request");
    let hundred = api.delete(None, &many[..100]).await;
    assert_eq!(hundred.status, StatusCode::OK);
    assert_eq!(hundred.json()["summary"]["failed"], 100);

    let wrong_key = api
        .send(api.batch_request(
            api.sim.team_id(),
            "nope",
            "delete",
            None,
            delete_body(&[good]),
        ))
        .await;
    assert_eq!(wrong_key.status, StatusCode::UNAUTHORIZED);
    for object_type in ObjectType::ALL {
        let url = format!(
            "{}/v2/prism/{}/{object_type}/batch/delete",
            api.sim.base_url(),
            api.sim.team_id()
        );
        let answer = api
            .send(
                api.http
                    .post(url)
                    .header("x-api-key", "sim-key")
                    .body(delete_body(&[Uuid::new_v4()])),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{object_type}");
    }
}

#[tokio::test]
async fn an_update_after_a_delete_starts_a_fresh_record() {
    let api = start_default().await;
    let id = Uuid::new_v4();
    api.update(None, &[item(id, json!({"old": 1}))]).await;
    api.delete(None, &[id]).await;
    let json = api
        .update(None, &[item(id, json!({"new": 2}))])
        .await
        .json();
    assert_eq!(json["results"][0]["status"], "ok");
    assert_eq!(
        json["results"][0]["record"]["default"],
        json!({"new": 2}),
        "nothing of the deleted record survives"
    );
    let history = api.sim.applied_to(ObjectType::Contact, id);
    assert_eq!(
        history.iter().map(|c| c.operation).collect::<Vec<_>>(),
        [Operation::Update, Operation::Delete, Operation::Update]
    );

    // Without implicit records, a deleted id is as unknown as one never seeded.
    let strict = start(SimConfig {
        implicit_records: false,
        ..SimConfig::default()
    })
    .await;
    strict.sim.seed_record(
        ObjectType::Contact,
        id,
        json!({"seeded": true})
            .as_object()
            .cloned()
            .expect("object"),
    );
    assert_eq!(
        strict.delete(None, &[id]).await.json()["results"][0]["status"],
        "ok"
    );
    let after = strict
        .update(None, &[item(id, json!({"x": 1}))])
        .await
        .json();
    assert_eq!(after["results"][0]["error"]["code"], "not_found");
    assert!(strict.sim.record(ObjectType::Contact, id).is_none());
}

#[tokio::test]
async fn a_delete_is_replayed_under_its_key_and_a_key_cannot_change_operation() {
    let api = start_default().await;
    let items = fresh_items(2);
    api.update(None, &items).await;
    let targets: Vec<Uuid> = ids(&items)
        .iter()
        .map(|id| Uuid::parse_str(id).expect("uuid"))
        .collect();

    let first = api.delete(Some("del"), &targets).await;
    let second = api.delete(Some("del"), &targets).await;
    assert!(!first.is_replay());
    assert!(second.is_replay());
    assert_eq!(first.body, second.body, "replayed, not answered not_found");
    assert_eq!(second.json()["summary"]["succeeded"], 2);
    assert_eq!(api.sim.applied_log().len(), 4);

    // The same key for an update (even with the very same bytes) is another request.
    let mismatch = api.update(Some("del"), &items).await;
    assert_eq!(mismatch.status, StatusCode::CONFLICT);
    assert_eq!(mismatch.error_code(), "idempotency_key_mismatch");
    let both = serde_json::to_vec(&json!({"ids": [Uuid::new_v4()], "items": fresh_items(1)}))
        .expect("serialises");
    assert_eq!(
        api.post(Some("both"), both.clone()).await.status,
        StatusCode::OK
    );
    let switched = api.delete_raw(Some("both"), both).await;
    assert_eq!(switched.status, StatusCode::CONFLICT);
    assert_eq!(switched.error_code(), "idempotency_key_mismatch");
    assert_eq!(api.sim.stats().idempotency_mismatches, 2);
    assert_eq!(api.sim.stats().replays, 1);
}

#[tokio::test]
async fn request_and_item_faults_strike_deletes_too() {
    let poison = Uuid::new_v4();
    let locked = Uuid::new_v4();
    let api = start(with_faults(FaultProfile {
        rate_limit_rate: 1.0,
        retry_after: Some(3),
        ..FaultProfile::default()
    }))
    .await;
    let kept = Uuid::new_v4();
    api.sim
        .seed_record(ObjectType::Contact, kept, serde_json::Map::new());
    let limited = api.delete(Some("k"), &[kept]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.error_code(), "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("3"));
    assert!(api.sim.record(ObjectType::Contact, kept).is_some());
    assert_eq!(api.sim.stats().faults(FaultKind::RateLimit), 1);

    api.sim.set_faults(FaultProfile {
        poison_ids: vec![poison.to_string()],
        item_errors_for_ids: [(locked.to_string(), "locked".to_owned())].into(),
        ..FaultProfile::default()
    });
    let refused = api.delete(Some("poisoned"), &[kept, poison]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.json()["error"]["code"].is_string());
    assert!(api.sim.record(ObjectType::Contact, kept).is_some());
    assert_eq!(api.sim.stats().faults(FaultKind::Poison), 1);

    api.sim
        .seed_record(ObjectType::Contact, locked, serde_json::Map::new());
    let json = api.delete(Some("k"), &[locked, kept]).await.json();
    assert_eq!(json["results"][0]["error"]["code"], "locked");
    assert_eq!(json["results"][1]["status"], "ok");
    assert!(api.sim.record(ObjectType::Contact, locked).is_some());
    assert!(api.sim.record(ObjectType::Contact, kept).is_none());
    assert_eq!(api.sim.applied_log().len(), 1);

    api.sim.set_faults(FaultProfile {
        drop_after_apply_rate: 1.0,
        ..FaultProfile::default()
    });
    api.sim
        .seed_record(ObjectType::Contact, kept, serde_json::Map::new());
    let dropped = async {
        let team = api.sim.team_id().to_owned();
        api.batch_request(
            &team,
            "sim-key",
            "delete",
            Some("drop"),
            delete_body(&[kept]),
        )
        .send()
        .await?
        .bytes()
        .await
    }
    .await;
    assert!(dropped.is_err(), "expected a transport error");
    assert!(
        api.sim.record(ObjectType::Contact, kept).is_none(),
        "applied before the drop"
    );
    api.sim.set_faults(FaultProfile::default());
    let retry = api.delete(Some("drop"), &[kept]).await;
    assert!(retry.is_replay());
    assert_eq!(retry.json()["results"][0]["status"], "ok");
}

// --- teams -----------------------------------------------------------------------------------------

const TEAM_B: &str = "00000000-0000-4000-8000-00000000000b";
const TEAM_C: &str = "00000000-0000-4000-8000-00000000000c";

fn three_teams() -> SimConfig {
    SimConfig {
        extra_teams: vec![
            SimTeam {
                team_id: TEAM_B.to_owned(),
                api_key: "key-b".to_owned(),
            },
            SimTeam {
                team_id: TEAM_C.to_owned(),
                api_key: "key-c".to_owned(),
            },
        ],
        ..SimConfig::default()
    }
}

impl Api {
    async fn update_as(&self, team: &str, api_key: &str, items: &[Value]) -> Answer {
        self.send(self.batch_request(team, api_key, "update", None, body(items)))
            .await
    }
}

#[tokio::test]
async fn each_team_has_its_own_key_and_its_own_records() {
    let api = start(three_teams()).await;
    let a = api.sim.team_id().to_owned();
    assert_eq!(api.sim.team_ids(), [a.as_str(), TEAM_B, TEAM_C]);
    let id = Uuid::new_v4();

    let in_a = api
        .update_as(&a, "sim-key", &[item(id, json!({"team": "a"}))])
        .await;
    let in_b = api
        .update_as(
            &TEAM_B.to_uppercase(),
            "key-b",
            &[item(id, json!({"team": "b"}))],
        )
        .await;
    assert_eq!(in_a.status, StatusCode::OK);
    assert_eq!(in_b.status, StatusCode::OK);
    assert_eq!(
        in_b.json()["results"][0]["record"]["default"],
        json!({"team": "b"})
    );

    // A key opens its own team only; a key no team has is still a 401.
    for (team, key) in [
        (TEAM_B, "sim-key"),
        (a.as_str(), "key-b"),
        (TEAM_C, "key-b"),
    ] {
        let answer = api.update_as(team, key, &fresh_items(1)).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{key} on {team}");
        assert_eq!(answer.error_code(), "team_not_found");
    }
    let unknown = api.update_as(TEAM_B, "nobody's", &fresh_items(1)).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let deleted_in_c = api
        .send(api.batch_request(TEAM_C, "key-c", "delete", None, delete_body(&[id])))
        .await;
    assert_eq!(
        deleted_in_c.json()["results"][0]["error"]["code"],
        "not_found",
        "team C has no record {id}"
    );

    assert_eq!(
        api.sim.record(ObjectType::Contact, id).expect("a's")["default"],
        json!({"team": "a"})
    );
    let b_record = api
        .sim
        .record_for_team(TEAM_B, ObjectType::Contact, id)
        .expect("known team")
        .expect("b's");
    assert_eq!(b_record["default"], json!({"team": "b"}));
    assert_eq!(
        api.admin_get(&format!("records/contact/{id}?team={TEAM_B}"))
            .await,
        b_record
    );
    assert_eq!(
        api.admin_get(&format!("records/contact/{id}")).await["default"],
        json!({"team": "a"})
    );
    assert_eq!(
        api.sim
            .record_for_team("no-such-team", ObjectType::Contact, id),
        Err(UnknownTeam("no-such-team".to_owned()))
    );

    // The apply log: the primary team's by default, one team's, or all of them.
    assert_eq!(api.sim.applied_log().len(), 1);
    let b_log = api.sim.applied_log_for_team(TEAM_B).expect("known team");
    assert_eq!(b_log.len(), 1);
    assert_eq!(b_log[0].team, TEAM_B);
    assert_eq!(b_log[0].seq, 2);
    assert_eq!(
        api.admin_get("applied").await.as_array().map(Vec::len),
        Some(1)
    );
    let over_http = api.admin_get(&format!("applied?team={TEAM_B}")).await;
    assert_eq!(over_http[0]["team"], TEAM_B);
    assert_eq!(over_http[0]["item"]["default"], json!({"team": "b"}));
    let all = api.admin_get("applied?team=*").await;
    assert_eq!(all.as_array().map(Vec::len), Some(2));
    assert_eq!(api.sim.applied_log_all_teams().len(), 2);
    let missing = api
        .http
        .get(api.admin_url("applied?team=nope"))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // Statistics: global as before, and per team by the team the path named.
    let global = api.sim.stats();
    assert_eq!(global.requests_total, 7);
    assert_eq!(global.records, 2);
    let b = api.sim.stats_for_team(TEAM_B).expect("known team");
    assert_eq!(b.requests_total, 3, "the update, the 404 and the 401");
    assert_eq!(b.status_count(200), 1);
    assert_eq!(b.status_count(404), 1);
    assert_eq!(b.status_count(401), 1);
    assert_eq!(b.items_applied, 1);
    assert_eq!(b.records, 1);
    let c = api.admin_get(&format!("stats?team={TEAM_C}")).await;
    assert_eq!(c["requests_total"], 2);
    assert_eq!(c["items_failed"], 1);
    assert_eq!(c["records"], 0);
    let requests = api.sim.requests();
    assert_eq!(requests[1].team.as_deref(), Some(TEAM_B));
}

#[tokio::test]
async fn idempotency_keys_are_scoped_per_team() {
    let api = start(three_teams()).await;
    let items = fresh_items(1);
    let a = api.sim.team_id().to_owned();
    let first = api
        .send(api.batch_request(&a, "sim-key", "update", Some("shared"), body(&items)))
        .await;
    let other_team = api
        .send(api.batch_request(TEAM_B, "key-b", "update", Some("shared"), body(&items)))
        .await;
    assert!(!first.is_replay());
    assert!(!other_team.is_replay(), "team B's key space is its own");
    assert_eq!(
        api.sim
            .stats_for_team(TEAM_B)
            .expect("known")
            .idempotency_keys_cached,
        1
    );
    assert_eq!(api.sim.stats().idempotency_keys_cached, 2);
}

#[tokio::test]
async fn revoking_one_teams_key_leaves_the_other_teams_working() {
    let api = start(three_teams()).await;
    let status = api
        .admin_send(
            reqwest::Method::PUT,
            &format!("api-key?team={TEAM_B}"),
            json!({"api_key": "rotated-b"}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let a = api.sim.team_id().to_owned();
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.update_as(TEAM_B, "rotated-b", &fresh_items(1))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.update_as(&a, "sim-key", &fresh_items(1)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        api.update_as(TEAM_C, "key-c", &fresh_items(1)).await.status,
        StatusCode::OK
    );

    api.sim
        .set_api_key_for_team(TEAM_B, "key-b")
        .expect("known team");
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        api.sim.set_api_key_for_team("nope", "x"),
        Err(UnknownTeam("nope".to_owned()))
    );
    let unknown = api
        .admin_send(
            reqwest::Method::PUT,
            "api-key?team=nope",
            json!({"api_key": "x"}),
        )
        .await;
    assert_eq!(unknown, StatusCode::NOT_FOUND);

    // Without `team`, the primary team's key, as before.
    api.admin_send(
        reqwest::Method::PUT,
        "api-key",
        json!({"api_key": "rotated-a"}),
    )
    .await;
    assert_eq!(
        api.update_as(&a, "sim-key", &fresh_items(1)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_revoked_team_a_rate_limited_team_and_a_healthy_team_side_by_side() {
    let api = start(three_teams()).await;
    let a = api.sim.team_id().to_owned();
    api.sim
        .set_api_key_for_team(&a, "revoked")
        .expect("known team");
    let status = api
        .admin_send(
            reqwest::Method::PUT,
            &format!("faults?team={TEAM_B}"),
            json!({"rate_limit_rate": 1.0, "retry_after": 7}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let shown = api.admin_get(&format!("faults?team={TEAM_B}")).await;
    assert_eq!(shown["rate_limit_rate"], 1.0);
    assert_eq!(
        api.sim
            .faults_for_team(TEAM_B)
            .expect("known")
            .map(|p| p.retry_after),
        Some(Some(7))
    );
    assert_eq!(api.sim.faults_for_team(TEAM_C), Ok(None));
    let own = api
        .http
        .get(api.admin_url(&format!("faults?team={TEAM_C}")))
        .send()
        .await
        .expect("request");
    assert_eq!(
        own.status(),
        StatusCode::NOT_FOUND,
        "team C follows the global profile"
    );
    assert_eq!(
        api.sim.faults(),
        FaultProfile::default(),
        "the global profile is untouched"
    );

    for _ in 0..5 {
        let revoked = api.update_as(&a, "sim-key", &fresh_items(1)).await;
        assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
        let limited = api.update_as(TEAM_B, "key-b", &fresh_items(1)).await;
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.header("retry-after"), Some("7"));
        let healthy = api.update_as(TEAM_C, "key-c", &fresh_items(1)).await;
        assert_eq!(healthy.status, StatusCode::OK);
    }
    let b = api.sim.stats_for_team(TEAM_B).expect("known");
    assert_eq!(b.status_count(429), 5);
    assert_eq!(b.faults(FaultKind::RateLimit), 5);
    let c = api.sim.stats_for_team(TEAM_C).expect("known");
    assert_eq!((c.status_count(200), c.items_applied), (5, 5));
    assert!(c.faults_injected.is_empty());
    assert_eq!(
        api.sim.stats_for_team(&a).expect("known").status_count(401),
        5
    );
    assert_eq!(api.sim.stats().faults(FaultKind::RateLimit), 5);
    assert!(
        api.sim
            .applied_log_for_team(TEAM_B)
            .expect("known")
            .is_empty()
    );

    // A global profile does not reach a team that has its own; removing it brings the global back.
    api.sim.set_faults(FaultProfile {
        error_500_rate: 1.0,
        ..FaultProfile::default()
    });
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let status = api
        .admin_send(
            reqwest::Method::DELETE,
            &format!("faults?team={TEAM_B}"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.sim.faults_for_team(TEAM_B), Ok(None));
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let status = api
        .admin_send(reqwest::Method::DELETE, "faults", json!({}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.sim.faults(), FaultProfile::default());
    assert_eq!(
        api.update_as(TEAM_B, "key-b", &fresh_items(1)).await.status,
        StatusCode::OK
    );
    let bad = api
        .admin_send(
            reqwest::Method::PUT,
            &format!("faults?team={TEAM_B}"),
            json!({"rate_limit_rate": 2.0}),
        )
        .await;
    assert_eq!(bad, StatusCode::BAD_REQUEST);
    assert_eq!(api.sim.faults_for_team(TEAM_B), Ok(None));
}

/// Two teams, one with a profile of its own, in a fixed interleaving: what the client saw of each.
async fn two_team_session(seed: u64) -> Vec<(u16, Bytes)> {
    let api = start(SimConfig {
        seed,
        faults: FaultProfile {
            item_error_rate: 0.3,
            ..FaultProfile::default()
        },
        ..three_teams()
    })
    .await;
    api.sim
        .set_faults_for_team(
            TEAM_B,
            FaultProfile {
                rate_limit_rate: 0.3,
                missing_results_rate: 0.3,
                ..FaultProfile::default()
            },
        )
        .expect("known team");
    let a = api.sim.team_id().to_owned();
    let mut seen = Vec::new();
    for round in 0..20u128 {
        let items: Vec<Value> = (0..5u128)
            .map(|i| {
                item(
                    Uuid::from_u128(round * 10 + i + 1),
                    json!({"r": round as u64}),
                )
            })
            .collect();
        for (team, key) in [(a.as_str(), "sim-key"), (TEAM_B, "key-b")] {
            let answer = api.update_as(team, key, &items).await;
            seen.push((answer.status.as_u16(), answer.body));
        }
    }
    api.sim.shutdown().await;
    seen
}

#[tokio::test]
async fn team_profiles_draw_from_the_one_seeded_generator() {
    let first = two_team_session(5).await;
    assert_eq!(first, two_team_session(5).await);
    assert_ne!(first, two_team_session(6).await);
    assert!(first.iter().any(|(status, _)| *status == 429));
}

#[tokio::test]
async fn team_ids_must_be_distinct() {
    // UUIDs are compared as such: another spelling of a known team is the same team.
    for duplicate in [
        prism_sync::sim::DEFAULT_TEAM_ID.to_owned(),
        TEAM_B.to_uppercase(),
    ] {
        let mut config = three_teams();
        config.extra_teams.push(SimTeam {
            team_id: duplicate.clone(),
            api_key: "k".to_owned(),
        });
        let refused = Simulator::start(config, "127.0.0.1:0".parse().expect("address")).await;
        assert!(refused.is_err(), "{duplicate} accepted twice");
    }
}

// --- inspection and control ------------------------------------------------------------------------

#[tokio::test]
async fn the_admin_endpoints_show_stats_requests_and_the_apply_log() {
    let api = start_default().await;
    let items = fresh_items(3);
    let target = items[1]["id"].as_str().expect("id").to_owned();
    api.update(Some("seen"), &items).await;
    api.update(Some("seen"), &items).await;

    let stats = api.admin_get("stats").await;
    assert_eq!(stats["requests_total"], 2);
    assert_eq!(stats["requests_by_status"]["200"], 2);
    assert_eq!(stats["replays"], 1);
    assert_eq!(stats["items_applied"], 3);
    assert_eq!(stats["records"], 3);

    let requests = api.admin_get("requests").await;
    let requests = requests.as_array().expect("requests");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["idempotency_key"], "seen");
    assert_eq!(requests[0]["items"], 3);
    assert_eq!(requests[0]["replay"], false);
    assert_eq!(requests[1]["replay"], true);
    assert_eq!(requests[1]["status"], 200);
    assert!(
        requests[1]["path"]
            .as_str()
            .expect("path")
            .ends_with("/contact/batch/update")
    );
    assert_eq!(
        api.admin_get("requests?limit=1")
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let all = api.admin_get("applied").await;
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    let one = api.admin_get(&format!("applied?record={target}")).await;
    assert_eq!(one.as_array().map(Vec::len), Some(1));
    assert_eq!(one[0]["seq"], 2);
    assert_eq!(one[0]["idempotency_key"], "seen");
    assert_eq!(one[0]["item"], items[1]);
    assert_eq!(
        api.admin_get("applied?after_seq=2")
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let record = api.admin_get(&format!("records/contact/{target}")).await;
    assert_eq!(record["default"], items[1]["default"]);
    let missing = api
        .http
        .get(api.admin_url(&format!("records/contact/{}", Uuid::new_v4())))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn faults_can_be_read_and_replaced_while_running() {
    let api = start_default().await;
    assert_eq!(
        serde_json::from_value::<FaultProfile>(api.admin_get("faults").await).expect("profile"),
        FaultProfile::default()
    );
    let status = api
        .admin_send(
            reqwest::Method::PUT,
            "faults",
            json!({"error_503_rate": 1.0, "retry_after_ms": 20, "latency": "1ms"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.sim.faults().error_503_rate, 1.0);
    assert_eq!(api.sim.faults().latency, Duration::from_millis(1));
    let answer = api.update(None, &fresh_items(1)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("retry-after-ms"), Some("20"));

    for bad in [json!({"error_503_rate": 2.0}), json!({"no_such_fault": 1})] {
        let status = api.admin_send(reqwest::Method::PUT, "faults", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(api.sim.faults().error_503_rate, 1.0);
}

#[tokio::test]
async fn a_key_revoked_through_the_admin_endpoint_gets_401_until_restored() {
    let api = start_default().await;
    let status = api
        .admin_send(
            reqwest::Method::PUT,
            "api-key",
            json!({"api_key": "rotated"}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let items = fresh_items(1);
    let refused = api.update(Some("k"), &items).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(api.sim.applied_log().is_empty());

    api.admin_send(
        reqwest::Method::PUT,
        "api-key",
        json!({"api_key": "sim-key"}),
    )
    .await;
    let accepted = api.update(Some("k"), &items).await;
    assert_eq!(accepted.status, StatusCode::OK);
    assert!(!accepted.is_replay(), "a 401 is not cached");

    api.sim.set_api_key("other");
    assert_eq!(
        api.update(None, &items).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_reset_forgets_records_log_keys_and_stats() {
    let api = start_default().await;
    let items = fresh_items(2);
    api.update(Some("before"), &items).await;
    let status = api
        .admin_send(reqwest::Method::POST, "reset", json!({}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(api.sim.applied_log().is_empty());
    assert!(api.sim.requests().is_empty());
    assert_eq!(api.sim.stats().requests_total, 0);
    assert!(
        api.sim
            .record(
                ObjectType::Contact,
                Uuid::parse_str(&ids(&items)[0]).expect("uuid")
            )
            .is_none()
    );
    let again = api.update(Some("before"), &items).await;
    assert!(!again.is_replay());
    assert_eq!(api.sim.applied_log().len(), 2);
}

#[tokio::test]
async fn unknown_paths_answer_404_in_json() {
    let api = start_default().await;
    let response = api
        .http
        .get(format!("{}/v2/nothing", api.sim.base_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let json: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(json["error"]["code"], "not_found");
}

// --- reproducibility and lifecycle -----------------------------------------------------------------

/// Runs a fixed sequence of requests and returns what the client saw of each.
async fn fixed_session(seed: u64) -> Vec<(u16, Option<String>, Bytes)> {
    let api = start(SimConfig {
        seed,
        faults: FaultProfile {
            error_500_rate: 0.1,
            rate_limit_rate: 0.1,
            missing_results_rate: 0.2,
            duplicate_result_rate: 0.2,
            unknown_result_id_rate: 0.2,
            wrong_summary_rate: 0.2,
            truncated_body_rate: 0.2,
            non_json_body_rate: 0.2,
            item_error_rate: 0.2,
            latency_jitter: Duration::from_millis(2),
            ..FaultProfile::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut seen = Vec::new();
    for round in 0..30u128 {
        let items: Vec<Value> = (0..10u128)
            .map(|i| {
                item(
                    Uuid::from_u128(round * 100 + i + 1),
                    json!({"round": round as u64}),
                )
            })
            .collect();
        let answer = api.update(Some(&format!("key-{round}")), &items).await;
        seen.push((
            answer.status.as_u16(),
            answer.header("idempotent-replay").map(str::to_owned),
            answer.body,
        ));
    }
    api.sim.shutdown().await;
    seen
}

#[tokio::test]
async fn the_same_seed_gives_a_sequential_client_the_same_faults() {
    let first = fixed_session(42).await;
    let second = fixed_session(42).await;
    let other = fixed_session(43).await;
    assert_eq!(first, second);
    assert_ne!(first, other);
    let faulty = first.iter().filter(|(status, _, _)| *status != 200).count();
    assert!(faulty > 0, "the profile injected no request-level fault");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let api = start_default().await;
    let url = api.update_url(api.sim.team_id(), "contact");
    api.sim.clone().shutdown().await;
    let after = reqwest::Client::new()
        .post(url)
        .header("x-api-key", "sim-key")
        .body(body(&fresh_items(1)))
        .send()
        .await;
    assert!(after.is_err());
}

#[tokio::test]
async fn the_simulate_flags_build_the_fault_profile() {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        simulate: SimulateArgs,
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("faults.toml");
    std::fs::write(
        &file,
        "error_500_rate = 0.5\nlatency = \"5ms\"\npoison_ids = [\"p1\"]\n",
    )
    .expect("write profile");
    let cli = Cli::try_parse_from([
        "simulate",
        "--listen",
        "127.0.0.1:0",
        "--api-key",
        "k",
        "--team",
        "t",
        "--extra-team",
        "t2=k2",
        "--extra-team",
        "t3=k3=with-equals",
        "--seed",
        "9",
        "--idempotency-ttl",
        "30s",
        "--strict-records",
        "--faults",
        file.to_str().expect("utf-8 path"),
        "--error-rate",
        "0.25",
        "--rate-limit-rate",
        "0.1",
        "--retry-after",
        "4",
        "--item-error-rate",
        "0.2",
        "--item-error-code",
        "timeout",
        "--poison-id",
        "p2",
        "--poison-status",
        "413",
    ])
    .expect("flags parse");
    let config = cli.simulate.sim_config().expect("config");
    assert_eq!(config.api_key, "k");
    assert_eq!(config.team_id, "t");
    assert_eq!(
        config.extra_teams,
        vec![
            SimTeam {
                team_id: "t2".to_owned(),
                api_key: "k2".to_owned()
            },
            SimTeam {
                team_id: "t3".to_owned(),
                api_key: "k3=with-equals".to_owned()
            },
        ]
    );
    assert_eq!(config.seed, 9);
    assert!(!config.implicit_records);
    assert_eq!(config.idempotency_ttl, Duration::from_secs(30));
    let faults = config.faults;
    assert_eq!(faults.error_500_rate, 0.25, "a flag overrides the file");
    assert_eq!(
        faults.latency,
        Duration::from_millis(5),
        "the file fills the rest"
    );
    assert_eq!(faults.rate_limit_rate, 0.1);
    assert_eq!(faults.retry_after, Some(4));
    assert_eq!(faults.item_error_codes, vec!["timeout".to_owned()]);
    assert_eq!(faults.poison_ids, vec!["p1".to_owned(), "p2".to_owned()]);
    assert_eq!(faults.poison_status, 413);

    let bad = Cli::try_parse_from(["simulate", "--error-rate", "3"])
        .expect("flags parse")
        .simulate
        .sim_config();
    assert!(bad.is_err(), "a rate above 1 is refused");
    for malformed in ["no-equals", "=key", "team="] {
        assert!(
            Cli::try_parse_from(["simulate", "--extra-team", malformed]).is_err(),
            "{malformed:?} accepted"
        );
    }
}

#[tokio::test]
async fn run_simulate_serves_until_cancelled() {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        simulate: SimulateArgs,
    }

    let args = Cli::try_parse_from(["simulate", "--listen", "127.0.0.1:0"])
        .expect("flags parse")
        .simulate;
    let token = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(prism_sync::sim::run_simulate(args, token.clone()));
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("stops in time")
        .expect("joins")
        .expect("serves without error");
}
