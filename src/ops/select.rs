//! The row filters that `replay`, `discard` and `rows` share on the command line, and how a
//! team named there maps onto the stored `team_id` values.

use uuid::Uuid;

use crate::model::{ObjectType, Operation, team_id_values};
use crate::store::views::RowFilter;

/// Which rows: every criterion given must hold.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RowSelection {
    /// A row id (repeatable).
    #[arg(long = "id", value_name = "ROW_ID")]
    pub ids: Vec<i64>,
    /// Rows last carried by this batch.
    #[arg(long, value_name = "BATCH_ID")]
    pub batch: Option<Uuid>,
    /// Rows whose last error has this code (e.g. not_found, http_400).
    #[arg(long)]
    pub error_code: Option<String>,
    #[arg(long)]
    pub record_id: Option<Uuid>,
    #[arg(long)]
    pub object_type: Option<ObjectType>,
    /// Rows of this team (its id, or `default`; the default team's rows include those with an
    /// empty team_id).
    #[arg(long, value_name = "TEAM_ID")]
    pub team: Option<String>,
    /// Only updates or only deletes.
    #[arg(long)]
    pub operation: Option<Operation>,
    /// Enqueued at or after: an RFC 3339 time or a duration ago (2h).
    #[arg(long, value_parser = super::parse_time)]
    pub since: Option<time::OffsetDateTime>,
    /// Enqueued before: an RFC 3339 time or a duration ago.
    #[arg(long, value_parser = super::parse_time)]
    pub until: Option<time::OffsetDateTime>,
}

impl RowSelection {
    /// The stored `team_id` values `--team` names: the configured default team (by its id,
    /// `default` in any case, or an empty name, as `pause --team` reads them) is also every row
    /// with an empty `team_id`.
    pub fn teams(&self, default_team: &str) -> Vec<String> {
        match self.team.as_deref().map(str::trim) {
            Some(team)
                if team == default_team
                    || team.is_empty()
                    || team.eq_ignore_ascii_case("default") =>
            {
                team_id_values(default_team, true)
            }
            Some(team) => team_id_values(team, false),
            None => Vec::new(),
        }
    }

    /// As the store reads it, in any state (the verb narrows the states).
    pub fn filter(&self, default_team: &str) -> RowFilter {
        RowFilter {
            ids: self.ids.clone(),
            batch: self.batch,
            error_code: self.error_code.clone(),
            record_id: self.record_id,
            object_type: self.object_type,
            teams: self.teams(default_team),
            operation: self.operation,
            since: self.since,
            until: self.until,
            ..RowFilter::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(name: &str) -> RowSelection {
        RowSelection {
            team: Some(name.to_owned()),
            ..RowSelection::default()
        }
    }

    #[test]
    fn the_default_team_is_named_as_pause_names_it() {
        let default = team("default").teams("team-1");
        assert!(default.contains(&String::new()), "{default:?}");
        for name in ["DEFAULT", " Default ", "", "team-1"] {
            assert_eq!(team(name).teams("team-1"), default, "{name:?}");
        }
        assert!(!team("team-2").teams("team-1").contains(&String::new()));
    }
}
