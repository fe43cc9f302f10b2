//! What an answer from the API means for a batch and for each of its items: one pure function
//! over the status, the retry headers and the body, with table-driven tests.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use uuid::Uuid;

use crate::batch::BatchItem;
use crate::model::{ItemOutcome, codes};

/// What the transport gave back for one send.
#[derive(Debug, Clone)]
pub enum Exchange {
    /// No complete response: connection refused or dropped, timeout, body cut off or too large.
    Failed {
        kind: TransportFailure,
        detail: String,
    },
    Answered(Answer),
    /// The server answered 2xx, but its body could not be read (over the size cap, cut off):
    /// the request was applied, so its key must never be released to new keys.
    Unreadable {
        status: u16,
        kind: TransportFailure,
        detail: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    Connect,
    Timeout,
    Interrupted,
    ResponseTooLarge,
}

impl TransportFailure {
    pub fn code(self) -> &'static str {
        match self {
            TransportFailure::Connect => "connection_error",
            TransportFailure::Timeout => "timeout",
            TransportFailure::Interrupted => "connection_interrupted",
            TransportFailure::ResponseTooLarge => "response_too_large",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// `retry-after-ms`, else `retry-after` (seconds or an HTTP date), uncapped.
    pub retry_after: Option<Duration>,
    /// `x-should-retry: true|false`, which overrides the status.
    pub should_retry: Option<bool>,
    pub replay: bool,
    pub body: Vec<u8>,
}

/// The verdict on a whole batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchVerdict {
    /// The server answered for good: one outcome per item, in batch order.
    Answered {
        outcomes: Vec<ItemOutcome>,
        anomalies: Anomalies,
    },
    /// Send the same bytes with the same key again later.
    Retry {
        code: String,
        retry_after: Option<Duration>,
        slow_everyone: bool,
    },
    /// The key is refused (401/403): pause, burn no attempts, probe again later.
    AuthRefused { status: u16 },
    /// The API refused the batch as a whole (400/413/422): bisect to find the poison item.
    Rejected { status: u16, message: String },
    /// `409 idempotency_key_mismatch`: release the items to new batches.
    KeyMismatch,
    /// A 2xx whose body could not be read or parsed: the API applied the request, so re-send
    /// the same bytes under the same key (it replays its answer) and never release the key.
    Unreadable { status: u16, detail: String },
}

/// Oddities in a 200 that are survivable but worth counting and logging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anomalies {
    pub missing: usize,
    pub duplicate: usize,
    pub unknown: usize,
    pub summary_mismatch: bool,
}

impl Anomalies {
    pub fn any(&self) -> bool {
        self.missing + self.duplicate + self.unknown > 0 || self.summary_mismatch
    }
}

/// Which per-item error codes retry and which are final.
#[derive(Debug, Clone)]
pub struct CodePolicy {
    pub retryable: HashSet<String>,
    pub permanent: HashSet<String>,
    /// Unknown codes retry until a row has been tried this often.
    pub max_attempts: u32,
}

impl CodePolicy {
    /// An item that failed with `code` after `attempts_before` earlier tries.
    pub fn item_error(&self, code: &str, message: String, attempts_before: i32) -> ItemOutcome {
        let tries = u32::try_from(attempts_before)
            .unwrap_or(0)
            .saturating_add(1);
        let code = code.to_owned();
        if self.permanent.contains(&code) {
            ItemOutcome::Dead { code, message }
        } else if self.retryable.contains(&code) || tries < self.max_attempts {
            ItemOutcome::Retry { code, message }
        } else {
            ItemOutcome::Dead { code, message }
        }
    }
}

#[derive(Deserialize)]
struct BulkResponse {
    results: Vec<ResultItem>,
    summary: Option<Summary>,
}

#[derive(Deserialize)]
struct ResultItem {
    id: Option<String>,
    status: String,
    error: Option<ResultError>,
    #[serde(default)]
    #[allow(dead_code)]
    record: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ResultError {
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct Summary {
    total: Option<i64>,
    succeeded: Option<i64>,
    failed: Option<i64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorDetail>,
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

/// The error code and message of a non-2xx body, if it has the usual shape.
pub fn error_of(body: &[u8]) -> (Option<String>, Option<String>) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => match e.error {
            Some(d) => (d.code, d.message),
            None => (e.code, e.message),
        },
        Err(_) => (None, None),
    }
}

const MAX_MESSAGE: usize = 500;

fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut at = MAX_MESSAGE;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
    s
}

