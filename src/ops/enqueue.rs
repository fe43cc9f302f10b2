//! `prism-sync enqueue`: JSON lines `{"record_id": ..., "patch": {...}, "object_type"?: ...,
//! "operation"?: "update"|"delete", "team_id"?: ...}` into the outbox, validated first, all or
//! nothing per input unless `--skip-invalid`. A delete needs no patch.
//!
//! A patch's size is measured as the daemon's planner measures it (`batch.max_patch_bytes`
//! against the patch's text as the outbox gives it back: the text as written on SQLite,
//! `jsonb`'s own rendering on Postgres, which adds a space after every `:` and `,`), so a
//! change `enqueue` accepts never goes `dead` as `patch_too_large`.

use std::io::BufRead;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::model::{ObjectType, Operation};
pub use crate::store::views::Change;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error("reading input: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    record_id: String,
    #[serde(default)]
    patch: Option<Value>,
    #[serde(default)]
    object_type: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
}

/// Parses and validates one line (the same rules the daemon applies to rows), all but the
/// patch's size, which depends on the database: see [`stored_patch_bytes`].
pub fn parse_line(text: &str) -> Result<Change, String> {
    let line: Line = serde_json::from_str(text).map_err(|e| format!("not a change object: {e}"))?;
    let record_id = Uuid::try_parse(line.record_id.trim())
        .map_err(|_| format!("record_id {:?} is not a UUID", line.record_id))?;
    let object_type = match line.object_type {
        Some(t) => t.parse::<ObjectType>().map_err(|e| e.to_string())?,
        None => ObjectType::Contact,
    };
    let operation = match line.operation {
        Some(o) => o.parse::<Operation>().map_err(|e| e.to_string())?,
        None => Operation::Update,
    };
    let team_id = line.team_id.unwrap_or_default();
    if team_id.trim() != team_id {
        return Err(format!("team_id {team_id:?} has spaces around it"));
    }
    let patch = match (line.patch, operation) {
        (Some(p), _) => p,
        (None, Operation::Delete) => Value::Object(Default::default()),
        (None, Operation::Update) => return Err("an update needs a patch".into()),
    };
    let Value::Object(map) = &patch else {
        return Err("patch must be a JSON object".into());
    };
    if map.contains_key("id") {
        return Err("patch must not carry \"id\": the record id comes from record_id".into());
    }
    let patch = serde_json::to_string(&patch).expect("a JSON value serialises");
    Ok(Change {
        record_id,
        patch,
        object_type,
        operation,
        team_id,
    })
}

/// `prism-sync enqueue`'s command line.
#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// JSON-lines file; `-` or nothing reads stdin.
    pub file: Option<std::path::PathBuf>,
    /// Enqueue the valid lines and report the invalid ones, instead of refusing the whole input.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueCommandError {
    #[error("{0}; nothing was enqueued (fix the line, or pass --skip-invalid)")]
    Refused(EnqueueError),
    #[error("opening {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// `prism-sync enqueue`: the file named (or `input` for `-` or none) into the outbox, then what
/// was skipped and how many went in.
pub async fn run(
    store: &Store,
    args: &EnqueueArgs,
    max_patch_bytes: usize,
    out: &mut impl std::io::Write,
    input: &mut impl BufRead,
) -> Result<(), EnqueueCommandError> {
    let report = match args.file.as_deref() {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path).map_err(|source| EnqueueCommandError::Open {
                path: path.to_owned(),
                source,
            })?;
            let file = std::io::BufReader::new(file);
            enqueue(store, file, max_patch_bytes, args.skip_invalid).await
        }
        _ => enqueue(store, input, max_patch_bytes, args.skip_invalid).await,
    };
    let report = match report {
        Ok(r) => r,
        Err(e @ EnqueueError::Invalid { .. }) => return Err(EnqueueCommandError::Refused(e)),
        Err(e) => return Err(e.into()),
    };
    for (line, reason) in &report.skipped {
        writeln!(out, "skipped line {line}: {reason}")?;
    }
    writeln!(out, "enqueued {} change(s)", report.enqueued)?;
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnqueueReport {
    pub enqueued: usize,
    pub skipped: Vec<(usize, String)>,
}

/// Reads every line first; writes only when all are valid (or `skip_invalid`).
pub async fn enqueue(
    store: &Store,
    input: impl BufRead,
    max_patch_bytes: usize,
    skip_invalid: bool,
) -> Result<EnqueueReport, EnqueueError> {
    let mut parsed = Vec::new();
    let mut report = EnqueueReport::default();
    // Lines as bytes: one that is not UTF-8 is that line's fault (named, or skipped with
    // `--skip-invalid`), not a failure to read the input.
    for (i, line) in input.split(b'\n').enumerate() {
        let mut line = line?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let line = String::from_utf8(line).map_err(|e| {
            format!(
                "not UTF-8 (an invalid byte at column {})",
                e.utf8_error().valid_up_to() + 1
            )
        });
        if line.as_deref().is_ok_and(|l| l.trim().is_empty()) {
            continue;
        }
        match line.and_then(|l| parse_line(&l)) {
            Ok(c) => parsed.push((i + 1, c)),
            Err(reason) if skip_invalid => report.skipped.push((i + 1, reason)),
            Err(reason) => {
                return Err(EnqueueError::Invalid {
                    line: i + 1,
                    reason,
                });
            }
        }
    }
    let sizes = stored_patch_bytes(store, parsed.iter().map(|(_, c)| c)).await?;
    let mut changes = Vec::with_capacity(parsed.len());
    for ((line, change), size) in parsed.into_iter().zip(sizes) {
        // Like the planner: a delete's patch is never read, so never too large.
        if change.operation == Operation::Update && size > max_patch_bytes {
            let reason = format!(
                "patch is {size} bytes as the database stores it, over batch.max_patch_bytes ({max_patch_bytes})"
            );
            if !skip_invalid {
                return Err(EnqueueError::Invalid { line, reason });
            }
            report.skipped.push((line, reason));
        } else {
            changes.push(change);
        }
    }
    report.skipped.sort_by_key(|(line, _)| *line);
    insert(store, &changes).await?;
    report.enqueued = changes.len();
    Ok(report)
}

/// Each patch's size in bytes as the daemon's claim will measure it (see
/// [`Store::stored_patch_bytes`]).
pub async fn stored_patch_bytes<'c>(
    store: &Store,
    changes: impl Iterator<Item = &'c Change>,
) -> Result<Vec<usize>, StoreError> {
    let patches: Vec<&str> = changes.map(|c| c.patch.as_str()).collect();
    store.stored_patch_bytes(&patches).await
}

/// Inserts changes in order, in one transaction.
pub async fn insert(store: &Store, changes: &[Change]) -> Result<(), StoreError> {
    store.insert_changes(changes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_validated_like_rows() {
        let ok = parse_line(
            r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","patch":{"default":{"a":1}}}"#,
        );
        assert_eq!(ok.unwrap().object_type, ObjectType::Contact);
        for (line, expect) in [
            (r#"{"record_id":"x","patch":{}}"#, "not a UUID"),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"}"#,
                "needs a patch",
            ),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","operation":"upsert"}"#,
                "unknown operation",
            ),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","patch":[1]}"#,
                "JSON object",
            ),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","patch":{"id":"y"}}"#,
                "must not carry",
            ),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","patch":{},"object_type":"car"}"#,
                "unknown object type",
            ),
            (
                r#"{"record_id":"182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e","patch":{},"extra":1}"#,
                "unknown field",
            ),
            ("not json", "not a change object"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(expect), "{line}: {err}");
        }
    }
}
