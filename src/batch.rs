//! Building batches from claimed rows: validation, per-record coalescing, and the exact request
//! bytes. Pure functions; the stores call [`plan_batches`] inside their claim transaction.
//!
//! **Architecture invariant:** a batch holds at most one item per record, so a result's `id`
//! names exactly one item, and every row of a record in the batch shares that item's outcome.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use std::collections::BTreeSet;

use crate::model::{ObjectType, Operation, codes};

/// A row as read from the outbox, before anything is trusted about it.
#[derive(Debug, Clone)]
pub struct CandidateRow {
    pub id: i64,
    /// The record id exactly as stored (used to find the record's other rows).
    pub record_id_raw: Vec<u8>,
    /// `None` when the patch is larger than the configured limit (the store does not read it).
    pub patch: Option<Vec<u8>>,
    pub object_type: Vec<u8>,
    /// `update` or `delete` as stored.
    pub operation: Vec<u8>,
    /// The team as stored: `''` is the configured default team.
    pub team_id: Vec<u8>,
    pub attempts: i32,
    /// Whether a later waiting row of the same record exists (heads only; followers are looked
    /// up only for heads that have one).
    pub has_later: bool,
}

impl CandidateRow {
    /// Its patch's bytes as stored (none when the store did not read it, being over the limit:
    /// it goes dead).
    pub fn patch_bytes(&self) -> usize {
        self.patch.as_ref().map_or(0, Vec::len)
    }

    /// A cheap superset test for "the patch may be `default`-only", so that the stores look up a
    /// head's followers only when they could merge.
    pub fn may_coalesce(&self) -> bool {
        self.operation == b"update"
            && self
                .patch
                .as_deref()
                .is_some_and(|p| p.windows(9).any(|w| w == b"\"default\""))
    }
}

/// Takes up to `max` rows from several lanes' candidate lists (each in `id` order), one from
/// each lane in turn, so that a backlog in one lane does not crowd out the others.
pub fn fair_share(lanes: Vec<Vec<CandidateRow>>, max: usize) -> Vec<CandidateRow> {
    let total: usize = lanes.iter().map(Vec::len).sum();
    let mut taken = Vec::with_capacity(total.min(max));
    let mut lanes: Vec<std::vec::IntoIter<CandidateRow>> =
        lanes.into_iter().map(Vec::into_iter).collect();
    while taken.len() < max && !lanes.is_empty() {
        lanes.retain_mut(|lane| match lane.next() {
            Some(row) if taken.len() < max => {
                taken.push(row);
                true
            }
            _ => false,
        });
    }
    taken
}

/// Pairs each head with its record's followers (any order in, `id` order out).
pub fn record_chains(heads: Vec<CandidateRow>, followers: Vec<CandidateRow>) -> Vec<RecordChain> {
    let mut by_record: std::collections::HashMap<Vec<u8>, Vec<CandidateRow>> =
        std::collections::HashMap::new();
    for f in followers {
        by_record
            .entry(f.record_id_raw.clone())
            .or_default()
            .push(f);
    }
    heads
        .into_iter()
        .map(|head| {
            let mut followers = by_record.remove(&head.record_id_raw).unwrap_or_default();
            followers.sort_by_key(|f| f.id);
            RecordChain { head, followers }
        })
        .collect()
}

/// A claimed record: its oldest active row and the pending rows after it, in `id` order.
#[derive(Debug, Clone)]
pub struct RecordChain {
    pub head: CandidateRow,
    pub followers: Vec<CandidateRow>,
}

/// The request bytes one claim may take per team ([`RecordChain::request_bytes`]): what is free
/// of the team's buffer (`sync.max_buffer_bytes`), so that what a process holds ready is bounded
/// in bytes as well as in batches. Teams are named by the `team_id` values stored for them;
/// rows of a team not named here (an unknown team: they go dead) are not limited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ByteBudget {
    /// Per team: its stored `team_id` values and the bytes it may take.
    teams: Vec<(Vec<String>, usize)>,
}

impl ByteBudget {
    /// Lets the team stored as any of `keys` take `bytes` in this claim.
    pub fn allow(&mut self, keys: &[String], bytes: usize) {
        self.teams.push((keys.to_vec(), bytes));
    }

    fn team_of(&self, team_id: &[u8]) -> Option<usize> {
        self.teams
            .iter()
            .position(|(keys, _)| keys.iter().any(|k| k.as_bytes() == team_id))
    }
}

/// What an item adds to a request besides its patch: `{"id":"<uuid>",` and a separator.
const ITEM_ENVELOPE_BYTES: usize = 48;

