//! The response parser and outcome classifier at scale (proptest, seeded from the suite seed):
//! arbitrary bytes under any status, and JSON-shaped 200s built from the parts a hostile or buggy
//! server could get wrong (ids that are ours, unknown, malformed, duplicated or absent; statuses
//! and error codes of any shape; summaries that lie; extra fields; truncation). Nothing may
//! panic; a well-typed 200 gives every item exactly one outcome, the one its first result names,
//! and a missing result is a retryable `missing_result`; anything else is retried unparsed.
//!
//! `PRISM_SYNC_FUZZ_CASES` sets the cases per property (default 10,000; 100,000 when soaking).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use prism_sync::batch::BatchItem;
use prism_sync::classify::{
    Answer, BatchVerdict, CodePolicy, Exchange, TransportFailure, classify, error_of, retry_after,
    should_retry,
};
use prism_sync::model::ItemOutcome;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::harness::{soak, suite_seed};

fn cases() -> u32 {
    match std::env::var("PRISM_SYNC_FUZZ_CASES") {
        Ok(n) => n.trim().parse().expect("PRISM_SYNC_FUZZ_CASES is a number"),
        Err(_) if soak() => 100_000,
        Err(_) => 10_000,
    }
}

/// A runner whose generator is seeded from the suite seed and the property's name.
fn runner(property: &str) -> TestRunner {
    let mut seed = [0u8; 32];
    let mut h = suite_seed();
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        for b in property.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h = h.rotate_left(17) ^ (i as u64);
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed))
}

fn run<S: Strategy>(
    property: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let started = std::time::Instant::now();
    let mut runner = runner(property);
    let result = runner.run(&strategy, test);
    let seconds = started.elapsed().as_secs_f64();
    let failure = result.err().map(|e| e.to_string());
    crate::harness::record_fuzz(property, cases(), seconds, failure.clone());
    if let Some(e) = failure {
        panic!(
            "{property}: {e} (reproduce with PRISM_SYNC_FAULT_SEED={})",
            suite_seed()
        );
    }
    eprintln!("{property}: {} cases in {seconds:.1}s", cases());
}

fn policy() -> CodePolicy {
    let s = prism_sync::settings::RetrySettings::default();
    CodePolicy {
        retryable: s.retryable_codes.into_iter().collect(),
        permanent: s.permanent_codes.into_iter().collect(),
        max_attempts: 5,
    }
}

fn items(base: u128, n: usize, attempts: &[i32]) -> Vec<BatchItem> {
    (0..n)
        .map(|i| BatchItem {
            record_id: Uuid::from_u128(base.wrapping_add(i as u128 * 0x1_0000_0001)),
            rows: vec![i as i64 * 2, i as i64 * 2 + 1],
            attempts: attempts[i % attempts.len()],
        })
        .collect()
}

fn exchange(status: u16, body: Vec<u8>, retry: Option<u64>, should: Option<bool>) -> Exchange {
    Exchange::Answered(Answer {
        status,
        retry_after: retry.map(Duration::from_millis),
        should_retry: should,
        replay: false,
        body,
    })
}

/// A valid-looking bulk response for `batch`, for mutation.
fn plausible_body(rng: &mut StdRng, batch: &[BatchItem]) -> Vec<u8> {
    let mut results: Vec<Value> = Vec::new();
    for it in batch {
        if !rng.random_bool(0.9) {
            continue;
        }
        results.push({
            if rng.random_bool(0.8) {
                json!({"id": it.record_id.to_string(), "status": "ok", "record": {"id": it.record_id.to_string(), "default": {"n": 1}}})
            } else {
                json!({"id": it.record_id.to_string(), "status": "error", "error": {"code": "validation_error", "message": "bad"}})
            }
        });
    }
    let n = results.len();
    serde_json::to_vec(
        &json!({"results": results, "summary": {"total": n, "succeeded": n, "failed": 0}}),
    )
    .expect("serialises")
}

