//! `prism-sync rows`: find and export outbox rows by the filters `replay` takes, plus state,
//! message text, team and operation. Keyset paging by id (`--after-id`), so that every page
//! costs the same on a million-row outbox; the filters that an index serves and those that scan
//! are listed in README.md ("Finding rows").
//!
//! Output: a table (teams shown by name, `default` for the default team), `--json` lines or
//! `--csv` (values as stored, so that an export can be checked against the outbox). stdout
//! carries only the rows; how to get the next page goes to `notes` (stderr) for the exports.

use serde::Serialize;

use super::select::RowSelection;
use crate::model::RowState;
use crate::store::views::{Page, RowFilter, RowSummary};
use crate::store::{Store, StoreError};

/// `prism-sync rows`'s command line.
#[derive(Debug, clap::Args)]
pub struct RowsArgs {
    #[command(flatten)]
    pub rows: RowSelection,
    /// Only rows in this state (repeatable): pending, in_flight, retrying, succeeded, dead.
    #[arg(long = "state", value_parser = parse_state)]
    pub states: Vec<RowState>,
    /// Rows whose last error message contains this text (ASCII letters in any case).
    #[arg(long, value_name = "TEXT")]
    pub message_contains: Option<String>,
    /// Rows to print at most (0: every row that matches).
    #[arg(long, default_value_t = 100)]
    pub limit: u64,
    /// Only rows with a larger id: the next page starts after the last id of the one before.
    #[arg(long, value_name = "ROW_ID", default_value_t = 0)]
    pub after_id: i64,
    /// One JSON object a line.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// A header line, then one line a row (RFC 4180 quoting).
    #[arg(long)]
    pub csv: bool,
}

fn parse_state(text: &str) -> Result<RowState, String> {
    RowState::parse(text).ok_or_else(|| {
        format!("unknown state {text:?}: pending, in_flight, retrying, succeeded or dead")
    })
}

impl RowsArgs {
    pub fn filter(&self, default_team: &str) -> RowFilter {
        RowFilter {
            states: self.states.clone(),
            message_contains: self.message_contains.clone(),
            ..self.rows.filter(default_team)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// How many rows one statement reads at most: a large `--limit` (or 0) is read page by page,
/// each page written before the next is read, so memory stays flat on any export.
const READ_PAGE: u64 = 1000;

/// How the rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    JsonLines,
    Csv,
}

/// `prism-sync rows`: writes the matching rows to `out` and, when more follow, how to get them
/// (to `notes` for the exports, so that stdout holds only rows).
pub async fn run(
    store: &Store,
    args: &RowsArgs,
    default_team: &str,
    out: &mut impl std::io::Write,
    notes: &mut impl std::io::Write,
) -> Result<(), RowsError> {
    let format = match (args.json, args.csv) {
        (true, _) => Format::JsonLines,
        (_, true) => Format::Csv,
        _ => Format::Table,
    };
    let filter = args.filter(default_team);
    let mut remaining = (args.limit > 0).then_some(args.limit);
    let mut after_id = args.after_id;
    let mut table = Vec::new();
    let mut more = false;
    if format == Format::Csv {
        write_csv_header(out)?;
    }
    loop {
        let want = remaining.map_or(READ_PAGE, |r| r.min(READ_PAGE));
        // One row past the page tells whether another page follows.
        let mut page = store
            .find_rows(
                &filter,
                Page {
                    after_id,
                    limit: Some(want + 1),
                },
            )
            .await?;
        let full = page.len() as u64 > want;
        page.truncate(usize::try_from(want).unwrap_or(usize::MAX));
        match format {
            Format::Table => table.extend(page.iter().cloned()),
            Format::JsonLines => write_json_lines(&page, out)?,
            Format::Csv => write_csv(&page, out)?,
        }
        if let Some(last) = page.last() {
            after_id = last.id;
        }
        remaining = remaining.map(|r| r - page.len() as u64);
        if !full {
            break;
        }
        if remaining == Some(0) {
            more = true;
            break;
        }
    }
    let shown: &mut dyn std::io::Write = if format == Format::Table {
        render_table(&table, out)?;
        out
    } else {
        notes
    };
    if more {
        writeln!(
            shown,
            "more rows match: the same command with --after-id {after_id} shows the next page"
        )?;
    } else if format == Format::Table && table.is_empty() {
        writeln!(shown, "no rows match")?;
    }
    Ok(())
}

/// One exported row: the outbox's columns as stored.
#[derive(Serialize)]
struct Exported<'a> {
    id: i64,
    record_id: &'a str,
    object_type: &'a str,
    operation: &'a str,
    /// As stored: empty for the configured default team.
    team_id: &'a str,
    state: &'a str,
    attempts: i64,
    last_error_code: Option<&'a str>,
    last_error_message: Option<&'a str>,
    enqueued_at: &'a str,
    completed_at: Option<&'a str>,
    batch_id: Option<&'a str>,
}

impl<'a> From<&'a RowSummary> for Exported<'a> {
    fn from(r: &'a RowSummary) -> Self {
        Exported {
            id: r.id,
            record_id: &r.record_id,
            object_type: &r.object_type,
            operation: &r.operation,
            team_id: &r.team_id,
            state: &r.state,
            attempts: r.attempts,
            last_error_code: r.last_error_code.as_deref(),
            last_error_message: r.last_error_message.as_deref(),
            enqueued_at: &r.enqueued_at,
            completed_at: r.completed_at.as_deref(),
            batch_id: r.batch_id.as_deref(),
        }
    }
}

