//! The final checker: reads the outbox and batches on one side and the simulator's apply log,
//! request log and statistics on the other, and lists every broken promise.
//!
//! Every workload patch carries a marker, `{"default": {"n": k}}` with `k` the row's ordinal
//! among its record's rows. prism-sync may coalesce consecutive `default`-only rows of a record
//! into one item (later keys win), so an applied item carries the marker of the last row it
//! merged. The checks:
//!
//! 1. every row ends `succeeded` or `dead`, and `dead` only where the scenario expects it, with
//!    the expected code (a transient fault never kills a row);
//! 2. stored before sent: every key the simulator saw, and every key it applied under, is a
//!    stored batch;
//! 3. each applied item matches its stored batch: the batch has an item for that record, and the
//!    item's rows' highest marker is the applied marker;
//! 4. per record, applied markers increase in apply (`seq`) order: a smaller marker after a
//!    larger one is an order violation, an equal one a change applied twice, allowed only when
//!    the earlier key's batch was *released* (given up unanswered and re-sent under a new key,
//!    which the design permits: PATCH values are absolute and order still holds) in a scenario
//!    that expects releases ([`Releases::Required`]);
//! 5. no key applied the same record twice (an expired key re-executed);
//! 6. no row was applied under two keys (unless the earlier batch was released), and no `dead`
//!    row was applied at all;
//! 7. every `succeeded` row was carried by an applied item; each record's last applied marker
//!    is its last succeeded row's marker; a record with no succeeded row had nothing applied;
//! 8. the simulator never answered `idempotency_key_mismatch`, and its count of applied items
//!    equals the apply log;
//! 9. no batch is left `open` once every row has finished;
//! 10. with a short simulator TTL: no key was sent again after the TTL since its first send;
//! 11. releases as the scenario expects: none at all ([`Releases::None`], every scenario but the
//!     key-lifetime one: a release there would be a takeover or a fault handled by giving up on
//!     a key, which re-applies changes), or at least one ([`Releases::Required`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An outbox row as the checker sees it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    /// Lower-cased text of the stored record id (lossy for hostile bytes).
    pub record: String,
    pub marker: Option<u64>,
    pub state: String,
    pub code: Option<String>,
}