/// Random bytes; a plausible body with bytes flipped, inserted or cut; or a plausible body.
fn hostile_bytes(rng: &mut StdRng, batch: &[BatchItem], mode: u8, len: usize) -> Vec<u8> {
    match mode {
        0 => {
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            b
        }
        1 => {
            let mut b = plausible_body(rng, batch);
            let flips = rng.random_range(1..8);
            for _ in 0..flips {
                if b.is_empty() {
                    break;
                }
                let at = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => b[at] = rng.random(),
                    1 => b.insert(
                        at,
                        *b"{}[]\",:0-e".get(rng.random_range(0..12)).unwrap_or(&b'x'),
                    ),
                    _ => {
                        b.remove(at);
                    }
                }
            }
            b
        }
        2 => {
            let mut b = plausible_body(rng, batch);
            let cut = rng.random_range(0..=b.len());
            b.truncate(cut);
            b
        }
        _ => plausible_body(rng, batch),
    }
}

#[test]
fn fuzz_arbitrary_bytes_under_any_status_never_panic() {
    let strategy = (
        prop_oneof![3 => Just(200u16), 1 => 100u16..600],
        (any::<u64>(), 0u8..4, 0usize..4096),
        proptest::option::of(0u64..10_000_000),
        proptest::option::of(any::<bool>()),
        (
            any::<u128>(),
            item_count(),
            proptest::collection::vec(0i32..30, 1..4),
        ),
    );
    run(
        "arbitrary_bytes",
        strategy,
        |(status, (seed, mode, len), retry, should, (base, n, attempts))| {
            let items = items(base, n, &attempts);
            let body = hostile_bytes(&mut StdRng::seed_from_u64(seed), &items, mode, len);
            let _ = error_of(&body);
            match classify(&exchange(status, body, retry, should), &items, &policy()) {
                BatchVerdict::Answered {
                    outcomes,
                    anomalies,
                } => {
                    prop_assert!((200..300).contains(&status));
                    prop_assert_eq!(outcomes.len(), items.len());
                    prop_assert!(anomalies.missing <= items.len());
                }
                BatchVerdict::AuthRefused { status: s } => prop_assert!(s == 401 || s == 403),
                // Only a 2xx can be unreadable: it means the request was applied.
                BatchVerdict::Unreadable { status: s, .. } => {
                    prop_assert!((200..300).contains(&s) && s == status)
                }
                BatchVerdict::Retry { .. }
                | BatchVerdict::Rejected { .. }
                | BatchVerdict::KeyMismatch => {}
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_transport_failures_always_retry() {
    let kinds = prop_oneof![
        Just(TransportFailure::Connect),
        Just(TransportFailure::Timeout),
        Just(TransportFailure::Interrupted),
        Just(TransportFailure::ResponseTooLarge),
    ];
    run(
        "transport_failures",
        (kinds, any::<u64>(), any::<u128>(), 0usize..=100),
        |(kind, seed, base, n)| {
            let detail = any_string(&mut StdRng::seed_from_u64(seed));
            let ex = Exchange::Failed { kind, detail };
            let verdict = classify(&ex, &items(base, n, &[0]), &policy());
            let retried =
                matches!(verdict, BatchVerdict::Retry { ref code, .. } if code == kind.code());
            prop_assert!(retried, "{:?}", verdict);
            Ok(())
        },
    );
}

/// How a result names its item.
#[derive(Debug, Clone)]
enum Id {
    /// One of the batch's items, written as hyphenated, upper-case, simple or braced text.
    Ours(usize, u8),
    Unknown(u128),
    Garbage(String),
    Null,
    Absent,
    /// Ill-typed: a number where a string belongs.
    Number(i64),
}

#[derive(Debug, Clone)]
enum Text {
    Absent,
    Null,
    Str(String),
    /// Ill-typed.
    Number(i64),
}

#[derive(Debug, Clone)]
enum ErrorField {
    Absent,
    Null,
    Object(Text, Text),
    /// Ill-typed.
    Str(String),
}

#[derive(Debug, Clone)]
struct ResultEntry {
    id: Id,
    status: Text,
    error: ErrorField,
    record: Option<Value>,
    extra: bool,
}

#[derive(Debug, Clone)]
enum SummaryField {
    Absent,
    Null,
    Object([Option<Option<i64>>; 3]),
    /// Ill-typed.
    Str(String),
}

#[derive(Debug, Clone)]
struct Body {
    items: usize,
    base: u128,
    attempts: Vec<i32>,
    results: Option<Vec<ResultEntry>>,
    summary: SummaryField,
    extra_top: bool,
    truncate: Option<usize>,
}

/// Strings a server might put anywhere: empty, look-alikes of real values, escapes, control
/// characters, multi-byte text, and now and then something long.
fn any_string(rng: &mut StdRng) -> String {
    const POOL: &[&str] = &[
        "",
        "ok",
        "error",
        "OK",
        " ok",
        "Ok",
        "null",
        "\u{0}",
        "\"",
        "\\",
        "é€😀",
        "\u{202e}rtl",
        "a\nb",
        "rate_limited",
        "internal_error",
        "timeout",
        "unavailable",
        "conflict",
        "locked",
        "missing_result",
        "not_found",
        "validation_error",
        "invalid_id",
        "invalid_property",
        "invalid_value",
        "forbidden",
        "weird_code",
        "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e",
    ];
    const CHARS: &[char] = &[
        'a', 'Z', '0', '-', ' ', '"', '\\', '\n', '\u{0}', '\u{7f}', 'é', '€', '😀', '\u{fffd}',
        '{', '}',
    ];
    match rng.random_range(0..10) {
        0..=5 => POOL[rng.random_range(0..POOL.len())].to_owned(),
        6..=8 => (0..rng.random_range(0..40))
            .map(|_| CHARS[rng.random_range(0..CHARS.len())])
            .collect(),
        _ if rng.random_bool(0.1) => (0..rng.random_range(450..700))
            .map(|_| CHARS[rng.random_range(8..CHARS.len())])
            .collect(),
        _ => String::new(),
    }
}

fn any_text(rng: &mut StdRng) -> Text {
    match rng.random_range(0..16) {
        0 | 1 => Text::Absent,
        2 | 3 => Text::Null,
        4 => Text::Number(rng.random()),
        _ => Text::Str(any_string(rng)),
    }
}

fn any_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => Value::String(any_string(rng)),
        4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| any_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|i| (format!("k{i}"), any_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn any_result(rng: &mut StdRng, items: usize) -> ResultEntry {
    let id = match rng.random_range(0..18) {
        0..=11 => Id::Ours(rng.random_range(0..items), rng.random_range(0..4)),
        12 | 13 => Id::Unknown(rng.random()),
        14 => Id::Garbage(any_string(rng)),
        15 => Id::Null,
        16 => Id::Absent,
        _ => Id::Number(rng.random()),
    };
    let status = match rng.random_range(0..13) {
        0..=7 => Text::Str("ok".into()),
        8..=11 => Text::Str("error".into()),
        _ => any_text(rng),
    };
    let error = match rng.random_range(0..10) {
        0 | 1 => ErrorField::Absent,
        2 => ErrorField::Null,
        3..=8 => ErrorField::Object(any_text(rng), any_text(rng)),
        _ => ErrorField::Str(any_string(rng)),
    };
    ResultEntry {
        id,
        status,
        error,
        record: rng.random_bool(0.3).then(|| any_json(rng, 2)),
        extra: rng.random_bool(0.1),
    }
}

fn any_body(seed: u64, items: usize, base: u128, attempts: Vec<i32>) -> Body {
    let rng = &mut StdRng::seed_from_u64(seed);
    let count = match rng.random_range(0..5) {
        0 => rng.random_range(0..3),
        1 => rng.random_range(0..items * 3 / 2 + 2),
        _ => rng.random_range(items.saturating_sub(2)..items + 3),
    };
    let results = rng
        .random_bool(0.97)
        .then(|| (0..count).map(|_| any_result(rng, items)).collect());
    let summary_field = |rng: &mut StdRng| match rng.random_range(0..4) {
        0 => None,
        1 => Some(None),
        _ => Some(Some(rng.random_range(-5i64..210))),
    };
    let summary = match rng.random_range(0..10) {
        0 | 1 => SummaryField::Absent,
        2 => SummaryField::Null,
        3..=8 => SummaryField::Object([summary_field(rng), summary_field(rng), summary_field(rng)]),
        _ => SummaryField::Str(any_string(rng)),
    };
    Body {
        items,
        base,
        attempts,
        results,
        summary,
        extra_top: rng.random_bool(0.2),
        truncate: rng.random_bool(0.1).then(|| rng.random::<u64>() as usize),
    }
}

/// Mostly small batches (the interesting cases need few items), now and then a full one.
fn item_count() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 1usize..8, 3 => 8usize..30, 1 => 30usize..=100]
}

fn body() -> impl Strategy<Value = Body> {
    (
        any::<u64>(),
        item_count(),
        any::<u128>(),
        proptest::collection::vec(0i32..12, 1..4),
    )
        .prop_map(|(seed, items, base, attempts)| any_body(seed, items, base, attempts))
}

fn text_json(t: &Text) -> Option<Value> {
    match t {
        Text::Absent => None,
        Text::Null => Some(Value::Null),
        Text::Str(s) => Some(Value::String(s.clone())),
        Text::Number(n) => Some(json!(n)),
    }
}

fn id_text(id: Uuid, form: u8) -> String {
    match form {
        0 => id.hyphenated().to_string(),
        1 => id.hyphenated().to_string().to_uppercase(),
        2 => id.simple().to_string(),
        _ => id.braced().to_string(),
    }
}

/// The body's bytes, and whether serde can read it as a bulk response at all.
fn render(b: &Body, batch: &[BatchItem]) -> (Vec<u8>, bool) {
    let mut well_typed = true;
    let mut top = Map::new();
    if let Some(results) = &b.results {
        let list: Vec<Value> = results
            .iter()
            .map(|r| {
                let mut o = Map::new();
                match &r.id {
                    Id::Ours(i, form) => {
                        o.insert("id".into(), json!(id_text(batch[*i].record_id, *form)));
                    }
                    Id::Unknown(u) => {
                        o.insert("id".into(), json!(Uuid::from_u128(*u).to_string()));
                    }
                    Id::Garbage(s) => {
                        o.insert("id".into(), json!(s));
                    }
                    Id::Null => {
                        o.insert("id".into(), Value::Null);
                    }
                    Id::Absent => {}
                    Id::Number(n) => {
                        well_typed = false;
                        o.insert("id".into(), json!(n));
                    }
                }
                match &r.status {
                    Text::Str(_) => {}
                    _ => well_typed = false,
                }
                if let Some(v) = text_json(&r.status) {
                    o.insert("status".into(), v);
                }
                match &r.error {
                    ErrorField::Absent => {}
                    ErrorField::Null => {
                        o.insert("error".into(), Value::Null);
                    }
                    ErrorField::Object(code, message) => {
                        let mut e = Map::new();
                        for (name, t) in [("code", code), ("message", message)] {
                            if matches!(t, Text::Number(_)) {
                                well_typed = false;
                            }
                            if let Some(v) = text_json(t) {
                                e.insert(name.into(), v);
                            }
                        }
                        o.insert("error".into(), Value::Object(e));
                    }
                    ErrorField::Str(s) => {
                        well_typed = false;
                        o.insert("error".into(), json!(s));
                    }
                }
                if let Some(record) = &r.record {
                    o.insert("record".into(), record.clone());
                }
                if r.extra {
                    o.insert("unexpected".into(), json!({"nested": [1, 2, {"x": null}]}));
                }
                Value::Object(o)
            })
            .collect();
        top.insert("results".into(), Value::Array(list));
    } else {
        well_typed = false;
    }
    match &b.summary {
        SummaryField::Absent => {}
        SummaryField::Null => {
            top.insert("summary".into(), Value::Null);
        }
        SummaryField::Object(fields) => {
            let mut s = Map::new();
            for (name, f) in ["total", "succeeded", "failed"].iter().zip(fields) {
                match f {
                    None => {}
                    Some(None) => {
                        s.insert((*name).into(), Value::Null);
                    }
                    Some(Some(n)) => {
                        s.insert((*name).into(), json!(n));
                    }
                }
            }
            top.insert("summary".into(), Value::Object(s));
        }
        SummaryField::Str(s) => {
            well_typed = false;
            top.insert("summary".into(), json!(s));
        }
    }
    if b.extra_top {
        top.insert("request_id".into(), json!("req_123"));
    }
    let mut bytes = serde_json::to_vec(&Value::Object(top)).expect("serialises");
    if let Some(cut) = b.truncate {
        bytes.truncate(cut % bytes.len().max(1));
        well_typed = false;
    }
    (bytes, well_typed)
}

/// What each item's outcome must be, from the first result that names it (the model).
fn model(
    b: &Body,
    batch: &[BatchItem],
    p: &CodePolicy,
) -> (Vec<ItemOutcome>, usize, usize, usize, bool) {
    let index: HashMap<Uuid, usize> = batch
        .iter()
        .enumerate()
        .map(|(i, it)| (it.record_id, i))
        .collect();
    let mut out: Vec<Option<ItemOutcome>> = vec![None; batch.len()];
    let (mut unknown, mut duplicate, mut ok, mut failed) = (0usize, 0usize, 0i64, 0i64);
    for r in b.results.as_deref().unwrap_or_default() {
        let named = match &r.id {
            Id::Ours(i, _) => Some(*i),
            Id::Unknown(u) => index.get(&Uuid::from_u128(*u)).copied(),
            Id::Garbage(s) => Uuid::try_parse(s).ok().and_then(|u| index.get(&u).copied()),
            _ => None,
        };
        let Some(i) = named else {
            unknown += 1;
            continue;
        };
        if out[i].is_some() {
            duplicate += 1;
            continue;
        }
        let Text::Str(status) = &r.status else {
            unreachable!("well-typed")
        };
        out[i] = Some(if status == "ok" {
            ok += 1;
            ItemOutcome::Succeeded
        } else {
            failed += 1;
            let code = match &r.error {
                ErrorField::Object(Text::Str(c), _) if !c.is_empty() => c.clone(),
                _ => format!("status_{status}"),
            };
            p.item_error(&code, String::new(), batch[i].attempts)
        });
    }
    let mut missing = 0;
    let outcomes = out
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| {
                missing += 1;
                p.item_error("missing_result", String::new(), batch[i].attempts)
            })
        })
        .collect();
    let mismatch = match &b.summary {
        SummaryField::Object([total, succeeded, failed_n]) => {
            let all = ok + failed + (unknown + duplicate) as i64;
            let differs = |f: &Option<Option<i64>>, n: i64| matches!(f, Some(Some(v)) if *v != n);
            differs(total, all) || differs(succeeded, ok) || differs(failed_n, failed)
        }
        _ => false,
    };
    (outcomes, missing, duplicate, unknown, mismatch)
}

