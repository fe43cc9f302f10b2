//! Finding rows and acting on them, on both databases, through the real binary: `rows` (filters,
//! keyset pages, JSON lines and CSV, checked against the outbox as stored), `discard` (preview,
//! confirmation, in-flight rows untouched, audited, replayable) and `audit`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use prism_sync::model::{ObjectType, Operation};
use prism_sync::ops::enqueue::{Change, insert};
use prism_sync::sim::{FaultProfile, SimHandle};
use prism_sync::store::{RawPool, Store};
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

/// One outbox row as stored, the columns an export carries.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    id: i64,
    record_id: String,
    object_type: String,
    operation: String,
    team_id: String,
    state: String,
    attempts: i64,
    last_error_code: Option<String>,
    last_error_message: Option<String>,
}

async fn stored(store: &Store) -> Vec<Stored> {
    let sql = "SELECT id, CAST(record_id AS TEXT), object_type, operation, team_id, state,
                      CAST(attempts AS BIGINT), last_error_code, last_error_message
               FROM prism_outbox_rows ORDER BY id";
    let read = |r: &dyn Fn(usize) -> Option<String>, id: i64, attempts: i64| Stored {
        id,
        record_id: r(1).unwrap(),
        object_type: r(2).unwrap(),
        operation: r(3).unwrap(),
        team_id: r(4).unwrap(),
        state: r(5).unwrap(),
        attempts,
        last_error_code: r(7),
        last_error_message: r(8),
    };
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|row| read(&|i| row.get(i), row.get(0), row.get(6)))
            .collect(),
        RawPool::Postgres(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|row| read(&|i| row.get(i), row.get(0), row.get(6)))
            .collect(),
    }
}

/// An exported JSON line, read back as the stored columns.
fn from_json(line: &Value) -> Stored {
    let text = |k: &str| line[k].as_str().map(str::to_owned);
    Stored {
        id: line["id"].as_i64().unwrap(),
        record_id: text("record_id").unwrap(),
        object_type: text("object_type").unwrap(),
        operation: text("operation").unwrap(),
        team_id: text("team_id").unwrap(),
        state: text("state").unwrap(),
        attempts: line["attempts"].as_i64().unwrap(),
        last_error_code: text("last_error_code"),
        last_error_message: text("last_error_message"),
    }
}

async fn rows_json(db: &TestDb, sim: &SimHandle, args: &[&str]) -> (Vec<Stored>, String) {
    let mut all = vec!["rows", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = verb(db, sim, &all, "").await;
    assert_eq!(code, 0, "{all:?}: {out}{err}");
    let rows = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let enqueued = v["enqueued_at"].as_str().unwrap();
            time::OffsetDateTime::parse(enqueued, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("enqueued_at {enqueued:?} is not RFC 3339: {e}"));
            from_json(&v)
        })
        .collect();
    (rows, err)
}

/// A minimal RFC 4180 reader: quoted fields, doubled quotes, line breaks inside quotes.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