impl OutboxRow {
    pub fn new(
        id: i64,
        record: &[u8],
        patch: Option<&[u8]>,
        state: String,
        code: Option<String>,
    ) -> OutboxRow {
        let marker = patch
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .and_then(|v| v.pointer("/default/n").and_then(Value::as_u64));
        OutboxRow {
            id,
            record: String::from_utf8_lossy(record).trim().to_lowercase(),
            marker,
            state,
            code,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchItem {
    pub r: String,
    pub rows: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct BatchRow {
    pub id: String,
    pub key: String,
    pub state: String,
    pub items: Vec<BatchItem>,
}

impl BatchRow {
    pub fn new(id: String, key: String, state: String, items: &str) -> BatchRow {
        BatchRow {
            id,
            key,
            state,
            items: serde_json::from_str(items).unwrap_or_default(),
        }
    }
}

pub struct DbSnapshot {
    pub rows: Vec<OutboxRow>,
    pub batches: Vec<BatchRow>,
}

/// One entry of `GET /_sim/applied`.
#[derive(Debug, Clone, Deserialize)]
pub struct Applied {
    pub seq: u64,
    pub record_id: String,
    pub item: Value,
    pub idempotency_key: Option<String>,
}

/// One entry of `GET /_sim/requests`.
#[derive(Debug, Clone, Deserialize)]
pub struct Request {
    /// When the simulator answered it.
    pub at: String,
    /// When it arrived (empty from a simulator that does not say).
    #[serde(default)]
    pub received_at: String,
    pub idempotency_key: Option<String>,
    pub status: u16,
    /// The team the path named (`null` for a team the simulator does not know).
    #[serde(default)]
    pub team: Option<String>,
    /// Faults the simulator injected into this request (`rate_limit`, `latency`, ...).
    #[serde(default)]
    pub faults: Vec<String>,
}

pub struct SimSnapshot {
    pub applied: Vec<Applied>,
    pub requests: Vec<Request>,
    pub stats: Value,
}

/// Whether a scenario may release batches (give up on their keys and re-send their rows under
/// new ones, which can apply a change a second time).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Releases {
    /// No batch may be released, and so nothing may be applied twice: the scenario's faults are
    /// all answered by re-sending under the same key (or by a takeover of the same key).
    #[default]
    None,
    /// The scenario drives batches past `batch.max_key_age`: at least one must be released, and
    /// a change re-applied under the new key after a release is allowed (and counted).
    Required,
}

/// What the scenario expects beyond the universal promises.
#[derive(Debug, Default, Clone)]
pub struct Expect {
    /// Rows that must end `dead`, with the code each must carry; every other row must succeed.
    pub dead: BTreeMap<i64, String>,
    /// The simulator's idempotency TTL, when a scenario made it short.
    pub sim_ttl: Option<Duration>,
    /// Releases: none (the default), or required.
    pub releases: Releases,
    /// Expected-dead rows whose changes the API applied all the same: a 2xx whose answer could
    /// never be read (`unreadable_response`). Their records need not end at a succeeded row.
    pub applied_dead: BTreeSet<i64>,
}

/// The checker's findings and the counts behind them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub rows: usize,
    pub succeeded: usize,
    pub dead: usize,
    pub records: usize,
    pub batches: usize,
    pub batches_released: usize,
    pub batches_split: usize,
    pub requests: u64,
    /// Requests the simulator's bounded log still held (the key checks cover these).
    pub requests_checked: usize,
    pub applied: usize,
    pub replays: u64,
    pub key_in_use_409s: u64,
    /// Items applied again under a new key after their batch was released (allowed).
    pub reapplied_after_release: usize,
    pub violations: Vec<String>,
}

const SHOWN: usize = 25;

struct Violations {
    list: Vec<String>,
    more: usize,
}

impl Violations {
    fn push(&mut self, v: String) {
        if self.list.len() < SHOWN {
            self.list.push(v);
        } else {
            self.more += 1;
        }
    }
}

fn parse_at(at: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
}

pub fn check(db: &DbSnapshot, sim: &SimSnapshot, expect: &Expect) -> Verdict {
    let mut v = Violations {
        list: Vec::new(),
        more: 0,
    };
    let rows: HashMap<i64, &OutboxRow> = db.rows.iter().map(|r| (r.id, r)).collect();
    let by_key: HashMap<&str, &BatchRow> = db.batches.iter().map(|b| (b.key.as_str(), b)).collect();
    let item_of = |key: &str, record: &str| -> Option<(&BatchRow, &BatchItem)> {
        let batch = by_key.get(key)?;
        let item = batch
            .items
            .iter()
            .find(|i| i.r.eq_ignore_ascii_case(record))?;
        Some((batch, item))
    };

    // 1. Terminal states, dead only where expected.
    for r in &db.rows {
        match (r.state.as_str(), expect.dead.get(&r.id)) {
            ("succeeded", None) => {}
            ("dead", Some(code)) if r.code.as_deref() == Some(code.as_str()) => {}
            ("dead", Some(code)) => v.push(format!(
                "row {} is dead with {:?}, expected {code}",
                r.id, r.code
            )),
            ("dead", None) => v.push(format!(
                "row {} went dead with {:?}: only the scenario's poison or hostile rows may die, never a row hit by a transient fault",
                r.id, r.code
            )),
            ("succeeded", Some(code)) => v.push(format!(
                "row {} succeeded but was expected dead with {code}",
                r.id
            )),
            (state, _) => v.push(format!(
                "row {} ended {state} ({:?}): not terminal",
                r.id, r.code
            )),
        }
    }
    for id in expect.dead.keys() {
        if !rows.contains_key(id) {
            v.push(format!("expected-dead row {id} is missing from the outbox"));
        }
    }

    // 2. Stored before sent.
    for req in &sim.requests {
        match &req.idempotency_key {
            None => v.push(format!(
                "a request at {} carried no Idempotency-Key",
                req.at
            )),
            Some(k) if !by_key.contains_key(k.as_str()) => v.push(format!(
                "key {k} was sent (at {}, status {}) but no stored batch has it",
                req.at, req.status
            )),
            Some(_) => {}
        }
    }

    // 3-6. The apply log against the stored batches.
    let mut last: HashMap<String, (u64, String)> = HashMap::new();
    let mut applied_pairs: HashSet<(String, String)> = HashSet::new();
    // row id → keys it was applied under, in apply order
    let mut row_applies: HashMap<i64, Vec<String>> = HashMap::new();
    let mut reapplied_after_release = 0;
    let may_release = expect.releases == Releases::Required;
    let released =
        |key: &str| may_release && by_key.get(key).is_some_and(|b| b.state == "released");
    for a in &sim.applied {
        let record = a.record_id.to_lowercase();
        let Some(key) = &a.idempotency_key else {
            v.push(format!(
                "seq {}: record {record} applied by a request without a key",
                a.seq
            ));
            continue;
        };
        let Some(marker) = a.item.pointer("/default/n").and_then(Value::as_u64) else {
            v.push(format!(
                "seq {}: record {record} applied without a marker: {}",
                a.seq, a.item
            ));
            continue;
        };
        let Some((batch, item)) = item_of(key, &record) else {
            v.push(format!(
                "seq {}: record {record} applied under key {key}, but no stored batch with that key carries the record",
                a.seq
            ));
            continue;
        };
        let markers: Vec<Option<u64>> = item
            .rows
            .iter()
            .map(|id| rows.get(id).and_then(|r| r.marker))
            .collect();
        if markers.iter().any(Option::is_none) {
            v.push(format!(
                "seq {}: batch {} item for {record} names rows {:?} not all in the outbox with markers",
                a.seq, batch.id, item.rows
            ));
        } else {
            let top = markers.iter().flatten().max().copied().unwrap_or(0);
            if top != marker {
                v.push(format!(
                    "seq {}: record {record} applied marker {marker} under key {key}, but the batch's rows {:?} end at marker {top}",
                    a.seq, item.rows
                ));
            }
        }
        for id in &item.rows {
            if rows.get(id).is_some_and(|r| r.record != record) {
                v.push(format!(
                    "batch {} item for {record} carries row {id} of another record",
                    batch.id
                ));
            }
        }
        if !applied_pairs.insert((key.clone(), record.clone())) {
            v.push(format!(
                "seq {}: key {key} applied record {record} a second time (an expired key re-executed?)",
                a.seq
            ));
        }
        if let Some((prev, prev_key)) = last.get(&record) {
            let prev_released = released(prev_key);
            if marker < *prev {
                v.push(format!(
                    "seq {}: record {record} applied marker {marker} after {prev}: per-record order broken",
                    a.seq
                ));
            } else if marker == *prev {
                if prev_released && prev_key != key {
                    reapplied_after_release += 1;
                } else {
                    v.push(format!(
                        "seq {}: record {record} marker {marker} applied twice (keys {prev_key} then {key}) without a release",
                        a.seq
                    ));
                }
            }
        }
        last.insert(record.clone(), (marker, key.clone()));
        for id in &item.rows {
            row_applies.entry(*id).or_default().push(key.clone());
        }
    }
    for (row, keys) in &row_applies {
        if keys.len() > 1 {
            let earlier_all_released = keys[..keys.len() - 1].iter().all(|k| released(k));
            if !earlier_all_released {
                v.push(format!(
                    "row {row} was applied under {} keys ({keys:?}) and the earlier batches were not released: sent twice under different keys",
                    keys.len()
                ));
            }
        }
        if rows.get(row).is_some_and(|r| r.state == "dead") && !expect.applied_dead.contains(row) {
            v.push(format!(
                "row {row} was applied (keys {keys:?}) but is recorded dead"
            ));
        }
    }

    // 7. Nothing lost: every succeeded row applied; each record ends at its last change.
    let mut last_succeeded: BTreeMap<&str, u64> = BTreeMap::new();
    for r in db.rows.iter().filter(|r| r.state == "succeeded") {
        if !row_applies.contains_key(&r.id) {
            v.push(format!(
                "row {} (record {}, marker {:?}) is succeeded but no applied item carried it",
                r.id, r.record, r.marker
            ));
        }
        if let Some(m) = r.marker {
            let e = last_succeeded.entry(r.record.as_str()).or_default();
            *e = (*e).max(m);
        }
    }
    // Rows dead as `unreadable_response` may or may not have been applied: a record may end at
    // one of them, past its last succeeded row.
    let mut maybe_applied: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for r in db
        .rows
        .iter()
        .filter(|r| expect.applied_dead.contains(&r.id))
    {
        if let Some(m) = r.marker {
            maybe_applied
                .entry(r.record.as_str())
                .or_default()
                .insert(m);
        }
    }
    for (record, m) in &last_succeeded {
        match last.get(*record) {
            Some((applied, _)) if applied == m => {}
            Some((applied, _))
                if applied > m
                    && maybe_applied.get(*record).is_some_and(|s| s.contains(applied)) => {}
            Some((applied, _)) => v.push(format!(
                "record {record} ends at marker {applied} in the API, but its last succeeded change is {m}"
            )),
            None => v.push(format!(
                "record {record} has succeeded rows (last marker {m}) but nothing was applied"
            )),
        }
    }
    let applied_dead_records: BTreeSet<&str> = db
        .rows
        .iter()
        .filter(|r| expect.applied_dead.contains(&r.id))
        .map(|r| r.record.as_str())
        .collect();
    for record in last.keys() {
        if !last_succeeded.contains_key(record.as_str())
            && !applied_dead_records.contains(record.as_str())
        {
            v.push(format!(
                "record {record} was applied but none of its rows succeeded"
            ));
        }
    }

    // 8. The simulator's own counters.
    let stat = |k: &str| sim.stats[k].as_u64().unwrap_or(0);
    if stat("idempotency_mismatches") > 0 {
        v.push(format!(
            "the simulator answered idempotency_key_mismatch {} time(s)",
            stat("idempotency_mismatches")
        ));
    }
    if stat("items_applied") != sim.applied.len() as u64 {
        v.push(format!(
            "the simulator counted {} applied items but its log holds {}",
            stat("items_applied"),
            sim.applied.len()
        ));
    }

    // 9. No batch left open.
    for b in db.batches.iter().filter(|b| b.state == "open") {
        let open_rows: Vec<i64> = b.items.iter().flat_map(|i| i.rows.clone()).collect();
        v.push(format!(
            "batch {} (key {}) is still open after every row finished (rows {open_rows:?})",
            b.id, b.key
        ));
    }

    // 10. No key outlived the simulator's TTL.
    if let Some(ttl) = expect.sim_ttl {
        let mut first: HashMap<&str, time::OffsetDateTime> = HashMap::new();
        for req in &sim.requests {
            let (Some(k), Some(at)) = (req.idempotency_key.as_deref(), parse_at(&req.at)) else {
                continue;
            };
            let start = *first.entry(k).or_insert(at);
            let span = at - start;
            if span >= time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX) {
                v.push(format!(
                    "key {k} was sent again {span} after its first send, past the API's {ttl:?} idempotency window"
                ));
            }
        }
    }

    // 11. Releases as the scenario expects.
    let released_batches: Vec<&BatchRow> = db
        .batches
        .iter()
        .filter(|b| b.state == "released")
        .collect();
    match expect.releases {
        Releases::None => {
            for b in &released_batches {
                let rows: Vec<i64> = b.items.iter().flat_map(|i| i.rows.clone()).collect();
                // A batch given up with every row dead as the scenario expects (a team removed
                // from the configuration, a key refused past retry.give_up_after) sends nothing
                // again: no release in the sense that matters here.
                if !rows.is_empty() && rows.iter().all(|r| expect.dead.contains_key(r)) {
                    continue;
                }
                v.push(format!(
                    "batch {} (key {}) was released (rows {rows:?} given up to new keys), but this scenario never expects a release",
                    b.id, b.key
                ));
            }
        }
        Releases::Required if released_batches.is_empty() => v.push(
            "no batch was released: the scenario did not drive a batch past batch.max_key_age"
                .into(),
        ),
        Releases::Required => {}
    }

    let mut violations = v.list;
    if v.more > 0 {
        violations.push(format!("… and {} more", v.more));
    }
    Verdict {
        rows: db.rows.len(),
        succeeded: db.rows.iter().filter(|r| r.state == "succeeded").count(),
        dead: db.rows.iter().filter(|r| r.state == "dead").count(),
        records: db
            .rows
            .iter()
            .map(|r| r.record.as_str())
            .collect::<HashSet<_>>()
            .len(),
        batches: db.batches.len(),
        batches_released: db.batches.iter().filter(|b| b.state == "released").count(),
        batches_split: db.batches.iter().filter(|b| b.state == "split").count(),
        requests: stat("requests_total"),
        requests_checked: sim.requests.len(),
        applied: sim.applied.len(),
        replays: stat("replays"),
        key_in_use_409s: stat("idempotency_in_progress"),
        reapplied_after_release,
        violations,
    }
}

/// The checker must catch what it claims to catch: each broken promise below, planted in an
/// otherwise clean history, is reported.
mod self_test {
    use super::*;
    use serde_json::json;