fn same_kind(a: &ItemOutcome, b: &ItemOutcome) -> bool {
    match (a, b) {
        (ItemOutcome::Succeeded, ItemOutcome::Succeeded) => true,
        (ItemOutcome::Retry { code: x, .. }, ItemOutcome::Retry { code: y, .. })
        | (ItemOutcome::Dead { code: x, .. }, ItemOutcome::Dead { code: y, .. }) => x == y,
        _ => false,
    }
}

#[test]
fn fuzz_json_shaped_200s_give_every_item_exactly_one_outcome() {
    let p = policy();
    run("json_shaped_200s", body(), |b| {
        let batch = items(b.base, b.items, &b.attempts);
        let (bytes, well_typed) = render(&b, &batch);
        let verdict = classify(&exchange(200, bytes.clone(), None, None), &batch, &p);
        if !well_typed {
            let unreadable = matches!(&verdict, BatchVerdict::Unreadable { status: 200, .. });
            prop_assert!(
                unreadable
                    || matches!(&verdict, BatchVerdict::Answered { outcomes, .. } if outcomes.len() == batch.len()),
                "an unreadable 200 is retried unparsed: {:?}",
                verdict
            );
            return Ok(());
        }
        let BatchVerdict::Answered {
            outcomes,
            anomalies,
        } = verdict
        else {
            return Err(TestCaseError::fail(format!(
                "a well-typed 200 was not answered: {verdict:?}\n{}",
                String::from_utf8_lossy(&bytes)
            )));
        };
        let (expected, missing, duplicate, unknown, mismatch) = model(&b, &batch, &p);
        prop_assert_eq!(outcomes.len(), batch.len(), "one outcome per item");
        for (i, (got, want)) in outcomes.iter().zip(&expected).enumerate() {
            prop_assert!(
                same_kind(got, want),
                "item {}: {:?}, expected {:?}",
                i,
                got,
                want
            );
            if let ItemOutcome::Retry { message, .. } | ItemOutcome::Dead { message, .. } = got {
                prop_assert!(
                    message.len() <= 504,
                    "messages are clipped ({} bytes)",
                    message.len()
                );
            }
        }
        prop_assert_eq!(anomalies.missing, missing);
        prop_assert_eq!(anomalies.duplicate, duplicate);
        prop_assert_eq!(anomalies.unknown, unknown);
        prop_assert_eq!(anomalies.summary_mismatch, mismatch);
        Ok(())
    });
}