/// Thirty changes over two teams, three object types and both operations; some left dead or
/// retrying with codes and messages as the daemon would have, one message with a comma, quotes
/// and a line break.
async fn varied_outbox(store: &Store, other_team: &str) -> Vec<Stored> {
    let changes: Vec<Change> = (0..30)
        .map(|i| Change {
            object_type: [
                ObjectType::Contact,
                ObjectType::Organization,
                ObjectType::Deal,
            ][i % 3],
            operation: if i % 5 == 4 {
                Operation::Delete
            } else {
                Operation::Update
            },
            team_id: if i % 4 < 2 {
                String::new()
            } else {
                other_team.to_owned()
            },
            ..Change::update(Uuid::new_v4(), format!(r#"{{"default": {{"n": {i}}}}}"#))
        })
        .collect();
    insert(store, &changes).await.unwrap();
    let ids: Vec<i64> = stored(store).await.iter().map(|r| r.id).collect();
    for (k, id) in ids.iter().enumerate() {
        let set = match k % 6 {
            0 => "state = 'dead', attempts = 1, last_error_code = 'validation_error', last_error_message = 'Email is invalid'".to_owned(),
            1 => "state = 'dead', attempts = 2, last_error_code = 'not_found', last_error_message = 'no such record, \"gone\"\nfor good'".to_owned(),
            2 => "state = 'retrying', attempts = 3, last_error_code = 'rate_limited', last_error_message = 'slow down'".to_owned(),
            3 => "state = 'succeeded', attempts = 1".to_owned(),
            _ => continue,
        };
        exec(
            store,
            &format!("UPDATE prism_outbox SET {set} WHERE id = {id}"),
        )
        .await;
    }
    // The first ten were enqueued long ago.
    exec(
        store,
        &format!(
            "UPDATE prism_outbox SET enqueued_at = '2026-01-01T00:00:00.000Z' WHERE id <= {}",
            ids[9]
        ),
    )
    .await;
    stored(store).await
}

fn ids(rows: &[Stored]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

both_backends! {
    async fn rows_finds_exactly_the_rows_each_filter_names_as_they_are_stored(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let team = sim.team_id().to_owned();
        let all = varied_outbox(&store, "team-b").await;

        let (every, _) = rows_json(&db, &sim, &["--limit", "0"]).await;
        assert_eq!(every, all, "an unfiltered export is the outbox as stored");

        let want = |keep: &dyn Fn(&Stored) -> bool| -> Vec<i64> {
            all.iter().filter(|r| keep(r)).map(|r| r.id).collect()
        };
        let record = all[7].record_id.clone();
        let (id_a, id_b) = (all[3].id.to_string(), all[20].id.to_string());
        let cases: Vec<(Vec<&str>, Vec<i64>)> = vec![
            (vec!["--state", "dead"], want(&|r| r.state == "dead")),
            (vec!["--state", "dead", "--state", "retrying"], want(&|r| r.state == "dead" || r.state == "retrying")),
            (vec!["--error-code", "validation_error", "--team", "team-b"],
                want(&|r| r.last_error_code.as_deref() == Some("validation_error") && r.team_id == "team-b")),
            // The default team, by its id or as `default`: the rows stored with an empty team.
            (vec!["--team", &team], want(&|r| r.team_id.is_empty())),
            (vec!["--team", "default", "--state", "pending"], want(&|r| r.team_id.is_empty() && r.state == "pending")),
            (vec!["--record-id", &record], want(&|r| r.record_id == record)),
            (vec!["--message-contains", "EMAIL IS"], want(&|r| r.last_error_message.as_deref() == Some("Email is invalid"))),
            (vec!["--operation", "delete"], want(&|r| r.operation == "delete")),
            (vec!["--object-type", "organization", "--state", "pending"],
                want(&|r| r.object_type == "organization" && r.state == "pending")),
            (vec!["--id", &id_a, "--id", &id_b], vec![all[3].id, all[20].id]),
            (vec!["--until", "2026-06-01T00:00:00Z"], ids(&all[..10])),
            (vec!["--since", "2026-06-01T00:00:00Z", "--error-code", "not_found"],
                want(&|r| r.id > all[9].id && r.last_error_code.as_deref() == Some("not_found"))),
        ];
        for (args, expected) in cases {
            assert!(!expected.is_empty(), "{args:?} must match something to mean anything: {all:#?}");
            let mut with_all = args.clone();
            with_all.extend(["--limit", "0"]);
            let (found, _) = rows_json(&db, &sim, &with_all).await;
            assert_eq!(ids(&found), expected, "rows {args:?}");
        }
    }

    async fn rows_pages_by_id_and_says_how_to_get_the_next_page(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let all = varied_outbox(&store, "team-b").await;
        let mut seen = Vec::new();
        let mut after = "0".to_owned();
        loop {
            let (page, notes) = rows_json(&db, &sim, &["--limit", "7", "--after-id", &after]).await;
            assert!(page.len() <= 7, "{page:?}");
            seen.extend(page.iter().cloned());
            match notes.split("--after-id ").nth(1) {
                Some(next) => {
                    let next = next.split_whitespace().next().unwrap().to_owned();
                    assert_eq!(next, page.last().unwrap().id.to_string(), "the next page starts after this one");
                    after = next;
                }
                None => break,
            }
        }
        assert_eq!(seen, all, "the pages together are the outbox, each row once, in id order");

        // The table says it too, and names the default team.
        let (code, out, err) = verb(&db, &sim, &["rows", "--limit", "3"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("--after-id {}", all[2].id)), "{out}");
        assert!(out.contains("default") && out.contains("team-b"), "{out}");
    }

    async fn rows_csv_is_a_header_and_one_properly_quoted_record_per_row(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let all = varied_outbox(&store, "team-b").await;
        let (code, out, err) = verb(&db, &sim, &["rows", "--csv", "--limit", "0"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        let records = parse_csv(&out);
        let header = &records[0];
        let col = |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("{name} in {header:?}"));
        assert_eq!(records.len(), all.len() + 1, "{out}");
        for (rec, row) in records[1..].iter().zip(&all) {
            assert_eq!(rec.len(), header.len(), "{rec:?}");
            assert_eq!(rec[col("id")], row.id.to_string());
            assert_eq!(rec[col("record_id")], row.record_id);
            assert_eq!(rec[col("state")], row.state);
            assert_eq!(rec[col("team_id")], row.team_id);
            assert_eq!(rec[col("attempts")], row.attempts.to_string());
            assert_eq!(rec[col("last_error_code")], row.last_error_code.clone().unwrap_or_default());
            assert_eq!(rec[col("last_error_message")], row.last_error_message.clone().unwrap_or_default());
        }
        assert!(out.contains("\"no such record, \"\"gone\"\"\nfor good\""), "quotes doubled, the field quoted: {out}");
    }

    async fn discard_previews_asks_and_moves_only_waiting_rows_to_dead_audited_and_replayable(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let changes: Vec<Change> = (0..6)
            .map(|i| Change::update(Uuid::new_v4(), format!(r#"{{"default": {{"n": {i}}}}}"#)))
            .collect();
        insert(&store, &changes[..2]).await.unwrap();
        wait_below_watermark(&store).await;
        // The first two go in flight (another process holds their batch); then four more wait,
        // one of them retrying, and one is already dead.
        let held = claim_as(&store, "other-process", Duration::from_secs(60), "", 10, 10).await;
        assert_eq!(held.batches.iter().map(|b| b.row_count()).sum::<usize>(), 2);
        insert(&store, &changes[2..]).await.unwrap();
        let all = stored(&store).await;
        exec(&store, &format!("UPDATE prism_outbox SET state = 'retrying', attempts = 1, last_error_code = 'rate_limited' WHERE id = {}", all[3].id)).await;
        exec(&store, &format!("UPDATE prism_outbox SET state = 'dead', last_error_code = 'not_found' WHERE id = {}", all[5].id)).await;
        let before = stored(&store).await;
        let waiting: BTreeSet<i64> = [all[2].id, all[3].id, all[4].id].into();

        let (code, out, _) = verb(&db, &sim, &["discard", "--object-type", "contact", "--dry-run"], "").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("3 waiting row(s)") && out.contains("dry run"), "{out}");
        let (code, out, _) = verb(&db, &sim, &["discard", "--object-type", "contact"], "n\n").await;
        assert_eq!(code, 1, "not confirmed: {out}");
        assert!(out.contains("Discard these 3 row(s)?"), "{out}");
        assert_eq!(stored(&store).await, before, "nothing changed without a yes");
        let (code, out, err) = verb(&db, &sim, &["discard"], "").await;
        assert_eq!(code, 2, "no filter, no discard, a usage error: {out}");
        assert!(err.contains("choose the rows to discard"), "{err}");

        let (code, out, err) = verb(&db, &sim, &["discard", "--object-type", "contact", "--actor", "alice", "--json"], "y\n").await;
        assert_eq!(code, 0, "{out}{err}");
        let done: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(done["discarded"], 3, "{done}");
        let after = stored(&store).await;
        for (b, a) in before.iter().zip(&after) {
            if waiting.contains(&b.id) {
                assert_eq!((a.state.as_str(), a.last_error_code.as_deref()), ("dead", Some("discarded")), "{a:?}");
                assert!(a.last_error_message.as_deref().unwrap_or("").contains("alice"), "{a:?}");
            } else {
                assert_eq!(a, b, "in-flight and finished rows are untouched");
            }
        }
        let (rows, _) = rows_json(&db, &sim, &["--error-code", "discarded"]).await;
        assert_eq!(rows.iter().map(|r| r.id).collect::<BTreeSet<_>>(), waiting);

        // Audited, newest first; the default actor is the OS user when none is named.
        let (code, out, _) = verb(&db, &sim, &["discard", "--id", &all[4].id.to_string(), "--yes"], "").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("discarded 0 row(s)") || out.contains("nothing to discard"), "already dead: {out}");
        let (code, out, err) = verb(&db, &sim, &["replay", "--error-code", "discarded", "--yes", "--actor", "bob"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        let replayed = stored(&store).await;
        for r in replayed.iter().filter(|r| waiting.contains(&r.id)) {
            assert_eq!((r.state.as_str(), r.attempts), ("pending", 0), "a discarded row is replayable: {r:?}");
        }
        let (code, out, _) = verb(&db, &sim, &["audit", "--json"], "").await;
        assert_eq!(code, 0, "{out}");
        let entries: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let summary: Vec<(&str, &str, i64)> = entries
            .iter()
            .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap(), e["rows"].as_i64().unwrap()))
            .collect();
        assert_eq!(summary, vec![("bob", "replay", 3), ("alice", "discard", 3)], "{out}");
        assert!(entries.iter().all(|e| e["at"].as_str().is_some_and(|at| !at.is_empty())), "{out}");
        assert_eq!(entries[1]["filter"]["object_type"], "contact", "{out}");
    }

    async fn audit_lists_actions_newest_first_paged_with_the_os_user_as_the_default_actor(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let changes: Vec<Change> = (0..3)
            .map(|i| Change::update(Uuid::new_v4(), format!(r#"{{"default": {{"n": {i}}}}}"#)))
            .collect();
        insert(&store, &changes).await.unwrap();
        let ids = ids(&stored(&store).await);
        for id in &ids {
            let (code, out, err) = verb(&db, &sim, &["discard", "--id", &id.to_string(), "--yes"], "").await;
            assert_eq!(code, 0, "{out}{err}");
        }
        let me = prism_sync::ops::actor(None);
        assert!(!me.is_empty() && me != "unknown", "{me}");
        let (code, out, _) = verb(&db, &sim, &["audit", "--json", "--limit", "2"], "").await;
        assert_eq!(code, 0, "{out}");
        let entries: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(entries.len(), 2, "{out}");
        assert!(entries.iter().all(|e| e["actor"] == me.as_str() && e["action"] == "discard" && e["rows"] == 1), "{out}");
        assert_eq!(entries[0]["filter"]["ids"], serde_json::json!([ids[2]]), "newest first: {out}");
        let older = entries[1]["id"].as_i64().unwrap().to_string();
        let (code, out, _) = verb(&db, &sim, &["audit", "--before-id", &older], "").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&me) && out.contains("discard") && out.lines().count() == 2, "one older entry under its header: {out}");
    }
}
