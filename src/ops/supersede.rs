//! Pure: what a replay may send for one row, given the newer changes of its record (same record,
//! object type and team, higher `id`). Replay never puts a record back to older values: a newer
//! change that already succeeded wins, so the replayed row either keeps only the `default` keys
//! no such change set (rebased), or stays `dead` (superseded) where no safe patch exists.

use serde_json::{Map, Value};

/// A newer change of the same record, as stored.
#[derive(Debug, Clone)]
pub struct NewerChange {
    pub id: i64,
    pub operation: String,
    pub state: String,
    /// The stored patch bytes (`None`: unreadable).
    pub patch: Option<Vec<u8>>,
}

/// What replay does with one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Sent as it is: no newer change of its record has been applied.
    AsIs,
    /// Sent without the `default` keys that newer, applied changes set.
    Rebased {
        patch: Map<String, Value>,
        dropped_keys: Vec<String>,
        /// The applied rows that set them.
        newer_rows: Vec<i64>,
    },
    /// Left `dead`: no patch can be sent without going back over a newer change.
    Superseded { reason: String },
}

/// Judges one `dead` (or waiting) row of `operation` with `patch` against `newer`: the record's
/// changes with a higher id that are not `dead`. Pending and retrying ones are ignored: the order
/// guard sends them after the replayed row, so they overwrite it anyway.
pub fn judge(operation: &str, patch: &[u8], newer: &[NewerChange]) -> Verdict {
    if let Some(n) = newer.iter().find(|n| n.state == "in_flight") {
        return superseded(format!(
            "row {} of this record is in flight: whether it applied is not known yet; replay again once it has ended",
            n.id
        ));
    }
    let applied: Vec<&NewerChange> = newer.iter().filter(|n| n.state == "succeeded").collect();
    let Some(first) = applied.first() else {
        return Verdict::AsIs;
    };
    if let Some(d) = applied.iter().find(|n| n.operation == "delete") {
        return superseded(format!("the record was deleted since (row {})", d.id));
    }
    if operation == "delete" {
        return superseded(format!(
            "row {} changed the record after this delete and already succeeded",
            first.id
        ));
    }
    // A patch that is not a JSON object is never sent (it goes dead as invalid again): as is.
    let Ok(Value::Object(original)) = serde_json::from_slice::<Value>(patch) else {
        return Verdict::AsIs;
    };
    rebase(original, &applied)
}

/// Drops from `original` the `default` keys the `applied` rows set; refuses where another part
/// (`list`, `extended`, …) was changed again, since those cannot be merged key by key.
fn rebase(original: Map<String, Value>, applied: &[&NewerChange]) -> Verdict {
    let mut covered: Vec<(String, i64)> = Vec::new();
    let mut touched: Vec<(String, i64)> = Vec::new();
    for n in applied {
        let parsed = n
            .patch
            .as_deref()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok());
        let Some(Value::Object(parts)) = parsed else {
            return superseded(format!("the patch of row {} cannot be read", n.id));
        };
        for (part, value) in parts {
            match (part.as_str(), value) {
                ("default", Value::Object(keys)) => {
                    covered.extend(keys.into_iter().map(|(k, _)| (k, n.id)))
                }
                ("default", _) => {
                    return superseded(format!("the `default` of row {} cannot be read", n.id));
                }
                _ => touched.push((part, n.id)),
            }
        }
    }
    let mut patch = Map::new();
    let mut dropped_keys = Vec::new();
    let mut newer_rows = Vec::new();
    for (part, value) in original {
        if part == "default" {
            let Value::Object(keys) = value else {
                return superseded("its `default` is not an object".into());
            };
            let mut kept = Map::new();
            for (key, v) in keys {
                match covered.iter().find(|(k, _)| *k == key) {
                    Some((_, by)) => {
                        dropped_keys.push(key);
                        newer_rows.push(*by);
                    }
                    None => {
                        kept.insert(key, v);
                    }
                }
            }
            if !kept.is_empty() {
                patch.insert(part, Value::Object(kept));
            }
        } else if let Some((_, by)) = touched.iter().find(|(p, _)| *p == part) {
            return superseded(format!(
                "row {by} changed `{part}` again and already succeeded; `{part}` cannot be merged"
            ));
        } else {
            patch.insert(part, value);
        }
    }
    newer_rows.sort_unstable();
    newer_rows.dedup();
    if dropped_keys.is_empty() {
        Verdict::AsIs
    } else if patch.is_empty() {
        superseded(format!(
            "every value it sets was set again by row(s) {} that already succeeded",
            join(&newer_rows)
        ))
    } else {
        Verdict::Rebased {
            patch,
            dropped_keys,
            newer_rows,
        }
    }
}

fn superseded(reason: String) -> Verdict {
    Verdict::Superseded { reason }
}