#[test]
fn fuzz_json_shaped_bodies_under_other_statuses_follow_the_status() {
    let p = policy();
    let strategy = (
        prop_oneof![
            Just(400u16),
            Just(401),
            Just(403),
            Just(408),
            Just(409),
            Just(413),
            Just(422),
            Just(429),
            Just(500),
            Just(503),
            100u16..600
        ],
        body(),
        proptest::option::of(any::<bool>()),
        prop_oneof![
            2 => Just(None),
            1 => prop::sample::select(vec!["idempotency_key_mismatch", "idempotency_key_in_use", "bad_request"]).prop_map(Some),
        ],
    );
    run(
        "json_shaped_non_200s",
        strategy,
        |(status, b, should, error_code)| {
            let batch = items(b.base, b.items, &b.attempts);
            let bytes = match error_code {
                Some(code) => {
                    serde_json::to_vec(&json!({"error": {"code": code, "message": "m"}})).unwrap()
                }
                None => render(&b, &batch).0,
            };
            let verdict = classify(&exchange(status, bytes, None, should), &batch, &p);
            if (200..300).contains(&status) {
                if let BatchVerdict::Answered { outcomes, .. } = &verdict {
                    prop_assert_eq!(outcomes.len(), batch.len());
                }
                return Ok(());
            }
            prop_assert!(
                !matches!(verdict, BatchVerdict::Answered { .. }),
                "a {} is never read as per-item results",
                status
            );
            if status == 401 || status == 403 {
                prop_assert_eq!(&verdict, &BatchVerdict::AuthRefused { status });
            }
            if status == 409 && error_code == Some("idempotency_key_mismatch") {
                prop_assert_eq!(&verdict, &BatchVerdict::KeyMismatch);
            }
            Ok(())
        },
    );
}

