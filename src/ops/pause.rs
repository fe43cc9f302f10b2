//! `prism-sync pause` / `resume`: stop or restart sending for a team (`--team ID`, `default`
//! naming the default team) or one lane of it (`--object-type T`), on every replica. The pause
//! lives in `prism_pauses`; each replica reads it once per poll interval and leaves the team or
//! lane out of its claims, its leases and its sends (a batch it already held goes back unsent,
//! with no attempt counted). Each action is written to `prism_audit` with its actor.

use clap::Args;

use crate::model::ObjectType;
use crate::settings::Settings;
use crate::store::{Pause, PauseTarget, Store, StoreError};

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The team: its id, or `default` for the default team (micro.team_id).
    #[arg(long, value_name = "TEAM_ID")]
    pub team: String,
    /// Only this lane (object type) of the team.
    #[arg(long)]
    pub object_type: Option<ObjectType>,
    /// Who, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
}

/// `prism-sync pause`: stores the pause (audited) and says what it stopped.
pub async fn run_pause(
    store: &Store,
    args: &PauseArgs,
    settings: &Settings,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let target = checked_target(args, settings)?;
    if !target.team_id.is_empty() && !settings.teams.contains_key(&target.team_id) {
        eprintln!(
            "note: team {:?} is neither micro.team_id nor a [teams] entry in this configuration; the pause is stored for it anyway",
            target.team_id
        );
    }
    pause(store, &target, &super::actor(args.actor.as_deref()), out).await?;
    Ok(())
}

/// `prism-sync resume`: lifts the pause (audited).
pub async fn run_resume(
    store: &Store,
    args: &PauseArgs,
    settings: &Settings,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let target = checked_target(args, settings)?;
    resume(store, &target, &super::actor(args.actor.as_deref()), out).await?;
    Ok(())
}

fn checked_target(args: &PauseArgs, settings: &Settings) -> anyhow::Result<PauseTarget> {
    if args.team.trim().is_empty() {
        anyhow::bail!("--team needs a team id, or `default` for the default team");
    }
    Ok(target(
        &args.team,
        args.object_type,
        &settings.micro.team_id,
    ))
}

/// The pause target `--team` names: `default`, the configured default team's id, or an empty
/// id all mean the default team (stored as `''`, as its rows are).
pub fn target(team: &str, object_type: Option<ObjectType>, default_team_id: &str) -> PauseTarget {
    let team = team.trim();
    let default = team.is_empty()
        || team.eq_ignore_ascii_case("default")
        || (!default_team_id.is_empty() && team == default_team_id);
    PauseTarget {
        team_id: if default {
            String::new()
        } else {
            team.to_owned()
        },
        also: if default && !default_team_id.is_empty() {
            vec![default_team_id.to_owned()]
        } else {
            Vec::new()
        },
        object_type,
    }
}

/// How a target reads in messages: `team default` or `lane contact of team T`.
fn describe(t: &PauseTarget) -> String {
    let team = super::team_name(&t.team_id);
    match t.object_type {
        Some(o) => format!("lane {o} of team {team}"),
        None => format!("team {team} (every object type)"),
    }
}

/// `--team` flag as an operator would type it back.
fn flags(t: &PauseTarget) -> String {
    let team = super::team_name(&t.team_id);
    match t.object_type {
        Some(o) => format!("--team {team} --object-type {o}"),
        None => format!("--team {team}"),
    }
}

pub async fn pause(
    store: &Store,
    t: &PauseTarget,
    actor: &str,
    out: &mut impl std::io::Write,
) -> Result<(), PauseError> {
    let added = store.pause(t, actor).await?;
    if added {
        writeln!(
            out,
            "paused {} for every replica (within one poll interval); resume with: prism-sync resume {}",
            describe(t),
            flags(t)
        )?;
    } else {
        writeln!(out, "{} was already paused; nothing changed", describe(t))?;
    }
    Ok(())
}

pub async fn resume(
    store: &Store,
    t: &PauseTarget,
    actor: &str,
    out: &mut impl std::io::Write,
) -> Result<(), PauseError> {
    let lifted = store.resume(t, actor).await?;
    if lifted.is_empty() {
        writeln!(out, "{} was not paused; nothing changed", describe(t))?;
    }
    for p in &lifted {
        writeln!(
            out,
            "resumed {} (paused by {} since {})",
            describe_stored(p),
            p.actor,
            p.since
        )?;
    }
    // A lane resumed while its whole team stays paused sends nothing yet: say so.
    if t.object_type.is_some() {
        let team_wide = store
            .pauses()
            .await?
            .into_iter()
            .any(|p| t.team_ids().contains(&p.team_id.as_str()) && p.object_type.is_none());
        if team_wide {
            writeln!(
                out,
                "note: team {} is still paused as a whole; resume it with: prism-sync resume --team {}",
                super::team_name(&t.team_id),
                super::team_name(&t.team_id)
            )?;
        }
    }
    Ok(())
}

fn describe_stored(p: &Pause) -> String {
    match &p.object_type {
        Some(o) => format!("lane {o} of team {}", p.team),
        None => format!("team {} (every object type)", p.team),
    }
}

/// The pauses in force as `status` shows them.
pub fn render(pauses: &[Pause], out: &mut impl std::io::Write) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = pauses
        .iter()
        .map(|p| {
            vec![
                p.team.clone(),
                p.object_type.clone().unwrap_or_else(|| "(all)".into()),
                p.actor.clone(),
                p.since.clone(),
            ]
        })
        .collect();
    super::table(out, &["paused team", "object type", "by", "since"], &rows)
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_the_default_teams_id_and_an_empty_id_all_name_the_default_team() {
        for name in ["default", "DEFAULT", "team-a", ""] {
            assert_eq!(target(name, None, "team-a").team_id, "", "{name}");
        }
        assert_eq!(target("team-b", None, "team-a").team_id, "team-b");
        let lane = target("team-b", Some(ObjectType::Deal), "team-a");
        assert_eq!(lane.stored_type(), "deal");
        assert_eq!(flags(&lane), "--team team-b --object-type deal");
    }
}