fn join(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newer(id: i64, state: &str, patch: &str) -> NewerChange {
        NewerChange {
            id,
            operation: "update".into(),
            state: state.into(),
            patch: Some(patch.as_bytes().to_vec()),
        }
    }

    fn delete(id: i64, state: &str) -> NewerChange {
        NewerChange {
            operation: "delete".into(),
            ..newer(id, state, "{}")
        }
    }

    fn is_superseded(v: &Verdict, says: &str) -> bool {
        matches!(v, Verdict::Superseded { reason } if reason.contains(says))
    }

    const OLD: &str = r#"{"default": {"email": "old@example.com", "phone": "1"}}"#;

    #[test]
    fn a_row_with_no_applied_newer_change_goes_as_it_is() {
        assert_eq!(judge("update", OLD.as_bytes(), &[]), Verdict::AsIs);
        let waiting = [
            newer(7, "pending", r#"{"default": {"email": "new"}}"#),
            newer(8, "retrying", r#"{"default": {"phone": "2"}}"#),
        ];
        assert_eq!(
            judge("update", OLD.as_bytes(), &waiting),
            Verdict::AsIs,
            "waiting changes are sent after it"
        );
        let other_keys = [newer(7, "succeeded", r#"{"default": {"name": "x"}}"#)];
        assert_eq!(judge("update", OLD.as_bytes(), &other_keys), Verdict::AsIs);
    }

    #[test]
    fn keys_an_applied_newer_change_set_are_dropped() {
        let applied = [
            newer(
                7,
                "succeeded",
                r#"{"default": {"email": "new@example.com"}}"#,
            ),
            newer(9, "succeeded", r#"{"default": {"name": "x"}}"#),
        ];
        let Verdict::Rebased {
            patch,
            dropped_keys,
            newer_rows,
        } = judge("update", OLD.as_bytes(), &applied)
        else {
            panic!("rebased")
        };
        assert_eq!(
            Value::Object(patch),
            serde_json::json!({"default": {"phone": "1"}})
        );
        assert_eq!(dropped_keys, ["email"]);
        assert_eq!(newer_rows, [7]);
    }

    #[test]
    fn a_row_whose_every_key_was_set_again_stays_dead() {
        let applied = [
            newer(7, "succeeded", r#"{"default": {"email": "a"}}"#),
            newer(8, "succeeded", r#"{"default": {"phone": "b"}}"#),
        ];
        let v = judge("update", OLD.as_bytes(), &applied);
        assert!(is_superseded(&v, "set again by row(s) 7, 8"), "{v:?}");
    }

    #[test]
    fn a_delete_since_or_a_change_in_flight_leaves_the_row_dead() {
        let v = judge("update", OLD.as_bytes(), &[delete(9, "succeeded")]);
        assert!(is_superseded(&v, "deleted since (row 9)"), "{v:?}");
        let v = judge(
            "update",
            OLD.as_bytes(),
            &[newer(9, "in_flight", r#"{"default": {"x": 1}}"#)],
        );
        assert!(is_superseded(&v, "in flight"), "{v:?}");
        let failed_delete = [delete(9, "pending")];
        assert_eq!(
            judge("update", OLD.as_bytes(), &failed_delete),
            Verdict::AsIs
        );
        let v = judge(
            "delete",
            b"{}",
            &[newer(9, "succeeded", r#"{"default": {"x": 1}}"#)],
        );
        assert!(is_superseded(&v, "after this delete"), "{v:?}");
    }

    #[test]
    fn parts_other_than_default_are_kept_unless_changed_again() {
        let old = r#"{"default": {"email": "old"}, "list": {"tags": ["a"]}}"#;
        let only_default = [newer(7, "succeeded", r#"{"default": {"email": "new"}}"#)];
        let Verdict::Rebased { patch, .. } = judge("update", old.as_bytes(), &only_default) else {
            panic!("rebased")
        };
        assert_eq!(
            Value::Object(patch),
            serde_json::json!({"list": {"tags": ["a"]}})
        );
        let list_again = [newer(7, "succeeded", r#"{"list": {"tags": ["b"]}}"#)];
        let v = judge("update", old.as_bytes(), &list_again);
        assert!(is_superseded(&v, "changed `list` again"), "{v:?}");
    }

    #[test]
    fn what_cannot_be_read_is_never_guessed() {
        let unreadable = [NewerChange {
            patch: None,
            ..newer(7, "succeeded", "")
        }];
        let v = judge("update", OLD.as_bytes(), &unreadable);
        assert!(is_superseded(&v, "cannot be read"), "{v:?}");
        let odd_default = [newer(7, "succeeded", r#"{"default": [1]}"#)];
        let v = judge("update", OLD.as_bytes(), &odd_default);
        assert!(is_superseded(&v, "cannot be read"), "{v:?}");
        let applied = [newer(7, "succeeded", r#"{"default": {"a": 1}}"#)];
        assert_eq!(
            judge("update", b"not json", &applied),
            Verdict::AsIs,
            "never sent: it goes dead as invalid again"
        );
    }
}