/// The verdict for one exchange. `items` is the batch's item list in body order.
pub fn classify(exchange: &Exchange, items: &[BatchItem], policy: &CodePolicy) -> BatchVerdict {
    let answer = match exchange {
        Exchange::Failed { kind, .. } => {
            return BatchVerdict::Retry {
                code: kind.code().into(),
                retry_after: None,
                slow_everyone: false,
            };
        }
        Exchange::Unreadable {
            status,
            kind,
            detail,
        } => {
            return BatchVerdict::Unreadable {
                status: *status,
                detail: clip(format!("{}: {detail}", kind.code())),
            };
        }
        Exchange::Answered(a) => a,
    };
    let status = answer.status;
    let retry = |slow| BatchVerdict::Retry {
        code: format!("http_{status}"),
        retry_after: answer.retry_after,
        slow_everyone: slow || answer.retry_after.is_some(),
    };
    if status == 401 || status == 403 {
        return BatchVerdict::AuthRefused { status };
    }
    if status == 409 {
        let (code, _) = error_of(&answer.body);
        if code.as_deref() == Some("idempotency_key_mismatch") {
            return BatchVerdict::KeyMismatch;
        }
    }
    let rejected = || {
        let (code, message) = error_of(&answer.body);
        let message = match (code, message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            (None, Some(m)) => m,
            (None, None) => {
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned()
            }
        };
        BatchVerdict::Rejected {
            status,
            message: clip(message),
        }
    };
    if (200..300).contains(&status) {
        // A 2xx carries per-item results; x-should-retry has nothing to override here. Bytes
        // that are not UTF-8 (inside a message, say) are read as U+FFFD rather than costing the
        // whole answer.
        let text = String::from_utf8_lossy(&answer.body);
        return match serde_json::from_str::<BulkResponse>(&text) {
            Ok(response) => answered(response, items, policy),
            Err(e) => BatchVerdict::Unreadable {
                status,
                detail: clip(format!("invalid_response: {e}")),
            },
        };
    }
    match answer.should_retry {
        Some(true) => return retry(status == 429),
        Some(false) => return rejected(),
        None => {}
    }
    match status {
        400 | 413 | 422 => rejected(),
        429 => retry(true),
        // 408, 409 (key in use), 5xx, and anything unexpected (a redirect, a 404 for a
        // misconfigured team): the batch is kept and retried with the same key; if it never
        // works, its items are released and eventually go dead with this code.
        _ => retry(false),
    }
}

fn answered(response: BulkResponse, items: &[BatchItem], policy: &CodePolicy) -> BatchVerdict {
    let mut anomalies = Anomalies::default();
    let index: HashMap<Uuid, usize> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.record_id, i))
        .collect();
    let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; items.len()];
    let (mut ok, mut failed) = (0i64, 0i64);
    for result in &response.results {
        let Some(i) = result
            .id
            .as_deref()
            .and_then(|id| Uuid::try_parse(id).ok())
            .and_then(|u| index.get(&u).copied())
        else {
            anomalies.unknown += 1;
            continue;
        };
        if outcomes[i].is_some() {
            anomalies.duplicate += 1;
            continue;
        }
        let outcome = if result.status == "ok" {
            ok += 1;
            ItemOutcome::Succeeded
        } else {
            failed += 1;
            let (code, message) = match &result.error {
                Some(e) => (e.code.clone(), e.message.clone()),
                None => (None, None),
            };
            let code = code
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| format!("status_{}", result.status));
            policy.item_error(&code, clip(message.unwrap_or_default()), items[i].attempts)
        };
        outcomes[i] = Some(outcome);
    }
    if let Some(s) = &response.summary {
        let total =
            (ok + failed) + i64::try_from(anomalies.unknown + anomalies.duplicate).unwrap_or(0);
        anomalies.summary_mismatch = s.total.is_some_and(|t| t != total)
            || s.succeeded.is_some_and(|n| n != ok)
            || s.failed.is_some_and(|n| n != failed);
    }
    let outcomes = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| {
                anomalies.missing += 1;
                policy.item_error(
                    codes::MISSING_RESULT,
                    "the API's 200 carried no result for this item".into(),
                    items[i].attempts,
                )
            })
        })
        .collect();
    BatchVerdict::Answered {
        outcomes,
        anomalies,
    }
}