impl RecordChain {
    /// The most its item can take of a request body: its rows' patches (merged, never more
    /// than their sum; a patch the store did not read, being over the limit, counts nothing:
    /// it goes dead) and the item's id.
    pub fn request_bytes(&self) -> usize {
        std::iter::once(&self.head)
            .chain(&self.followers)
            .map(CandidateRow::patch_bytes)
            .sum::<usize>()
            + ITEM_ENVELOPE_BYTES
    }
}

/// The record chains, in claim order, that fit their team's share of `budget`, and how many
/// were left waiting. A chain that would take its team past its bytes is left (unclaimed: its
/// rows wait for a later claim, in order), and so is every later chain of that team; a team's
/// first chain is always taken, so that one record whose changes alone exceed the budget still
/// goes (the buffer then holds that much, and takes nothing more until it is sent). Rows of no
/// team in the budget, or of an object type or operation no batch carries, go dead: they take
/// no room and are never left.
pub fn fit_budget(chains: Vec<RecordChain>, budget: &ByteBudget) -> (Vec<RecordChain>, usize) {
    let mut spent = vec![0usize; budget.teams.len()];
    let mut full = vec![false; budget.teams.len()];
    let mut left = 0;
    let mut kept = Vec::with_capacity(chains.len());
    for chain in chains {
        if let Some(team) = budget
            .team_of(&chain.head.team_id)
            .filter(|_| sendable_lane(&chain.head))
        {
            let bytes = chain.request_bytes();
            let limit = budget.teams[team].1;
            if full[team] || (spent[team] > 0 && spent[team].saturating_add(bytes) > limit) {
                full[team] = true;
                left += 1;
                continue;
            }
            spent[team] = spent[team].saturating_add(bytes);
        }
        kept.push(chain);
    }
    (kept, left)
}

/// Whether the row's object type and operation are ones a batch can carry (else it goes dead
/// at planning and takes no room in a buffer).
fn sendable_lane(row: &CandidateRow) -> bool {
    parse_stored::<ObjectType>(&row.object_type).is_some()
        && parse_stored::<Operation>(&row.operation).is_some()
}

/// A stored column as the model's value (`validate`'s parse, and [`sendable_lane`]'s).
fn parse_stored<T: std::str::FromStr>(stored: &[u8]) -> Option<T> {
    std::str::from_utf8(stored).ok()?.parse().ok()
}

/// A row that can never be sent; it goes `dead` in the claim transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRow {
    pub id: i64,
    pub code: &'static str,
    pub message: String,
}

/// One item of a batch and the outbox rows it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    #[serde(rename = "r")]
    pub record_id: Uuid,
    pub rows: Vec<i64>,
    /// The highest attempt count among the rows when the batch was built.
    #[serde(rename = "a")]
    pub attempts: i32,
}

/// A batch ready to be stored: its identity, key, exact request bytes and rows.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: Uuid,
    pub idempotency_key: String,
    /// The team as stored in the outbox (`''`: the configured default team).
    pub team: String,
    pub object_type: ObjectType,
    pub operation: Operation,
    pub body: Vec<u8>,
    pub items: Vec<BatchItem>,
}

impl NewBatch {
    /// What the batch is, beyond its bytes and items.
    pub fn shape(&self) -> BatchShape<'_> {
        BatchShape {
            team: &self.team,
            object_type: self.object_type,
            operation: self.operation,
        }
    }

    pub fn row_count(&self) -> usize {
        self.items.iter().map(|i| i.rows.len()).sum()
    }

    /// `(row id, batch id)` for every row the batch carries.
    pub fn row_assignments(&self) -> impl Iterator<Item = (i64, Uuid)> + '_ {
        self.items
            .iter()
            .flat_map(move |i| i.rows.iter().map(move |r| (*r, self.id)))
    }

    pub fn items_json(&self) -> String {
        serde_json::to_string(&self.items).expect("items serialise")
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    pub batch_size: usize,
    pub coalesce: bool,
    pub max_coalesce: usize,
    pub max_patch_bytes: usize,
    /// A batch takes items only while its patches fit in this many bytes (a lone item of any
    /// size still goes). The API answers each item with its record, at least as large as the
    /// patch, and an answer over `http.max_response_bytes` cannot be read: its rows would go
    /// `dead` as `unreadable_response` however often they were sent. The engine sets half of
    /// `http.max_response_bytes`.
    pub max_request_bytes: usize,
}

/// The `team_id` values a claim may send: `''` (the configured default team), the default team's
/// own id, and every team with a `[teams."<id>"]` entry. Rows of any other team go dead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamSet(BTreeSet<String>);

impl TeamSet {
    pub fn new<I: IntoIterator<Item = String>>(teams: I) -> TeamSet {
        let mut set: BTreeSet<String> = teams.into_iter().collect();
        set.insert(String::new());
        TeamSet(set)
    }