const CSV_COLUMNS: [&str; 12] = [
    "id",
    "record_id",
    "object_type",
    "operation",
    "team_id",
    "state",
    "attempts",
    "last_error_code",
    "last_error_message",
    "enqueued_at",
    "completed_at",
    "batch_id",
];

fn write_json_lines(rows: &[RowSummary], out: &mut impl std::io::Write) -> std::io::Result<()> {
    for r in rows {
        let line = serde_json::to_string(&Exported::from(r)).expect("a row serialises");
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn write_csv_header(out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "{}", CSV_COLUMNS.join(","))
}

fn write_csv(rows: &[RowSummary], out: &mut impl std::io::Write) -> std::io::Result<()> {
    for r in rows {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let cells = [
            r.id.to_string(),
            r.record_id.clone(),
            r.object_type.clone(),
            r.operation.clone(),
            r.team_id.clone(),
            r.state.clone(),
            r.attempts.to_string(),
            o(&r.last_error_code),
            o(&r.last_error_message),
            r.enqueued_at.clone(),
            o(&r.completed_at),
            o(&r.batch_id),
        ];
        let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        // RFC 4180 ends records with CRLF; spreadsheets and `csv` readers take either, and
        // a line-oriented tool (`wc -l`, `grep`) reads LF as users expect.
        writeln!(out, "{}", line.join(","))?;
    }
    Ok(())
}

/// A CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn render_table(rows: &[RowSummary], out: &mut impl std::io::Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.state.clone(),
                format!("{} {}", r.object_type, r.operation),
                super::team_name(&r.team_id).to_owned(),
                r.record_id.clone(),
                r.attempts.to_string(),
                r.enqueued_at.clone(),
                format!(
                    "{} {}",
                    r.last_error_code.as_deref().unwrap_or(""),
                    crate::batch::truncate(r.last_error_message.as_deref().unwrap_or(""), 60)
                )
                .trim()
                .to_owned(),
            ]
        })
        .collect();
    super::table(
        out,
        &[
            "row",
            "state",
            "what",
            "team",
            "record",
            "attempts",
            "enqueued",
            "last error",
        ],
        &table,
    )
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_are_quoted_only_when_they_must_be_and_quotes_are_doubled() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell(""), "");
    }
}