/// Reads `retry-after-ms`, then `retry-after` (delta-seconds or an HTTP date).
///
/// A hint under a millisecond (`0`, or a date already past, as when this host's clock runs
/// ahead of the server's) is no hint: the caller's own backoff applies, as when the header is
/// absent. Honoured as "now", a 429 that says it to every request would be re-sent at once,
/// burning no attempt, for as long as the API keeps saying it.
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    read_retry_after(headers, now).filter(|d| *d >= Duration::from_millis(1))
}

fn read_retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms.min(1e12) / 1000.0));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads `x-should-retry`.
pub fn should_retry(headers: &reqwest::header::HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()?.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn policy() -> CodePolicy {
        let s = crate::settings::RetrySettings::default();
        CodePolicy {
            retryable: s.retryable_codes.into_iter().collect(),
            permanent: s.permanent_codes.into_iter().collect(),
            max_attempts: 3,
        }
    }

    const A: &str = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e";
    const B: &str = "282bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e";

    fn items(attempts: i32) -> Vec<BatchItem> {
        vec![
            BatchItem {
                record_id: A.parse().unwrap(),
                rows: vec![1],
                attempts,
            },
            BatchItem {
                record_id: B.parse().unwrap(),
                rows: vec![2, 3],
                attempts,
            },
        ]
    }

    fn answer(status: u16, body: &str) -> Exchange {
        Exchange::Answered(Answer {
            status,
            retry_after: None,
            should_retry: None,
            replay: false,
            body: body.as_bytes().to_vec(),
        })
    }

    fn with(ex: Exchange, f: impl FnOnce(&mut Answer)) -> Exchange {
        let Exchange::Answered(mut a) = ex else {
            unreachable!()
        };
        f(&mut a);
        Exchange::Answered(a)
    }

    #[test]
    fn statuses_map_to_the_failure_table() {
        let retry = |code: &str, slow| BatchVerdict::Retry {
            code: code.into(),
            retry_after: None,
            slow_everyone: slow,
        };
        let table: Vec<(Exchange, BatchVerdict)> = vec![
            (answer(500, ""), retry("http_500", false)),
            (answer(503, ""), retry("http_503", false)),
            (answer(408, ""), retry("http_408", false)),
            (answer(429, ""), retry("http_429", true)),
            (
                answer(409, r#"{"error":{"code":"idempotency_key_in_use"}}"#),
                retry("http_409", false),
            ),
            (
                answer(409, r#"{"error":{"code":"idempotency_key_mismatch"}}"#),
                BatchVerdict::KeyMismatch,
            ),
            (answer(401, ""), BatchVerdict::AuthRefused { status: 401 }),
            (answer(403, ""), BatchVerdict::AuthRefused { status: 403 }),
            (
                answer(
                    400,
                    r#"{"error":{"code":"bad_request","message":"items[3] is bad"}}"#,
                ),
                BatchVerdict::Rejected {
                    status: 400,
                    message: "bad_request: items[3] is bad".into(),
                },
            ),
            (
                answer(413, "too big"),
                BatchVerdict::Rejected {
                    status: 413,
                    message: "too big".into(),
                },
            ),
            (
                answer(422, ""),
                BatchVerdict::Rejected {
                    status: 422,
                    message: String::new(),
                },
            ),
            (answer(404, ""), retry("http_404", false)),
            (answer(302, ""), retry("http_302", false)),
            (
                Exchange::Failed {
                    kind: TransportFailure::Timeout,
                    detail: String::new(),
                },
                retry("timeout", false),
            ),
        ];
        for (exchange, expected) in table {
            assert_eq!(
                classify(&exchange, &items(0), &policy()),
                expected,
                "{exchange:?}"
            );
        }
    }

    #[test]
    fn a_2xx_that_cannot_be_read_is_unreadable_never_a_plain_retry() {
        // Not a plain retry: the API applied the request, so the key must never be released.
        for body in ["{\"results\": [tru", "<html>", ""] {
            assert!(
                matches!(
                    classify(&answer(200, body), &items(0), &policy()),
                    BatchVerdict::Unreadable { status: 200, .. }
                ),
                "{body:?}"
            );
        }
        let cut = Exchange::Unreadable {
            status: 201,
            kind: TransportFailure::ResponseTooLarge,
            detail: "over the cap".into(),
        };
        assert_eq!(
            classify(&cut, &items(0), &policy()),
            BatchVerdict::Unreadable {
                status: 201,
                detail: "response_too_large: over the cap".into()
            }
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_in_a_message_do_not_cost_the_answer() {
        let items = items(1);
        let mut body = format!(
            r#"{{"results":[{{"id":"{}","status":"error","error":{{"code":"validation_error","message":"bad "#,
            items[0].record_id
        )
        .into_bytes();
        body.extend_from_slice(b"\xff byte, and a NUL: \\u0000\"}}]}");
        let exchange = Exchange::Answered(Answer {
            status: 200,
            retry_after: None,
            should_retry: None,
            replay: false,
            body,
        });
        let BatchVerdict::Answered { outcomes, .. } = classify(&exchange, &items, &policy()) else {
            panic!("not answered");
        };
        assert!(
            matches!(&outcomes[0], ItemOutcome::Dead { code, .. } if code == "validation_error"),
            "{outcomes:?}"
        );
    }

    #[test]
    fn x_should_retry_overrides_the_status() {
        let no = with(answer(503, ""), |a| a.should_retry = Some(false));
        assert!(matches!(
            classify(&no, &items(0), &policy()),
            BatchVerdict::Rejected { status: 503, .. }
        ));
        let yes = with(answer(400, ""), |a| a.should_retry = Some(true));
        assert!(matches!(
            classify(&yes, &items(0), &policy()),
            BatchVerdict::Retry { .. }
        ));
        let auth = with(answer(401, ""), |a| a.should_retry = Some(true));
        assert_eq!(
            classify(&auth, &items(0), &policy()),
            BatchVerdict::AuthRefused { status: 401 }
        );
    }

    #[test]
    fn a_server_requested_delay_slows_every_batch() {
        let ex = with(answer(503, ""), |a| {
            a.retry_after = Some(Duration::from_secs(2))
        });
        assert_eq!(
            classify(&ex, &items(0), &policy()),
            BatchVerdict::Retry {
                code: "http_503".into(),
                retry_after: Some(Duration::from_secs(2)),
                slow_everyone: true
            }
        );
    }

    #[test]
    fn each_item_gets_its_own_outcome_and_missing_ones_retry() {
        let body = format!(
            r#"{{"results":[{{"id":"{B}","status":"error","error":{{"code":"not_found","message":"no such record"}}}}],
                "summary":{{"total":1,"succeeded":0,"failed":1}}}}"#
        );
        let BatchVerdict::Answered {
            outcomes,
            anomalies,
        } = classify(&answer(200, &body), &items(0), &policy())
        else {
            panic!()
        };
        assert_eq!(
            outcomes,
            vec![
                ItemOutcome::Retry {
                    code: "missing_result".into(),
                    message: "the API's 200 carried no result for this item".into()
                },
                ItemOutcome::Dead {
                    code: "not_found".into(),
                    message: "no such record".into()
                },
            ]
        );
        assert_eq!(
            anomalies,
            Anomalies {
                missing: 1,
                ..Anomalies::default()
            }
        );
    }

    #[test]
    fn duplicate_and_unknown_results_and_a_lying_summary_are_counted_not_trusted() {
        let body = format!(
            r#"{{"results":[{{"id":"{A}","status":"ok"}},{{"id":"{A}","status":"error","error":{{"code":"not_found"}}}},
               {{"id":"99999999-6e1a-4fe4-a799-aa6d9a6ab26e","status":"ok"}},{{"id":null,"status":"error"}},
               {{"id":"{B}","status":"ok"}}],"summary":{{"total":2,"succeeded":2,"failed":0}}}}"#
        );
        let BatchVerdict::Answered {
            outcomes,
            anomalies,
        } = classify(&answer(200, &body), &items(0), &policy())
        else {
            panic!()
        };
        assert_eq!(
            outcomes,
            vec![ItemOutcome::Succeeded, ItemOutcome::Succeeded]
        );
        assert_eq!(
            anomalies,
            Anomalies {
                missing: 0,
                duplicate: 1,
                unknown: 2,
                summary_mismatch: true
            }
        );
    }

    #[test]
    fn unknown_codes_retry_until_max_attempts_and_known_ones_follow_their_list() {
        let p = policy();
        assert!(matches!(
            p.item_error("weird", String::new(), 0),
            ItemOutcome::Retry { .. }
        ));
        assert!(matches!(
            p.item_error("weird", String::new(), 1),
            ItemOutcome::Retry { .. }
        ));
        assert!(matches!(
            p.item_error("weird", String::new(), 2),
            ItemOutcome::Dead { .. }
        ));
        assert!(matches!(
            p.item_error("rate_limited", String::new(), 50),
            ItemOutcome::Retry { .. }
        ));
        assert!(matches!(
            p.item_error("validation_error", String::new(), 0),
            ItemOutcome::Dead { .. }
        ));
    }

    #[test]
    fn retry_after_reads_milliseconds_then_seconds_then_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        let mut d = HeaderMap::new();
        let at = httpdate::fmt_http_date(now + Duration::from_secs(90));
        d.insert("retry-after", HeaderValue::from_str(&at).unwrap());
        assert_eq!(retry_after(&d, now), Some(Duration::from_secs(90)));
        d.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&d, now), None);
        d.insert("retry-after", HeaderValue::from_static("-4"));
        assert_eq!(retry_after(&d, now), None);
    }

    #[test]
    fn a_retry_after_of_zero_or_in_the_past_is_no_hint() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        for (name, value) in [
            ("retry-after", "0".to_owned()),
            ("retry-after", "0.0004".to_owned()),
            ("retry-after-ms", "0".to_owned()),
            (
                "retry-after",
                httpdate::fmt_http_date(now - Duration::from_secs(2)),
            ),
            ("retry-after", httpdate::fmt_http_date(now)),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(&value).unwrap());
            assert_eq!(retry_after(&h, now), None, "{name}: {value}");
        }
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("1"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1)));
    }

    proptest! {
        #[test]
        fn any_body_gives_a_verdict_and_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let ex = Exchange::Answered(Answer { status, retry_after: None, should_retry: None, replay: false, body });
            let verdict = classify(&ex, &items(1), &policy());
            if let BatchVerdict::Answered { outcomes, .. } = verdict {
                prop_assert_eq!(outcomes.len(), 2);
            }
        }

        #[test]
        fn every_item_of_a_well_formed_200_gets_exactly_one_outcome(
            picks in proptest::collection::vec((0usize..3, any::<bool>()), 0..8)
        ) {
            let ids = [A, B, "99999999-6e1a-4fe4-a799-aa6d9a6ab26e"];
            let results: Vec<String> = picks.iter().map(|(i, ok)| if *ok {
                format!(r#"{{"id":"{}","status":"ok"}}"#, ids[*i])
            } else {
                format!(r#"{{"id":"{}","status":"error","error":{{"code":"validation_error"}}}}"#, ids[*i])
            }).collect();
            let body = format!(r#"{{"results":[{}]}}"#, results.join(","));
            let BatchVerdict::Answered { outcomes, anomalies } = classify(&answer(200, &body), &items(0), &policy()) else {
                return Err(TestCaseError::fail("not answered"));
            };
            prop_assert_eq!(outcomes.len(), 2);
            for (slot, id) in ids[..2].iter().enumerate() {
                let first = picks.iter().find(|(i, _)| ids[*i] == *id);
                match first {
                    None => { let missing = matches!(&outcomes[slot], ItemOutcome::Retry { code, .. } if code == "missing_result"); prop_assert!(missing); }
                    Some((_, true)) => prop_assert_eq!(&outcomes[slot], &ItemOutcome::Succeeded),
                    Some((_, false)) => { let dead = matches!(&outcomes[slot], ItemOutcome::Dead { .. }); prop_assert!(dead); }
                }
            }
            prop_assert_eq!(anomalies.unknown, picks.iter().filter(|(i, _)| *i == 2).count());
        }
    }
}
