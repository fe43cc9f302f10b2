//! The simulator's memory: records and their apply log, the idempotency cache, and what it observed.
//!
//! Each part sits behind its own `std::sync::Mutex`, held only for in-memory work (never across an
//! `.await`), so a request takes each lock once and briefly.
//!
//! Records are scoped per team: a record is `(team, object type, id)`, where the team is an index into
//! the simulator's teams (0 is the primary team). Statistics are kept globally and per team.
//!
//! **Invariant:** a record is changed (updated or deleted) only inside [`Store::apply`], which appends
//! to the apply log under the same lock; so the log's `seq` order is the order in which each record's
//! changes were applied. `seq` is global across teams: one team's part of the log may skip numbers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::faults::FaultKind;

/// The simulator speaks the same object types as the daemon.
pub use crate::model::{ObjectType, Operation, UnknownObjectType};

/// One item the simulator applied, in the order it applied them. A delete answered `not_found` was
/// not applied and is not logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedChange {
    /// Global (across teams), gap-free, starting at 1; per record it increases in apply order.
    pub seq: u64,
    /// The team whose record changed, as configured ([`super::SimConfig::team_id`] or an extra
    /// team's id). Empty when read from a log written before teams existed.
    #[serde(default)]
    pub team: String,
    /// `"update"` or `"delete"`; `"update"` when absent (logs written before deletes existed).
    #[serde(default)]
    pub operation: Operation,
    pub object_type: ObjectType,
    pub record_id: Uuid,
    /// For an update, the item exactly as it arrived in the request (including its `id`). For a
    /// delete, `null`: a delete carries no patch, and `record_id` names the record.
    pub item: Value,
    /// The `Idempotency-Key` of the request that carried it, if it had one.
    pub idempotency_key: Option<String>,
}

/// A stored record: what a read would return, minus the id (the map key).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Record {
    pub default: Map<String, Value>,
    pub list: Option<Value>,
    pub extended: Option<Value>,
}

/// The record as the API returns it: `{"id", "default", "list"?, "extended"?}`, borrowed so that a
/// response can carry a snapshot without cloning the record.
#[derive(Serialize)]
struct RecordView<'a> {
    id: Uuid,
    default: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    list: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended: Option<&'a Value>,
}

impl Record {
    fn view(&self, id: Uuid) -> RecordView<'_> {
        RecordView {
            id,
            default: &self.default,
            list: self.list.as_ref(),
            extended: self.extended.as_ref(),
        }
    }

    pub fn to_json(&self, id: Uuid) -> Value {
        serde_json::to_value(self.view(id)).unwrap_or(Value::Null)
    }

    /// The snapshot a result carries, serialised once while the record is at hand.
    fn to_raw(&self, id: Uuid) -> Box<RawValue> {
        serde_json::value::to_raw_value(&self.view(id))
            .expect("a record of JSON values always serialises")
    }

    /// `default` merges key by key (a PATCH); `list` and `extended` merge the same way when both sides
    /// are objects and are replaced otherwise. Takes the item by value: its values move in.
    fn merge(&mut self, mut item: Map<String, Value>) {
        if let Some(Value::Object(default)) = item.remove("default") {
            self.default.extend(default);
        }
        merge_optional(&mut self.list, item.remove("list"));
        merge_optional(&mut self.extended, item.remove("extended"));
    }
}

fn merge_optional(target: &mut Option<Value>, patch: Option<Value>) {
    let Some(patch) = patch else { return };
    match (target.as_mut(), patch) {
        (Some(Value::Object(existing)), Value::Object(patch)) => existing.extend(patch),
        (_, patch) => *target = Some(patch),
    }
}

/// An item that passed validation and was chosen to be applied.
pub(crate) struct ApplyItem {
    pub id: Uuid,
    pub body: Map<String, Value>,
    /// The item's exact bytes, a zero-copy slice of the request body, for the apply log.
    pub raw: Bytes,
}

/// What applying one item did.
pub(crate) enum ApplyOutcome {
    /// Updated: the record as it stands after the change.
    Applied(Box<RawValue>),
    /// Deleted: the record is gone.
    Deleted,
    NotFound,
}

/// A team, as the store and the statistics know it: an index into the simulator's teams, 0 being
/// the primary team ([`super::SimConfig::team_id`]).
pub(crate) type TeamIndex = usize;

/// An apply-log entry as stored: the item's bytes rather than a parsed copy, which keeps applying
/// cheap (no deep clone per item) and the log compact. A delete's `raw` is empty.
struct LoggedChange {
    team: TeamIndex,
    operation: Operation,
    object_type: ObjectType,
    record_id: Uuid,
    raw: Bytes,
    idempotency_key: Option<Arc<str>>,
}