/// A header value a server might send as a delay or a retry hint.
fn header_text(rng: &mut StdRng) -> String {
    const POOL: &[&str] = &[
        "NaN",
        "inf",
        "-inf",
        "1e309",
        "-0",
        "0",
        "true",
        "false",
        " true ",
        "TRUE",
        "",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Sun, 06 Nov 2094 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "18446744073709551616",
        "99999999999999999999999",
        "0.0001",
        "1.5",
        "  3  ",
    ];
    match rng.random_range(0..4) {
        0 => POOL[rng.random_range(0..POOL.len())].to_owned(),
        1 => {
            let sign = if rng.random_bool(0.2) { "-" } else { "" };
            let exp = if rng.random_bool(0.2) {
                format!("e{}", rng.random_range(-400..400))
            } else {
                String::new()
            };
            format!(
                "{sign}{}.{}{exp}",
                rng.random::<u64>() >> rng.random_range(0..64),
                rng.random_range(0..1000)
            )
        }
        2 => rng.random::<u64>().to_string(),
        _ => (0..rng.random_range(0..24))
            .map(|_| char::from(rng.random_range(32u8..127)))
            .collect(),
    }
}

#[test]
fn fuzz_retry_headers_never_panic() {
    use reqwest::header::{HeaderMap, HeaderValue};
    run(
        "retry_headers",
        (any::<u64>(), any::<u32>(), any::<[bool; 3]>()),
        |(seed, now_secs, present)| {
            let rng = &mut StdRng::seed_from_u64(seed);
            let mut h = HeaderMap::new();
            for (name, on) in ["retry-after-ms", "retry-after", "x-should-retry"]
                .iter()
                .zip(present)
            {
                if on && let Ok(v) = HeaderValue::from_str(&header_text(rng)) {
                    h.insert(*name, v);
                }
            }
            let now = std::time::UNIX_EPOCH + Duration::from_secs(u64::from(now_secs));
            if let Some(d) = retry_after(&h, now) {
                prop_assert!(d.as_secs_f64().is_finite());
            }
            let _ = should_retry(&h);
            Ok(())
        },
    );
}

