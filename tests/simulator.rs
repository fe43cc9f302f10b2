//! The simulator through real HTTP: every rule of the bulk-update API and every fault it can inject.
//!
//! Each test starts its own simulator on port 0 and talks to it with reqwest, as prism-sync will.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prism_sync::sim::{
    FaultKind, FaultProfile, ObjectType, SimConfig, SimHandle, SimulateArgs, Simulator,
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
        let answer = api.post(None, bad.to_vec()).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert!(["invalid_json", "invalid_request"].contains(&answer.error_code().as_str()));
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