impl LoggedChange {
    fn to_public(&self, seq: u64, team_names: &[String]) -> AppliedChange {
        let item = match self.operation {
            // The bytes were parsed as JSON before they were logged.
            Operation::Update => serde_json::from_slice(&self.raw).unwrap_or(Value::Null),
            Operation::Delete => Value::Null,
        };
        AppliedChange {
            seq,
            team: team_names.get(self.team).cloned().unwrap_or_default(),
            operation: self.operation,
            object_type: self.object_type,
            record_id: self.record_id,
            item,
            idempotency_key: self.idempotency_key.as_deref().map(str::to_owned),
        }
    }
}

/// Which changes to list from the apply log.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LogFilter {
    /// `None`: every team.
    pub team: Option<TeamIndex>,
    pub record_id: Option<Uuid>,
    pub object_type: Option<ObjectType>,
    pub after_seq: u64,
}

pub(crate) struct Store {
    /// Team names by index, for the public form of the log.
    team_names: Arc<[String]>,
    records: HashMap<(TeamIndex, ObjectType, Uuid), Record>,
    /// Entry `i` has `seq` `i + 1`.
    log: Vec<LoggedChange>,
}

impl Store {
    pub fn new(team_names: Arc<[String]>) -> Self {
        Self {
            team_names,
            records: HashMap::new(),
            log: Vec::new(),
        }
    }

    /// Applies the items in order. An update of an id with no record is `not_found` when
    /// `implicit_records` is off, and creates the record otherwise; a delete of an id with no record
    /// is `not_found` either way. Only what was applied is logged.
    pub fn apply(
        &mut self,
        team: TeamIndex,
        object_type: ObjectType,
        operation: Operation,
        items: Vec<ApplyItem>,
        idempotency_key: Option<&Arc<str>>,
        implicit_records: bool,
    ) -> Vec<ApplyOutcome> {
        items
            .into_iter()
            .map(|item| {
                let key = (team, object_type, item.id);
                let outcome = match operation {
                    Operation::Update => {
                        let record = match self.records.get_mut(&key) {
                            Some(record) => record,
                            None if implicit_records => self.records.entry(key).or_default(),
                            None => return ApplyOutcome::NotFound,
                        };
                        record.merge(item.body);
                        ApplyOutcome::Applied(record.to_raw(item.id))
                    }
                    Operation::Delete => match self.records.remove(&key) {
                        Some(_) => ApplyOutcome::Deleted,
                        None => return ApplyOutcome::NotFound,
                    },
                };
                self.log.push(LoggedChange {
                    team,
                    operation,
                    object_type,
                    record_id: item.id,
                    raw: item.raw,
                    idempotency_key: idempotency_key.cloned(),
                });
                outcome
            })
            .collect()
    }

    /// Creates or merges a record without logging it as an applied change (test set-up).
    pub fn seed(
        &mut self,
        team: TeamIndex,
        object_type: ObjectType,
        id: Uuid,
        body: Map<String, Value>,
    ) -> Value {
        let record = self.records.entry((team, object_type, id)).or_default();
        record.merge(body);
        record.to_json(id)
    }

    pub fn record(&self, team: TeamIndex, object_type: ObjectType, id: Uuid) -> Option<Value> {
        self.records
            .get(&(team, object_type, id))
            .map(|r| r.to_json(id))
    }

    pub fn changes(&self, filter: LogFilter) -> Vec<AppliedChange> {
        let skip = usize::try_from(filter.after_seq).unwrap_or(usize::MAX);
        self.log
            .iter()
            .enumerate()
            .skip(skip)
            .filter(|(_, change)| filter.team.is_none_or(|team| change.team == team))
            .filter(|(_, change)| filter.record_id.is_none_or(|id| change.record_id == id))
            .filter(|(_, change)| filter.object_type.is_none_or(|t| change.object_type == t))
            .map(|(index, change)| change.to_public(index as u64 + 1, &self.team_names))
            .collect()
    }

    /// Records of one team, or of all teams.
    pub fn record_count(&self, team: Option<TeamIndex>) -> usize {
        match team {
            None => self.records.len(),
            Some(team) => self.records.keys().filter(|(t, _, _)| *t == team).count(),
        }
    }
}

/// A finished response as the idempotency cache keeps it: replayed byte for byte.
#[derive(Debug, Clone)]
pub(crate) struct CachedResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// The answer of the idempotency cache to a request that carries a key.
pub(crate) enum Claim {
    /// The key is new (or expired): the request is now the one running under it.
    Fresh,
    Replay(CachedResponse),
    Mismatch,
    InProgress,
}