    pub fn contains(&self, team: &str) -> bool {
        self.0.contains(team)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub dead: Vec<DeadRow>,
    pub batches: Vec<NewBatch>,
}

/// A row that passed validation.
struct ValidRow {
    record_id: Uuid,
    team: String,
    object_type: ObjectType,
    operation: Operation,
    /// Empty for a delete (its patch is never sent).
    patch: Map<String, Value>,
}

fn validate(
    row: &CandidateRow,
    max_patch_bytes: usize,
    teams: &TeamSet,
) -> Result<ValidRow, DeadRow> {
    let dead = |code, message: String| DeadRow {
        id: row.id,
        code,
        message,
    };
    let operation = parse_stored::<Operation>(&row.operation).ok_or_else(|| {
        dead(
            codes::INVALID_OPERATION,
            format!(
                "operation {:?} is not update or delete",
                truncate(&String::from_utf8_lossy(&row.operation), 64)
            ),
        )
    })?;
    let team = std::str::from_utf8(&row.team_id)
        .ok()
        .filter(|t| teams.contains(t))
        .map(str::to_owned)
        .ok_or_else(|| {
            dead(
                codes::UNKNOWN_TEAM,
                format!(
                    "team_id {:?} has no [teams.\"<id>\"] entry (and is not micro.team_id): no API key to send it with",
                    truncate(&String::from_utf8_lossy(&row.team_id), 64)
                ),
            )
        })?;
    let object_type = parse_stored::<ObjectType>(&row.object_type).ok_or_else(|| {
            dead(
                codes::INVALID_OBJECT_TYPE,
                format!(
                    "object_type {:?} is not one of contact, organization, deal, engagement, action, identity, document",
                    truncate(&String::from_utf8_lossy(&row.object_type), 64)
                ),
            )
        })?;
    // Only the canonical form (lowercase, hyphenated) as stored: the per-record order guard
    // compares record ids as stored, so an id taken for the UUID it spells in some other form
    // would make one record two. Postgres stores a uuid; SQLite's trigger (migrations 0003,
    // 0009) rewrites every spelling it can read (case, braces, hyphens, urn:uuid:, surrounding
    // whitespace, a BLOB) as it is inserted; what is left is no UUID it could read.
    let record_id = std::str::from_utf8(&row.record_id_raw)
        .ok()
        .and_then(|s| {
            Uuid::try_parse(s)
                .ok()
                .filter(|u| u.hyphenated().encode_lower(&mut Uuid::encode_buffer()) == s)
        })
        .ok_or_else(|| {
            dead(
                codes::INVALID_RECORD_ID,
                format!(
                    "record_id {:?} is not a UUID",
                    truncate(&String::from_utf8_lossy(&row.record_id_raw), 64)
                ),
            )
        })?;
    let patch = match operation {
        // A delete sends only the record id; whatever the patch column holds is not read.
        Operation::Delete => Map::new(),
        Operation::Update => validate_patch(row.patch.as_deref(), max_patch_bytes)
            .map_err(|(code, message)| dead(code, message))?,
    };
    Ok(ValidRow {
        record_id,
        team,
        object_type,
        operation,
        patch,
    })
}

/// An update's patch: at most `max_patch_bytes` (`None`: the store found it larger), UTF-8,
/// a JSON object without `id`. Else the dead code and message.
fn validate_patch(
    bytes: Option<&[u8]>,
    max_patch_bytes: usize,
) -> Result<Map<String, Value>, (&'static str, String)> {
    let Some(bytes) = bytes else {
        return Err((
            codes::PATCH_TOO_LARGE,
            format!("patch is larger than batch.max_patch_bytes ({max_patch_bytes} bytes)"),
        ));
    };
    if bytes.len() > max_patch_bytes {
        return Err((
            codes::PATCH_TOO_LARGE,
            format!(
                "patch is {} bytes, over batch.max_patch_bytes ({max_patch_bytes})",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        (
            codes::INVALID_PATCH,
            format!("patch is not valid UTF-8: {e}"),
        )
    })?;
    // serde_json refuses nesting deeper than 128 levels, which bounds the work a hostile patch
    // can cause here and in the server.
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (codes::INVALID_PATCH, format!("patch is not JSON: {e}")))?;
    let Value::Object(patch) = value else {
        return Err((
            codes::INVALID_PATCH,
            format!("patch must be a JSON object, not {}", kind(&value)),
        ));
    };
    if patch.contains_key("id") {
        return Err((
            codes::INVALID_PATCH,
            "patch must not carry \"id\": the record id comes from record_id".into(),
        ));
    }
    Ok(patch)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first `max` characters of `s`, with `…` when it was longer.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// Only a patch of the form `{"default": {...}}` may be merged with its neighbours: merging
/// `list` or other parts could change what the API does with them.
fn default_only(patch: &Map<String, Value>) -> Option<&Map<String, Value>> {
    match (patch.len(), patch.get("default")) {
        (1, Some(Value::Object(default))) => Some(default),
        _ => None,
    }
}

#[derive(Serialize)]
struct ItemBody<'a> {
    id: Uuid,
    #[serde(flatten)]
    patch: &'a Map<String, Value>,
}

struct PlannedItem {
    lane: (String, ObjectType, Operation),
    item: BatchItem,
    patch: Map<String, Value>,
    /// The item's bytes in a request, at most: its rows' patches as stored, and the envelope.
    bytes: usize,
}

/// Turns claimed record chains into dead rows and batches of at most `batch_size` items of one
/// team, object type and operation, within `max_request_bytes` ([`PlanLimits`]). Heads that
/// are malformed go dead and their followers wait for the next claim; a follower joins its
/// head only while both are `default`-only updates of the same team and type (a delete is
/// never merged with anything).
pub fn plan_batches(chains: Vec<RecordChain>, limits: PlanLimits, teams: &TeamSet) -> Plan {
    let mut plan = Plan::default();
    let mut items: Vec<PlannedItem> = Vec::with_capacity(chains.len());
    for chain in chains {
        let head = match validate(&chain.head, limits.max_patch_bytes, teams) {
            Ok(head) => head,
            Err(dead) => {
                plan.dead.push(dead);
                continue;
            }
        };
        let mut rows = vec![chain.head.id];
        let mut attempts = chain.head.attempts;
        let mut patch = head.patch;
        let mut bytes = ITEM_ENVELOPE_BYTES
            + match head.operation {
                Operation::Update => chain.head.patch_bytes(),
                Operation::Delete => 0,
            };
        if limits.coalesce && head.operation == Operation::Update && default_only(&patch).is_some()
        {
            for follower in &chain.followers {
                if rows.len() >= limits.max_coalesce {
                    break;
                }
                let Ok(next) = validate(follower, limits.max_patch_bytes, teams) else {
                    break;
                };
                if next.object_type != head.object_type
                    || next.record_id != head.record_id
                    || next.team != head.team
                    || next.operation != Operation::Update
                {
                    break;
                }
                let Some(later) = default_only(&next.patch) else {
                    break;
                };
                if let Some(Value::Object(merged)) = patch.get_mut("default") {
                    for (k, v) in later {
                        merged.insert(k.clone(), v.clone());
                    }
                }
                rows.push(follower.id);
                attempts = attempts.max(follower.attempts);
                bytes += follower.patch_bytes();
            }
        }
        items.push(PlannedItem {
            lane: (head.team, head.object_type, head.operation),
            item: BatchItem {
                record_id: head.record_id,
                rows,
                attempts,
            },
            patch,
            bytes,
        });
    }
    // Lanes in order of their first item, items within a lane in claim order.
    type LaneItems<'p> = (&'p (String, ObjectType, Operation), Vec<&'p PlannedItem>);
    let mut lanes: Vec<LaneItems<'_>> = Vec::new();
    for item in &items {
        match lanes.iter_mut().find(|(lane, _)| **lane == item.lane) {
            Some((_, of_lane)) => of_lane.push(item),
            None => lanes.push((&item.lane, vec![item])),
        }
    }
    for ((team, object_type, operation), of_lane) in lanes {
        for chunk in request_chunks(&of_lane, limits) {
            plan.batches
                .push(build_batch(team, *object_type, *operation, chunk));
        }
    }
    plan
}

/// A lane's items, in order, as batches of at most `batch_size` items whose bytes stay within
/// `max_request_bytes` (an item larger than that goes alone).
fn request_chunks<'p, 'i>(
    items: &'p [&'i PlannedItem],
    limits: PlanLimits,
) -> Vec<&'p [&'i PlannedItem]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let count = i - start;
        if count > 0
            && (count >= limits.batch_size.max(1) || bytes + item.bytes > limits.max_request_bytes)
        {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += item.bytes;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

fn build_batch(
    team: &str,
    object_type: ObjectType,
    operation: Operation,
    items: &[&PlannedItem],
) -> NewBatch {
    #[derive(Serialize)]
    struct Updates<'a> {
        items: Vec<ItemBody<'a>>,
    }
    #[derive(Serialize)]
    struct Deletes {
        ids: Vec<Uuid>,
    }
    let body = match operation {
        Operation::Update => serde_json::to_vec(&Updates {
            items: items
                .iter()
                .map(|i| ItemBody {
                    id: i.item.record_id,
                    patch: &i.patch,
                })
                .collect(),
        }),
        Operation::Delete => serde_json::to_vec(&Deletes {
            ids: items.iter().map(|i| i.item.record_id).collect(),
        }),
    };
    NewBatch {
        id: Uuid::now_v7(),
        idempotency_key: format!("prism-sync-{}", Uuid::new_v4()),
        team: team.to_owned(),
        object_type,
        operation,
        body: body.expect("a JSON map serialises"),
        items: items.iter().map(|i| i.item.clone()).collect(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stored batch body is not {{\"items\": [...]}} or {{\"ids\": [...]}}: {0}")]
pub struct BodyError(String);

/// What a stored batch is, beyond its bytes and items: needed to rebuild halves of it.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape<'a> {
    pub team: &'a str,
    pub object_type: ObjectType,
    pub operation: Operation,
}

/// Splits a stored batch in two halves under new ids and keys, keeping each item's exact bytes
/// (used to bisect a batch the API rejected whole). `None` for a batch of one item.
pub fn split_batch(
    shape: BatchShape<'_>,
    body: &[u8],
    items: &[BatchItem],
) -> Result<Option<[NewBatch; 2]>, BodyError> {
    #[derive(Deserialize)]
    struct Stored<'a> {
        #[serde(borrow, alias = "ids")]
        items: Vec<&'a RawValue>,
    }
    let stored: Stored<'_> = serde_json::from_slice(body).map_err(|e| BodyError(e.to_string()))?;
    let field: &[u8] = match shape.operation {
        Operation::Update => b"{\"items\":[",
        Operation::Delete => b"{\"ids\":[",
    };
    if stored.items.len() != items.len() {
        return Err(BodyError(format!(
            "{} items in the body but {} in the batch's row map",
            stored.items.len(),
            items.len()
        )));
    }
    if items.len() < 2 {
        return Ok(None);
    }
    let mid = items.len() / 2;
    let half = |raw: &[&RawValue], its: &[BatchItem]| {
        let mut body =
            Vec::with_capacity(raw.iter().map(|r| r.get().len() + 1).sum::<usize>() + 12);
        body.extend_from_slice(field);
        for (i, r) in raw.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(r.get().as_bytes());
        }
        body.extend_from_slice(b"]}");
        NewBatch {
            id: Uuid::now_v7(),
            idempotency_key: format!("prism-sync-{}", Uuid::new_v4()),
            team: shape.team.to_owned(),
            object_type: shape.object_type,
            operation: shape.operation,
            body,
            items: its.to_vec(),
        }
    };
    Ok(Some([
        half(&stored.items[..mid], &items[..mid]),
        half(&stored.items[mid..], &items[mid..]),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const LIMITS: PlanLimits = PlanLimits {
        batch_size: 100,
        coalesce: true,
        max_coalesce: 100,
        max_patch_bytes: 1024,
        max_request_bytes: usize::MAX,
    };

    fn row(id: i64, record: &str, patch: &str) -> CandidateRow {
        CandidateRow {
            id,
            record_id_raw: record.as_bytes().to_vec(),
            patch: Some(patch.as_bytes().to_vec()),
            object_type: b"contact".to_vec(),
            operation: b"update".to_vec(),
            team_id: Vec::new(),
            attempts: 0,
            has_later: true,
        }
    }

    fn plan(chains: Vec<RecordChain>, limits: PlanLimits) -> Plan {
        plan_batches(chains, limits, &TeamSet::new([]))
    }

    fn chain(head: CandidateRow, followers: Vec<CandidateRow>) -> RecordChain {
        RecordChain { head, followers }
    }

    fn teamed(id: i64, record: &str, team: &str, bytes: usize) -> RecordChain {
        let mut head = row(id, record, &"x".repeat(bytes));
        head.team_id = team.as_bytes().to_vec();
        chain(head, Vec::new())
    }

    #[test]
    fn a_claim_takes_chains_only_up_to_each_teams_bytes_and_always_one() {
        let mut budget = ByteBudget::default();
        // Each chain also counts its item's envelope (48 bytes).
        budget.allow(&[String::new(), "main".into()], 300);
        budget.allow(&["other".into()], 50);
        let chains = vec![
            teamed(1, "a", "", 100),
            teamed(2, "b", "other", 400),
            teamed(3, "c", "main", 100),
            teamed(4, "d", "", 100),
            // Would fit after 4 was left, but a team stops at its first chain left over.
            teamed(5, "e", "", 10),
            teamed(6, "f", "other", 10),
            teamed(7, "g", "stray", 10_000),
            // A known team's row of an unknown object type goes dead: it takes no room.
            chain(
                CandidateRow {
                    object_type: b"planet".to_vec(),
                    ..teamed(8, "h", "", 10_000).head
                },
                Vec::new(),
            ),
        ];
        let (kept, left) = fit_budget(chains, &budget);
        let ids: Vec<i64> = kept.iter().map(|c| c.head.id).collect();
        // Team '' / main: 1 and 3 (296 bytes), then 4 would make 444. Team other: 2 alone is over
        // its 50 but is its first (it always goes), then 6 is left. The stray is not limited.
        assert_eq!(ids, vec![1, 2, 3, 7, 8]);
        assert_eq!(left, 3);
    }

    #[test]
    fn a_chain_counts_its_followers_bytes() {
        let mut budget = ByteBudget::default();
        budget.allow(&[String::new()], 150);
        let long = chain(
            row(1, "a", &"x".repeat(60)),
            vec![row(2, "a", &"y".repeat(60))],
        );
        assert_eq!(long.request_bytes(), 120 + 48);
        let (kept, left) = fit_budget(vec![long, teamed(3, "b", "", 60)], &budget);
        assert_eq!((kept.len(), left), (1, 1));
        let (kept, left) = fit_budget(vec![teamed(3, "b", "", 60)], &ByteBudget::default());
        assert_eq!(
            (kept.len(), left),
            (1, 0),
            "no budget named: nothing limited"
        );
    }

    const A: &str = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e";
    const B: &str = "282bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e";

    fn body(b: &NewBatch) -> Value {
        serde_json::from_slice(&b.body).unwrap()
    }

    #[test]
    fn default_only_changes_of_one_record_merge_and_later_keys_win() {
        let plan = plan(
            vec![chain(
                row(1, A, r#"{"default":{"email":"a@x","name":"A"}}"#),
                vec![
                    row(2, A, r#"{"default":{"email":"b@x"}}"#),
                    row(3, A, r#"{"default":{"phone":"1"}}"#),
                ],
            )],
            LIMITS,
        );
        assert!(plan.dead.is_empty());
        let batch = &plan.batches[0];
        assert_eq!(batch.items[0].rows, vec![1, 2, 3]);
        assert_eq!(
            body(batch),
            json!({"items":[{"id": A, "default": {"email":"b@x","name":"A","phone":"1"}}]})
        );
    }

    #[test]
    fn a_change_with_list_is_never_merged_and_stops_the_chain() {
        let plan = plan(
            vec![chain(
                row(1, A, r#"{"default":{"email":"a@x"}}"#),
                vec![
                    row(2, A, r#"{"default":{"x":1},"list":{"tags":["v"]}}"#),
                    row(3, A, r#"{"default":{"email":"c@x"}}"#),
                ],
            )],
            LIMITS,
        );
        assert_eq!(plan.batches[0].items[0].rows, vec![1]);
        assert_eq!(
            body(&plan.batches[0]),
            json!({"items":[{"id": A, "default": {"email":"a@x"}}]})
        );
    }

    #[test]
    fn malformed_rows_go_dead_with_a_clear_code() {
        let mut wrong_type = row(4, A, "{}");
        wrong_type.object_type = b"contacts".to_vec();
        let mut too_big = row(5, A, "{}");
        too_big.patch = None;
        let mut not_utf8 = row(6, A, "{}");
        not_utf8.patch = Some(vec![b'{', 0xff, b'}']);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let cases = vec![
            (row(1, "not-a-uuid", "{}"), codes::INVALID_RECORD_ID),
            (row(2, A, "[1,2]"), codes::INVALID_PATCH),
            (
                row(3, A, r#"{"id":"x","default":{}}"#),
                codes::INVALID_PATCH,
            ),
            (wrong_type, codes::INVALID_OBJECT_TYPE),
            (too_big, codes::PATCH_TOO_LARGE),
            (not_utf8, codes::INVALID_PATCH),
            (row(7, A, "{\"default\":"), codes::INVALID_PATCH),
            (row(8, A, &deep), codes::PATCH_TOO_LARGE),
        ];
        for (candidate, code) in cases {
            let id = candidate.id;
            let limits = PlanLimits {
                max_patch_bytes: 100_000,
                ..LIMITS
            };
            let limits = if id == 8 {
                PlanLimits {
                    max_patch_bytes: 1000,
                    ..limits
                }
            } else {
                limits
            };
            let plan = plan(vec![chain(candidate, vec![])], limits);
            assert!(plan.batches.is_empty(), "row {id} was batched");
            assert_eq!(
                plan.dead[0].code, code,
                "row {id}: {}",
                plan.dead[0].message
            );
        }
    }

    /// A batch stops taking items before their patches pass `max_request_bytes` (the API
    /// answers each item with its record, and an answer too large to read would end every row
    /// of the batch `dead`); an item larger than that still goes, alone; the order holds.
    #[test]
    fn a_batch_takes_items_only_while_their_bytes_fit_a_request() {
        let limits = PlanLimits {
            max_patch_bytes: 100_000,
            max_request_bytes: 4_000,
            ..LIMITS
        };
        let patch = |n: usize| format!("{{\"default\":{{\"note\":\"{}\"}}}}", "x".repeat(n));
        let record = || Uuid::new_v4().to_string();
        let mut chains: Vec<RecordChain> = (1..=7)
            .map(|id| chain(row(id, &record(), &patch(1_000)), vec![]))
            .collect();
        chains.insert(3, chain(row(100, &record(), &patch(9_000)), vec![]));
        let plan = plan(chains, limits);
        assert!(plan.dead.is_empty(), "{:?}", plan.dead);
        let sizes: Vec<usize> = plan.batches.iter().map(|b| b.items.len()).collect();
        assert_eq!(sizes, [3, 1, 3, 1]);
        for b in &plan.batches {
            assert!(
                b.items.len() == 1 || b.body.len() <= 4_000,
                "{} bytes",
                b.body.len()
            );
        }
        let rows: Vec<i64> = plan
            .batches
            .iter()
            .flat_map(|b| b.items.iter().flat_map(|i| i.rows.clone()))
            .collect();
        assert_eq!(rows, [1, 2, 3, 100, 4, 5, 6, 7]);
    }

    #[test]
    fn deep_nesting_within_the_size_limit_is_refused_not_recursed() {
        let deep = format!("{{\"default\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        let limits = PlanLimits {
            max_patch_bytes: 1 << 20,
            ..LIMITS
        };
        let plan = plan(vec![chain(row(1, A, &deep), vec![])], limits);
        assert_eq!(plan.dead[0].code, codes::INVALID_PATCH);
    }

    #[test]
    fn batches_never_mix_object_types_and_hold_at_most_batch_size_items() {
        let mut chains = Vec::new();
        for i in 0..7 {
            let mut r = row(i, &Uuid::new_v4().to_string(), r#"{"default":{}}"#);
            if i % 2 == 1 {
                r.object_type = b"deal".to_vec();
            }
            chains.push(chain(r, vec![]));
        }
        let plan = plan(
            chains,
            PlanLimits {
                batch_size: 2,
                ..LIMITS
            },
        );
        let sizes: Vec<(ObjectType, usize)> = plan
            .batches
            .iter()
            .map(|b| (b.object_type, b.items.len()))
            .collect();
        assert_eq!(
            sizes,
            [
                (ObjectType::Contact, 2),
                (ObjectType::Contact, 2),
                (ObjectType::Deal, 2),
                (ObjectType::Deal, 1)
            ]
        );
    }

    #[test]
    fn bisection_keeps_each_items_exact_bytes() {
        let plan = plan(
            vec![
                chain(row(1, A, r#"{"default":{"z":1,"a":2}}"#), vec![]),
                chain(row(2, B, r#"{"list":{"t":[1]}}"#), vec![]),
            ],
            LIMITS,
        );
        let batch = &plan.batches[0];
        let [left, right] = split_batch(batch.shape(), &batch.body, &batch.items)
            .unwrap()
            .unwrap();
        assert_eq!(left.items, batch.items[..1]);
        assert_eq!(right.items, batch.items[1..]);
        let joined = format!(
            "{{\"items\":[{},{}]}}",
            &String::from_utf8(left.body.clone()).unwrap()[10..left.body.len() - 2],
            &String::from_utf8(right.body.clone()).unwrap()[10..right.body.len() - 2]
        );
        assert_eq!(joined.as_bytes(), batch.body.as_slice());
        assert_ne!(left.idempotency_key, batch.idempotency_key);
        assert!(
            split_batch(left.shape(), &left.body, &left.items)
                .unwrap()
                .is_none()
        );
    }

    fn op(mut r: CandidateRow, operation: &str, team: &str) -> CandidateRow {
        r.operation = operation.as_bytes().to_vec();
        r.team_id = team.as_bytes().to_vec();
        r
    }

    #[test]
    fn a_delete_is_never_merged_with_the_updates_around_it() {
        let updates = plan(
            vec![chain(
                row(1, A, r#"{"default":{"email":"a@x"}}"#),
                vec![
                    row(2, A, r#"{"default":{"email":"b@x"}}"#),
                    op(row(3, A, "{}"), "delete", ""),
                    row(4, A, r#"{"default":{"email":"c@x"}}"#),
                ],
            )],
            LIMITS,
        );
        assert_eq!(updates.batches.len(), 1);
        assert_eq!(updates.batches[0].items[0].rows, vec![1, 2]);
        let deletes = plan(
            vec![chain(
                op(row(3, A, "not even json"), "delete", ""),
                vec![
                    op(row(4, A, "{}"), "delete", ""),
                    row(5, A, r#"{"default":{}}"#),
                ],
            )],
            LIMITS,
        );
        assert!(deletes.dead.is_empty(), "a delete's patch is not read");
        let batch = &deletes.batches[0];
        assert_eq!(batch.operation, Operation::Delete);
        assert_eq!(batch.items[0].rows, vec![3]);
        assert_eq!(body(batch), json!({"ids": [A]}));
    }

    #[test]
    fn batches_never_mix_teams_or_operations_and_unknown_ones_go_dead() {
        const T: &str = "7d1e2c4a-0000-4000-8000-000000000002";
        let teams = TeamSet::new([T.to_owned()]);
        let plan = plan_batches(
            vec![
                chain(row(1, A, r#"{"default":{}}"#), vec![]),
                chain(op(row(2, B, "{}"), "update", T), vec![]),
                chain(
                    op(row(3, &Uuid::new_v4().to_string(), "{}"), "delete", T),
                    vec![],
                ),
                chain(
                    op(row(4, &Uuid::new_v4().to_string(), "{}"), "upsert", ""),
                    vec![],
                ),
                chain(
                    op(
                        row(5, &Uuid::new_v4().to_string(), "{}"),
                        "update",
                        "other-team",
                    ),
                    vec![],
                ),
            ],
            LIMITS,
            &teams,
        );
        let lanes: Vec<(&str, Operation, usize)> = plan
            .batches
            .iter()
            .map(|b| (b.team.as_str(), b.operation, b.items.len()))
            .collect();
        assert_eq!(
            lanes,
            [
                ("", Operation::Update, 1),
                (T, Operation::Update, 1),
                (T, Operation::Delete, 1)
            ]
        );
        let dead: Vec<(i64, &str)> = plan.dead.iter().map(|d| (d.id, d.code)).collect();
        assert_eq!(
            dead,
            [(4, codes::INVALID_OPERATION), (5, codes::UNKNOWN_TEAM)]
        );
    }

    #[test]
    fn bisecting_a_delete_batch_keeps_its_shape() {
        let chains = (0..3)
            .map(|i| {
                chain(
                    op(row(i, &Uuid::new_v4().to_string(), "{}"), "delete", ""),
                    vec![],
                )
            })
            .collect();
        let plan = plan(chains, LIMITS);
        let batch = &plan.batches[0];
        let [left, right] = split_batch(batch.shape(), &batch.body, &batch.items)
            .unwrap()
            .unwrap();
        assert_eq!(left.operation, Operation::Delete);
        let ids = |b: &NewBatch| body(b)["ids"].as_array().unwrap().len();
        assert_eq!((ids(&left), ids(&right)), (1, 2));
        assert_eq!(right.items, batch.items[1..]);
    }

    #[test]
    fn record_chains_give_each_head_its_own_followers_in_id_order() {
        let chains = record_chains(
            vec![row(1, A, "{}"), row(2, B, "{}")],
            vec![row(9, A, "{}"), row(5, B, "{}"), row(4, A, "{}")],
        );
        let ids = |c: &RecordChain| c.followers.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!((chains[0].head.id, ids(&chains[0])), (1, vec![4, 9]));
        assert_eq!((chains[1].head.id, ids(&chains[1])), (2, vec![5]));
    }

    #[test]
    fn fair_share_takes_from_every_lane_in_turn() {
        let lane = |from: i64, n: i64| (from..from + n).map(|i| row(i, A, "{}")).collect();
        let ids = |rows: Vec<CandidateRow>| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(fair_share(
                vec![lane(1, 100), lane(500, 2), lane(900, 1)],
                6
            )),
            [1, 500, 900, 2, 501, 3]
        );
        assert_eq!(ids(fair_share(vec![lane(1, 2), vec![]], 10)), [1, 2]);
    }

    proptest! {
        /// Whatever the mix of patches, a record's rows are merged only as a prefix of its
        /// chain, in order, and the merged body equals applying the rows one after another.
        #[test]
        fn coalescing_equals_applying_the_prefix_in_order(
            patches in proptest::collection::vec((0u8..4, 0u8..3, any::<bool>()), 1..12)
        ) {
            let rows: Vec<CandidateRow> = patches.iter().enumerate().map(|(i, (k, v, with_list))| {
                let p = if *with_list {
                    json!({"default": {format!("k{k}"): v}, "list": {}})
                } else {
                    json!({"default": {format!("k{k}"): v}})
                };
                row(i as i64 + 1, A, &p.to_string())
            }).collect();
            let plan = plan(vec![chain(rows[0].clone(), rows[1..].to_vec())], LIMITS);
            let item = &plan.batches[0].items[0];
            let n = item.rows.len();
            prop_assert_eq!(&item.rows, &(1..=n as i64).collect::<Vec<_>>());
            if patches[0].2 {
                prop_assert_eq!(n, 1);
            } else {
                prop_assert!(patches[1..n].iter().all(|p| !p.2));
                if n < patches.len() { prop_assert!(patches[n].2); }
                let mut expected = Map::new();
                for (k, v, _) in &patches[..n] { expected.insert(format!("k{k}"), json!(v)); }
                prop_assert_eq!(body(&plan.batches[0]), json!({"items":[{"id": A, "default": expected}]}));
            }
        }
    }
}
