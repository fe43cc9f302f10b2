//! `history.keep_responses`: what the API returned for each record it answered `ok`, kept for
//! `prism-sync history` (contact data: off by default, deleted past
//! `history.response_retention`). Read from the answer's body after the fact, by the worker
//! once the batch's outcome is queued, so that neither the classification nor the outcome write
//! waits for it; with the setting off nothing here runs.

use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::warn;
use uuid::Uuid;

use crate::batch::BatchItem;
use crate::store::{KeptResponse, Store};

/// A record larger than this (bytes of JSON) is not kept; its entry says so with `null`.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    results: Vec<Result<'a>>,
}

#[derive(Deserialize)]
struct Result<'a> {
    id: Option<String>,
    status: Option<String>,
    #[serde(borrow, default)]
    record: Option<&'a RawValue>,
}

/// The `ok` results of a 200's body matched to the batch's items (by record id, any spelling):
/// one entry per item answered `ok`, the first such result winning. An unreadable body keeps
/// nothing.
pub fn ok_records(body: &[u8], batch: Uuid, items: &[BatchItem]) -> Vec<KeptResponse> {
    let Ok(parsed) = serde_json::from_slice::<Body<'_>>(body) else {
        return Vec::new();
    };
    let mut kept: Vec<KeptResponse> = Vec::new();
    for result in parsed.results {
        if result.status.as_deref() != Some("ok") {
            continue;
        }
        let Some(id) = result
            .id
            .as_deref()
            .and_then(|i| Uuid::try_parse(i.trim()).ok())
        else {
            continue;
        };
        let Some(item) = items.iter().find(|i| i.record_id == id) else {
            continue;
        };
        if kept.iter().any(|k| k.record_id == id) {
            continue;
        }
        let record = result
            .record
            .map(RawValue::get)
            .filter(|r| r.len() <= MAX_RECORD_BYTES)
            .map(str::to_owned);
        kept.push(KeptResponse {
            record_id: id,
            batch_id: batch,
            rows: item.rows.clone(),
            record,
        });
    }
    kept
}

/// Keeps the `ok` records of an answered batch. Awaited by the worker after the batch's outcome
/// was queued (so the outcome write never waits for it, and shutdown waits for it like any other
/// worker step); a failed write loses only this copy of the answer.
pub async fn keep(store: &Store, body: &[u8], batch: Uuid, items: &[BatchItem]) {
    let kept = ok_records(body, batch, items);
    if kept.is_empty() {
        return;
    }
    if let Err(e) = store.keep_responses(&kept).await {
        warn!(batch_id = %batch, error = %e, "could not keep the API's answer for history");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ok_results_of_the_batchs_items_are_kept_with_their_rows() {
        let (a, b, stranger) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let items = vec![
            BatchItem {
                record_id: a,
                rows: vec![1, 2],
                attempts: 0,
            },
            BatchItem {
                record_id: b,
                rows: vec![3],
                attempts: 0,
            },
        ];
        let body = serde_json::json!({"results": [
            {"id": a.to_string().to_uppercase(), "status": "ok", "record": {"id": a, "default": {"n": 1}}},
            {"id": b.to_string(), "status": "error", "error": {"code": "not_found"}},
            {"id": stranger.to_string(), "status": "ok", "record": {}},
            {"id": null, "status": "ok"},
        ]});
        let batch = Uuid::now_v7();
        let kept = ok_records(body.to_string().as_bytes(), batch, &items);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].record_id, a);
        assert_eq!(kept[0].rows, vec![1, 2]);
        let record: serde_json::Value =
            serde_json::from_str(kept[0].record.as_deref().unwrap()).unwrap();
        assert_eq!(record["default"]["n"], 1);
        assert!(ok_records(b"not json", batch, &items).is_empty());
    }

    #[test]
    fn a_record_too_large_to_keep_is_kept_as_null() {
        let a = Uuid::new_v4();
        let items = vec![BatchItem {
            record_id: a,
            rows: vec![1],
            attempts: 0,
        }];
        let big = "x".repeat(MAX_RECORD_BYTES);
        let body =
            serde_json::json!({"results": [{"id": a, "status": "ok", "record": {"note": big}}]});
        let kept = ok_records(body.to_string().as_bytes(), Uuid::now_v7(), &items);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].record, None);
    }
}