enum Slot {
    InProgress {
        fingerprint: u64,
    },
    Done {
        fingerprint: u64,
        response: CachedResponse,
        generation: u64,
    },
}

/// Keys are scoped per team: `(team, key)`.
pub(crate) type ScopedKey = (String, String);

/// The first completed response per key, for `ttl`. Completed entries expire in insertion order (the
/// TTL is the same for all), so one queue serves both expiry and the capacity bound.
pub(crate) struct IdempotencyCache {
    slots: HashMap<ScopedKey, Slot>,
    order: VecDeque<(Instant, ScopedKey, u64)>,
    ttl: Duration,
    capacity: usize,
    next_generation: u64,
}

impl IdempotencyCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            capacity: capacity.max(1),
            next_generation: 0,
        }
    }

    pub fn claim(&mut self, key: &ScopedKey, fingerprint: u64, now: Instant) -> Claim {
        self.expire(now);
        match self.slots.get(key) {
            None => {
                self.slots
                    .insert(key.clone(), Slot::InProgress { fingerprint });
                Claim::Fresh
            }
            Some(Slot::InProgress { fingerprint: first }) if *first != fingerprint => {
                Claim::Mismatch
            }
            Some(Slot::InProgress { .. }) => Claim::InProgress,
            Some(Slot::Done {
                fingerprint: first, ..
            }) if *first != fingerprint => Claim::Mismatch,
            Some(Slot::Done { response, .. }) => Claim::Replay(response.clone()),
        }
    }

    /// The first request under `key` finished with a response worth replaying.
    pub fn complete(&mut self, key: &ScopedKey, response: CachedResponse, now: Instant) {
        let Some(Slot::InProgress { fingerprint }) = self.slots.get(key) else {
            // A reset cleared the key while its request ran: nothing to complete.
            return;
        };
        let fingerprint = *fingerprint;
        let generation = self.next_generation;
        self.next_generation += 1;
        let expires_at = now + self.ttl;
        self.slots.insert(
            key.clone(),
            Slot::Done {
                fingerprint,
                response,
                generation,
            },
        );
        self.order.push_back((expires_at, key.clone(), generation));
        while self.order.len() > self.capacity {
            self.evict_front();
        }
    }

    /// The first request under `key` ended without a cacheable response: the key is free again.
    pub fn release(&mut self, key: &ScopedKey) {
        if matches!(self.slots.get(key), Some(Slot::InProgress { .. })) {
            self.slots.remove(key);
        }
    }

    pub fn in_progress(&self) -> usize {
        self.slots
            .values()
            .filter(|slot| matches!(slot, Slot::InProgress { .. }))
            .count()
    }

    pub fn cached(&self) -> usize {
        self.order.len()
    }

    /// `(cached, in progress)` for the keys of one team.
    pub fn counts_for_team(&self, team: &str) -> (usize, usize) {
        self.slots
            .iter()
            .filter(|((owner, _), _)| owner == team)
            .fold((0, 0), |(done, running), (_, slot)| match slot {
                Slot::Done { .. } => (done + 1, running),
                Slot::InProgress { .. } => (done, running + 1),
            })
    }

    pub fn clear(&mut self) {
        // In-progress keys stay: their requests are still running and will complete or release them.
        self.slots
            .retain(|_, slot| matches!(slot, Slot::InProgress { .. }));
        self.order.clear();
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(expires_at, _, _)| *expires_at <= now)
        {
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        let Some((_, key, generation)) = self.order.pop_front() else {
            return;
        };
        if matches!(self.slots.get(&key), Some(Slot::Done { generation: g, .. }) if *g == generation)
        {
            self.slots.remove(&key);
        }
    }
}

/// Counters the simulator keeps; `GET /_sim/stats` returns them as JSON, and `GET /_sim/stats?team=T`
/// the same counters for the requests whose path named team `T` (with the gauges for that team).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    pub requests_total: u64,
    /// By HTTP status as decided by the server (a dropped connection counts as the 200 it would have been).
    pub requests_by_status: BTreeMap<u16, u64>,
    /// Responses served from the idempotency cache.
    pub replays: u64,
    pub items_applied: u64,
    /// Items answered `status: "error"` (validation, not found and injected errors alike).
    pub items_failed: u64,
    /// 409 `idempotency_key_mismatch` responses.
    pub idempotency_mismatches: u64,
    /// 409 `idempotency_key_in_use` responses.
    pub idempotency_in_progress: u64,
    /// Injected faults by kind (`error_500`, `rate_limit`, `drop_after_apply`, `item_error`, ...);
    /// item-level kinds count items, the others count requests.
    pub faults_injected: BTreeMap<String, u64>,
    /// Gauges at the time of the call.
    pub records: usize,
    pub idempotency_keys_cached: usize,
    pub idempotency_keys_in_progress: usize,
}