    const A: &str = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e";

    fn row(id: i64, n: u64, state: &str) -> OutboxRow {
        let patch = format!(r#"{{"default": {{"n": {n}}}}}"#);
        OutboxRow::new(id, A.as_bytes(), Some(patch.as_bytes()), state.into(), None)
    }

    fn batch(key: &str, state: &str, rows: &[i64]) -> BatchRow {
        BatchRow::new(
            format!("b-{key}"),
            key.into(),
            state.into(),
            &json!([{"r": A, "rows": rows, "a": 0}]).to_string(),
        )
    }

    fn applied(seq: u64, key: &str, n: u64) -> Applied {
        Applied {
            seq,
            record_id: A.into(),
            item: json!({"id": A, "default": {"n": n}}),
            idempotency_key: Some(key.into()),
        }
    }

    fn request(key: &str) -> Request {
        Request {
            at: "2026-01-01T00:00:00Z".into(),
            received_at: "2026-01-01T00:00:00Z".into(),
            idempotency_key: Some(key.into()),
            status: 200,
            team: Some("team".into()),
            faults: Vec::new(),
        }
    }

    fn sim(applied: Vec<Applied>, requests: Vec<Request>, mismatches: u64) -> SimSnapshot {
        SimSnapshot {
            stats: json!({"items_applied": applied.len(), "idempotency_mismatches": mismatches}),
            applied,
            requests,
        }
    }

    /// Two rows of one record, coalesced into one item under key k1, applied once.
    fn clean() -> (DbSnapshot, SimSnapshot) {
        (
            DbSnapshot {
                rows: vec![row(1, 1, "succeeded"), row(2, 2, "succeeded")],
                batches: vec![batch("k1", "done", &[1, 2])],
            },
            sim(vec![applied(1, "k1", 2)], vec![request("k1")], 0),
        )
    }

    fn violations(db: &DbSnapshot, sim: &SimSnapshot) -> Vec<String> {
        check(db, sim, &Expect::default()).violations
    }

    #[test]
    fn a_clean_history_passes() {
        let (db, sim) = clean();
        assert_eq!(violations(&db, &sim), Vec::<String>::new());
    }

    #[test]
    fn a_change_applied_twice_under_two_keys_is_caught() {
        let (mut db, _) = clean();
        db.batches.push(batch("k2", "done", &[1, 2]));
        let sim = sim(
            vec![applied(1, "k1", 2), applied(2, "k2", 2)],
            vec![request("k1"), request("k2")],
            0,
        );
        let v = violations(&db, &sim);
        assert!(v.iter().any(|m| m.contains("applied twice")), "{v:?}");
        assert!(
            v.iter()
                .any(|m| m.contains("sent twice under different keys")),
            "{v:?}"
        );
    }

    /// Row 1-2's batch k1 released after it was applied, and the rows applied again under k2.
    fn released_and_reapplied() -> (DbSnapshot, SimSnapshot) {
        let (mut db, _) = clean();
        db.batches[0].state = "released".into();
        db.batches.push(batch("k2", "done", &[1, 2]));
        let sim = sim(
            vec![applied(1, "k1", 2), applied(2, "k2", 2)],
            vec![request("k1"), request("k2")],
            0,
        );
        (db, sim)
    }

    #[test]
    fn a_reapplication_after_a_release_is_allowed_and_counted_where_releases_are_expected() {
        let (db, sim) = released_and_reapplied();
        let expect = Expect {
            releases: Releases::Required,
            ..Expect::default()
        };
        let verdict = check(&db, &sim, &expect);
        assert_eq!(verdict.violations, Vec::<String>::new());
        assert_eq!(verdict.reapplied_after_release, 1);
        assert_eq!(verdict.batches_released, 1);
    }

    #[test]
    fn a_release_and_its_reapplication_are_caught_where_no_release_is_expected() {
        let (db, sim) = released_and_reapplied();
        let v = violations(&db, &sim);
        assert!(
            v.iter()
                .any(|m| m.contains("batch b-k1 (key k1) was released")),
            "{v:?}"
        );
        assert!(v.iter().any(|m| m.contains("applied twice")), "{v:?}");
        assert!(
            v.iter()
                .any(|m| m.contains("sent twice under different keys")),
            "{v:?}"
        );
    }

    #[test]
    fn a_release_without_a_reapplication_is_caught_where_no_release_is_expected() {
        let (mut db, sim) = clean();
        db.batches.push(batch("k0", "released", &[1, 2]));
        let v = violations(&db, &sim);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("never expects a release"), "{v:?}");
    }