/// The model above must agree with the classifier on hand-written cases too (guards the
/// model against being wrong in the same way as the code).
#[test]
fn the_fuzz_model_agrees_on_a_known_answer() {
    let batch = items(7, 3, &[0]);
    let id = |i: usize| batch[i].record_id.to_string();
    let body = json!({
        "results": [
            {"id": id(0), "status": "ok"},
            {"id": id(0), "status": "error", "error": {"code": "not_found"}},
            {"id": Uuid::from_u128(1).to_string(), "status": "ok"},
            {"id": id(2), "status": "error", "error": {"code": "validation_error", "message": "no"}},
        ],
        "summary": {"total": 4, "succeeded": 2, "failed": 2}
    });
    let verdict = classify(
        &exchange(200, serde_json::to_vec(&body).unwrap(), None, None),
        &batch,
        &policy(),
    );
    let BatchVerdict::Answered {
        outcomes,
        anomalies,
    } = verdict
    else {
        panic!("{verdict:?}")
    };
    assert_eq!(outcomes[0], ItemOutcome::Succeeded);
    assert!(matches!(&outcomes[1], ItemOutcome::Retry { code, .. } if code == "missing_result"));
    assert!(matches!(&outcomes[2], ItemOutcome::Dead { code, .. } if code == "validation_error"));
    assert_eq!(
        (anomalies.missing, anomalies.duplicate, anomalies.unknown),
        (1, 1, 1)
    );
    // total 4 = 1 ok + 1 failed + 1 unknown + 1 duplicate; succeeded says 2 but 1 was ok.
    assert!(anomalies.summary_mismatch);
    let distinct: HashSet<String> = batch.iter().map(|b| b.record_id.to_string()).collect();
    assert_eq!(distinct.len(), 3);
}