impl SimStats {
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults_injected
            .get(kind.as_str())
            .copied()
            .unwrap_or(0)
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.requests_by_status.get(&status).copied().unwrap_or(0)
    }
}

/// One request as `GET /_sim/requests` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLogEntry {
    /// When the request was answered (or, for one whose client went away, its work ended):
    /// RFC 3339, UTC.
    pub at: String,
    /// When the request arrived, before any latency or work: RFC 3339, UTC. A slow request is
    /// answered seconds after it was sent; this says when it was sent.
    #[serde(default)]
    pub received_at: String,
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    /// The team the path named, as configured; `null` when it named no team the simulator knows.
    #[serde(default)]
    pub team: Option<String>,
    /// Which batch endpoint was called.
    #[serde(default)]
    pub operation: Operation,
    pub status: u16,
    /// Items (or ids) in the request body (0 when it was not read or not parseable).
    pub items: usize,
    pub replay: bool,
    /// Faults injected into this request, by kind.
    pub faults: Vec<String>,
}

/// What one request contributes to the statistics.
#[derive(Debug, Default)]
pub(crate) struct RequestOutcome {
    pub status: u16,
    pub items: usize,
    pub replay: bool,
    pub items_applied: u64,
    pub items_failed: u64,
    pub mismatch: bool,
    pub in_progress: bool,
    /// Kind and how many (items for item-level kinds, 1 otherwise).
    pub faults: Vec<(FaultKind, u64)>,
}

/// Which request an outcome belongs to, for the request log and the per-team statistics.
pub(crate) struct RequestMeta<'a> {
    pub path: &'a str,
    /// The `Idempotency-Key` header as sent (even if it was refused).
    pub key: Option<&'a str>,
    /// The team the path named, if the simulator knows it.
    pub team: Option<TeamIndex>,
    pub operation: Operation,
    /// When the request arrived.
    pub received: time::OffsetDateTime,
}

impl SimStats {
    fn count(&mut self, outcome: &RequestOutcome) {
        self.requests_total += 1;
        *self.requests_by_status.entry(outcome.status).or_default() += 1;
        self.replays += u64::from(outcome.replay);
        self.items_applied += outcome.items_applied;
        self.items_failed += outcome.items_failed;
        self.idempotency_mismatches += u64::from(outcome.mismatch);
        self.idempotency_in_progress += u64::from(outcome.in_progress);
        for (kind, count) in &outcome.faults {
            *self
                .faults_injected
                .entry(kind.as_str().to_owned())
                .or_default() += count;
        }
    }
}

/// Statistics (global and per team) and the bounded ring of recent requests.
pub(crate) struct Observations {
    stats: SimStats,
    /// Indexed by [`TeamIndex`].
    team_stats: Vec<SimStats>,
    team_names: Arc<[String]>,
    recent: VecDeque<RequestLogEntry>,
    capacity: usize,
}

impl Observations {
    pub fn new(capacity: usize, team_names: Arc<[String]>) -> Self {
        Self {
            stats: SimStats::default(),
            team_stats: vec![SimStats::default(); team_names.len()],
            team_names,
            recent: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn record(&mut self, method: &str, meta: &RequestMeta<'_>, outcome: RequestOutcome) {
        self.stats.count(&outcome);
        if let Some(stats) = meta.team.and_then(|team| self.team_stats.get_mut(team)) {
            stats.count(&outcome);
        }
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(RequestLogEntry {
            at: now_rfc3339(),
            received_at: rfc3339(meta.received),
            method: method.to_owned(),
            path: meta.path.to_owned(),
            idempotency_key: meta.key.map(str::to_owned),
            team: meta
                .team
                .and_then(|team| self.team_names.get(team))
                .cloned(),
            operation: meta.operation,
            status: outcome.status,
            items: outcome.items,
            replay: outcome.replay,
            faults: outcome
                .faults
                .iter()
                .map(|(kind, _)| kind.as_str().to_owned())
                .collect(),
        });
    }

    /// The counters of one team, or of every request.
    pub fn stats(&self, team: Option<TeamIndex>) -> SimStats {
        match team {
            None => self.stats.clone(),
            Some(team) => self.team_stats.get(team).cloned().unwrap_or_default(),
        }
    }

    /// The most recent `limit` requests, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestLogEntry> {
        let skip = self.recent.len().saturating_sub(limit);
        self.recent.iter().skip(skip).cloned().collect()
    }
}

fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> ScopedKey {
        ("team".to_owned(), k.to_owned())
    }