    #[test]
    fn a_scenario_that_requires_a_release_fails_without_one() {
        let (db, sim) = clean();
        let expect = Expect {
            releases: Releases::Required,
            ..Expect::default()
        };
        let v = check(&db, &sim, &expect).violations;
        assert!(
            v.iter().any(|m| m.contains("no batch was released")),
            "{v:?}"
        );
    }

    #[test]
    fn changes_applied_out_of_order_are_caught() {
        let db = DbSnapshot {
            rows: vec![row(1, 1, "succeeded"), row(2, 2, "succeeded")],
            batches: vec![batch("k1", "done", &[1]), batch("k2", "done", &[2])],
        };
        let sim = sim(
            vec![applied(1, "k2", 2), applied(2, "k1", 1)],
            vec![request("k1"), request("k2")],
            0,
        );
        let v = violations(&db, &sim);
        assert!(
            v.iter().any(|m| m.contains("per-record order broken")),
            "{v:?}"
        );
        assert!(v.iter().any(|m| m.contains("ends at marker 1")), "{v:?}");
    }

    #[test]
    fn a_succeeded_row_never_applied_is_caught() {
        let (mut db, sim) = clean();
        db.rows.push(row(3, 3, "succeeded"));
        let v = violations(&db, &sim);
        assert!(
            v.iter()
                .any(|m| m.contains("row 3") && m.contains("no applied item")),
            "{v:?}"
        );
    }

