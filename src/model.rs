//! The vocabulary shared by every stage: object types, row and batch states, item outcomes.
//!
//! These are closed enums on purpose: the database stores their `as_str()` forms, and anything
//! else found there (a typo in an application's insert) is a malformed row, not a panic.

use std::fmt;
use std::str::FromStr;

/// The Prism object types that have a `batch/update` endpoint. Batches never mix them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ObjectType {
    Contact,
    Organization,
    Deal,
    Engagement,
    Action,
    Identity,
    Document,
}

impl ObjectType {
    pub const ALL: [ObjectType; 7] = [
        ObjectType::Contact,
        ObjectType::Organization,
        ObjectType::Deal,
        ObjectType::Engagement,
        ObjectType::Action,
        ObjectType::Identity,
        ObjectType::Document,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Contact => "contact",
            ObjectType::Organization => "organization",
            ObjectType::Deal => "deal",
            ObjectType::Engagement => "engagement",
            ObjectType::Action => "action",
            ObjectType::Identity => "identity",
            ObjectType::Document => "document",
        }
    }
}

impl fmt::Display for ObjectType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown object type {0:?} (expected one of contact, organization, deal, engagement, action, identity, document)"
)]
pub struct UnknownObjectType(pub String);

impl FromStr for ObjectType {
    type Err = UnknownObjectType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ObjectType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownObjectType(s.to_owned()))
    }
}

/// What a row asks of its record: `update` (the default) goes to `batch/update` with the patch,
/// `delete` to `batch/delete` with the record id only. Batches never mix operations.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `batch/update`: the patch is merged into the record.
    #[default]
    Update,
    /// `batch/delete`: the record is removed.
    Delete,
}

impl Operation {
    pub const ALL: [Operation; 2] = [Operation::Update, Operation::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown operation {0:?} (expected update or delete)")]
pub struct UnknownOperation(pub String);

impl FromStr for Operation {
    type Err = UnknownOperation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownOperation(s.to_owned()))
    }
}

/// The `team_id` values that mean team `id` in the outbox: its id, and for the default team
/// (`micro.team_id`) also `''`, which every row inserted without a team carries.
pub fn team_id_values(id: &str, default: bool) -> Vec<String> {
    if default {
        vec![String::new(), id.to_owned()]
    } else {
        vec![id.to_owned()]
    }
}

/// The life of an outbox row. `Succeeded` and `Dead` are terminal; only an operator's replay
/// brings a dead row back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowState {
    Pending,
    InFlight,
    Retrying,
    Succeeded,
    Dead,
}

impl RowState {
    pub const ALL: [RowState; 5] = [
        RowState::Pending,
        RowState::InFlight,
        RowState::Retrying,
        RowState::Succeeded,
        RowState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Pending => "pending",
            RowState::InFlight => "in_flight",
            RowState::Retrying => "retrying",
            RowState::Succeeded => "succeeded",
            RowState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<RowState> {
        RowState::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for RowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one item of an answered batch; every row the item carried shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Succeeded,
    /// Retry the rows later in a new batch (new key): the server answered this batch for good.
    Retry {
        code: String,
        message: String,
    },
    Dead {
        code: String,
        message: String,
    },
}

impl ItemOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ItemOutcome::Succeeded => "succeeded",
            ItemOutcome::Retry { .. } => "retried",
            ItemOutcome::Dead { .. } => "dead",
        }
    }
}

/// Codes prism-sync itself gives rows (the API's own codes are stored as the API sent them).
pub mod codes {
    pub const INVALID_RECORD_ID: &str = "invalid_record_id";
    pub const INVALID_PATCH: &str = "invalid_patch";
    pub const PATCH_TOO_LARGE: &str = "patch_too_large";
    pub const INVALID_OBJECT_TYPE: &str = "invalid_object_type";
    pub const MISSING_RESULT: &str = "missing_result";
    pub const BATCH_RELEASED: &str = "batch_released";
    pub const INVALID_OPERATION: &str = "invalid_operation";
    pub const UNKNOWN_TEAM: &str = "unknown_team";
    /// A batch whose key the API answered 2xx with a body that could not be read, still
    /// unreadable after `batch.max_attempts` re-sends under that key (never released: the API
    /// applied it).
    pub const UNREADABLE_RESPONSE: &str = "unreadable_response";
    /// A stored batch that could not be read back (edited by hand, or written by an
    /// incompatible version): its rows cannot be sent as stored.
    pub const CORRUPT_BATCH: &str = "corrupt_batch";
}