    fn response(body: &'static str) -> CachedResponse {
        CachedResponse {
            status: 200,
            content_type: "application/json",
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn a_completed_key_replays_until_its_ttl_runs_out() {
        let now = Instant::now();
        let mut cache = IdempotencyCache::new(Duration::from_secs(10), 100);
        assert!(matches!(cache.claim(&key("a"), 1, now), Claim::Fresh));
        assert!(matches!(cache.claim(&key("a"), 1, now), Claim::InProgress));
        assert!(matches!(cache.claim(&key("a"), 2, now), Claim::Mismatch));
        cache.complete(&key("a"), response("{}"), now);
        assert!(matches!(cache.claim(&key("a"), 1, now), Claim::Replay(_)));
        assert!(matches!(cache.claim(&key("a"), 2, now), Claim::Mismatch));
        let almost = now + Duration::from_millis(9_999);
        assert!(matches!(
            cache.claim(&key("a"), 1, almost),
            Claim::Replay(_)
        ));
        let later = now + Duration::from_secs(10);
        assert!(matches!(cache.claim(&key("a"), 2, later), Claim::Fresh));
    }

    #[test]
    fn the_oldest_key_is_evicted_past_capacity() {
        let now = Instant::now();
        let mut cache = IdempotencyCache::new(Duration::from_secs(10), 2);
        for k in ["a", "b", "c"] {
            assert!(matches!(cache.claim(&key(k), 1, now), Claim::Fresh));
            cache.complete(&key(k), response("{}"), now);
        }
        assert_eq!(cache.cached(), 2);
        assert!(matches!(cache.claim(&key("a"), 1, now), Claim::Fresh));
        assert!(matches!(cache.claim(&key("c"), 1, now), Claim::Replay(_)));
    }

    fn apply_one(store: &mut Store, team: TeamIndex, operation: Operation, id: Uuid) -> bool {
        let item = ApplyItem {
            id,
            body: Map::new(),
            raw: Bytes::from_static(b"{}"),
        };
        let outcome = store.apply(team, ObjectType::Contact, operation, vec![item], None, true);
        !matches!(outcome[..], [ApplyOutcome::NotFound])
    }

    #[test]
    fn a_delete_removes_only_its_teams_record_and_only_an_applied_one_is_logged() {
        let mut store = Store::new(vec!["a".to_owned(), "b".to_owned()].into());
        let id = Uuid::new_v4();
        assert!(apply_one(&mut store, 0, Operation::Update, id));
        assert!(apply_one(&mut store, 1, Operation::Update, id));
        assert!(apply_one(&mut store, 1, Operation::Delete, id));
        assert!(!apply_one(&mut store, 1, Operation::Delete, id));
        assert!(store.record(0, ObjectType::Contact, id).is_some());
        assert!(store.record(1, ObjectType::Contact, id).is_none());
        assert_eq!(
            (store.record_count(None), store.record_count(Some(1))),
            (1, 0)
        );

        let log = store.changes(LogFilter::default());
        assert_eq!(log.len(), 3);
        assert_eq!(log[2].seq, 3);
        assert_eq!(log[2].team, "b");
        assert_eq!(log[2].operation, Operation::Delete);
        assert_eq!(log[2].item, Value::Null);
        let only_b = store.changes(LogFilter {
            team: Some(1),
            ..LogFilter::default()
        });
        assert_eq!(only_b.iter().map(|c| c.seq).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn an_applied_change_without_team_or_operation_reads_as_an_update() {
        let old = r#"{"seq": 1, "object_type": "contact",
            "record_id": "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e", "item": {}, "idempotency_key": null}"#;
        let change: AppliedChange = serde_json::from_str(old).expect("old shape parses");
        assert_eq!(change.operation, Operation::Update);
        assert_eq!(change.team, "");
    }

    #[test]
    fn a_released_key_can_be_used_again() {
        let now = Instant::now();
        let mut cache = IdempotencyCache::new(Duration::from_secs(10), 2);
        assert!(matches!(cache.claim(&key("a"), 1, now), Claim::Fresh));
        cache.release(&key("a"));
        assert!(matches!(cache.claim(&key("a"), 2, now), Claim::Fresh));
        assert_eq!(cache.in_progress(), 1);
    }
}