    #[test]
    fn a_key_sent_but_never_stored_is_caught() {
        let (db, mut sim) = clean();
        sim.requests.push(request("k9"));
        let v = violations(&db, &sim);
        assert!(
            v.iter()
                .any(|m| m.contains("k9") && m.contains("no stored batch")),
            "{v:?}"
        );
    }

    #[test]
    fn an_unexpected_dead_row_an_unfinished_row_and_an_open_batch_are_caught() {
        let (mut db, sim) = clean();
        db.rows.push(row(3, 3, "dead"));
        db.rows.push(row(4, 4, "retrying"));
        db.batches.push(batch("k3", "open", &[4]));
        let v = violations(&db, &sim);
        assert!(v.iter().any(|m| m.contains("row 3 went dead")), "{v:?}");
        assert!(
            v.iter().any(|m| m.contains("row 4 ended retrying")),
            "{v:?}"
        );
        assert!(v.iter().any(|m| m.contains("still open")), "{v:?}");
    }

    #[test]
    fn an_item_that_does_not_match_its_batch_is_caught() {
        let (db, _) = clean();
        let sim = sim(vec![applied(1, "k1", 1)], vec![request("k1")], 0);
        let v = violations(&db, &sim);
        assert!(v.iter().any(|m| m.contains("end at marker 2")), "{v:?}");
    }

    #[test]
    fn a_key_mismatch_and_a_key_reused_past_the_ttl_are_caught() {
        let (db, mut sim_snapshot) = clean();
        sim_snapshot.stats["idempotency_mismatches"] = json!(1);
        sim_snapshot.requests.push(Request {
            at: "2026-01-01T00:00:09Z".into(),
            ..request("k1")
        });
        let expect = Expect {
            sim_ttl: Some(Duration::from_secs(8)),
            ..Expect::default()
        };
        let v = check(&db, &sim_snapshot, &expect).violations;
        assert!(
            v.iter().any(|m| m.contains("idempotency_key_mismatch")),
            "{v:?}"
        );
        assert!(v.iter().any(|m| m.contains("past the API's")), "{v:?}");
    }
}
