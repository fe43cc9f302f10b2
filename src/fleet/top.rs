//! `prism-sync top`: the fleet at a glance, refreshed every `--interval`. Rows per second by
//! outcome and team come from successive reads of the outbox's counts; the replicas (what each
//! holds, its concurrency), pauses and lag from the same read.
//!
//! On a terminal it is a full-screen view (ratatui) that quits on `q`, Esc or Ctrl-C and gives
//! the terminal back whatever happens; otherwise it prints one plain line per interval, and
//! `--once` prints one full snapshot (rates over one interval) and exits.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use serde::Serialize;

use crate::ops::human_age;
use crate::ops::status::StatusReport;
use crate::store::fleet::{ReplicaView, ThrottlePause};
use crate::store::{Store, StoreError};

/// One read of the fleet.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub report: StatusReport,
    /// Server-requested pauses shared through the database (a 429 told some replica to wait).
    pub throttled: Vec<ThrottlePause>,
    /// Operator pauses (`pause`/`resume`).
    pub paused: Vec<String>,
}

/// Rows finished per second for one team, between two snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeamRate {
    pub team: String,
    pub succeeded_per_second: f64,
    pub dead_per_second: f64,
    pub pending: i64,
    pub in_flight: i64,
    pub retrying: i64,
}

/// The operators' pauses (`prism-sync pause`), as `team` or `team/object_type`, with who paused.
fn operator_pauses(report: &crate::ops::status::StatusReport) -> Vec<String> {
    report
        .paused
        .iter()
        .map(|p| match &p.object_type {
            Some(t) => format!("{}/{t} by {}", p.team, p.actor),
            None => format!("{} by {}", p.team, p.actor),
        })
        .collect()
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// How often to refresh (and the span rates are measured over).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Print one snapshot (rates over one interval) and exit.
    #[arg(long)]
    pub once: bool,
}

/// `prism-sync top`: the live view on a terminal, plain lines otherwise, until `q` or a signal.
pub async fn run(store: &Store, args: &TopArgs, out: &mut impl Write) -> anyhow::Result<()> {
    if args.interval.is_zero() {
        anyhow::bail!("--interval must be above zero");
    }
    let token = tokio_util::sync::CancellationToken::new();
    stop_on_signals(token.clone());
    let options = TopOptions {
        interval: args.interval,
        once: args.once,
        tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    command(store, options, out, token).await?;
    Ok(())
}

pub async fn snapshot(store: &Store) -> Result<Snapshot, StoreError> {
    let report = crate::ops::status::status(store).await?;
    Ok(Snapshot {
        taken: Instant::now(),
        throttled: store.throttle_pauses().await?,
        paused: operator_pauses(&report),
        report,
    })
}

/// Rows per second by team between `before` and `after` (a purge in between reads as 0, not
/// as a negative rate).
pub fn rates(before: &Snapshot, after: &Snapshot) -> Vec<TeamRate> {
    let seconds = after
        .taken
        .saturating_duration_since(before.taken)
        .as_secs_f64()
        .max(0.001);
    let count = |s: &Snapshot, team: &str, state: &str| {
        s.report
            .rows_by_team
            .get(team)
            .and_then(|states| states.get(state))
            .copied()
            .unwrap_or(0)
    };
    let per_second = |team: &str, state: &str| {
        (count(after, team, state) - count(before, team, state)).max(0) as f64 / seconds
    };
    after
        .report
        .rows_by_team
        .keys()
        .map(|team| TeamRate {
            team: team.clone(),
            succeeded_per_second: per_second(team, "succeeded"),
            dead_per_second: per_second(team, "dead"),
            pending: count(after, team, "pending"),
            in_flight: count(after, team, "in_flight"),
            retrying: count(after, team, "retrying"),
        })
        .collect()
}

/// The replicas table of `status` (and of `top --once`).
pub fn render_replicas(replicas: &[ReplicaView], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    if replicas.is_empty() {
        return writeln!(
            out,
            "  replicas: none registered (no `prism-sync run` is up)"
        );
    }
    let silent = replicas.iter().filter(|r| r.silent).count();
    writeln!(out, "  replicas: {} ({silent} silent)", replicas.len())?;
    let rows: Vec<Vec<String>> = replicas.iter().map(replica_cells).collect();
    crate::ops::table(
        out,
        &[
            "owner",
            "host",
            "version",
            "last seen",
            "batches held",
            "concurrency",
            "",
        ],
        &rows,
    )
}

fn replica_cells(r: &ReplicaView) -> Vec<String> {
    vec![
        r.owner.clone(),
        r.host.clone(),
        r.version.clone(),
        format!("{} ago", human_age(r.last_seen_seconds)),
        r.batches_held.to_string(),
        concurrency(r),
        if r.silent {
            "SILENT".into()
        } else {
            String::new()
        },
    ]
}

/// Each team's concurrency limit out of its maximum, and its ceiling when it has one.
fn concurrency(r: &ReplicaView) -> String {
    r.teams
        .iter()
        .map(|t| {
            let ceiling = if t.max_requests_per_second > 0.0 {
                format!(" ≤{}/s", t.max_requests_per_second)
            } else {
                String::new()
            };
            if r.teams.len() == 1 {
                format!("{}/{}{ceiling}", t.concurrency, t.max_in_flight)
            } else {
                format!("{}: {}/{}{ceiling}", t.team, t.concurrency, t.max_in_flight)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn pauses_text(s: &Snapshot) -> String {
    let mut parts: Vec<String> = s.paused.iter().map(|p| format!("{p} (operator)")).collect();
    parts.extend(s.throttled.iter().map(|t| {
        format!(
            "{} (API asked to wait, {} left)",
            t.team,
            human_age(t.remaining_seconds)
        )
    }));
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn total(rates: &[TeamRate], f: impl Fn(&TeamRate) -> f64) -> f64 {
    // A fold from +0.0: `sum` of no floats is -0.0, which prints as "-0.0".
    rates.iter().map(f).fold(0.0, |a, b| a + b)
}

/// One line per interval, for logs and pipes.
pub fn plain_line(s: &Snapshot, rates: &[TeamRate]) -> String {
    let r = &s.report;
    let n = |state: &str| r.rows.get(state).copied().unwrap_or(0);
    let silent = r.replicas.iter().filter(|x| x.silent).count();
    let held: i64 = r.replicas.iter().map(|x| x.batches_held).sum();
    format!(
        "{} · rows/s succeeded {:.1} dead {:.1} · pending {} retrying {} in flight {} · batches in flight {} · oldest pending {} · replicas {} ({silent} silent, holding {held}) · paused: {}",
        now_rfc3339(),
        total(rates, |t| t.succeeded_per_second),
        total(rates, |t| t.dead_per_second),
        n("pending"),
        n("retrying"),
        n("in_flight"),
        r.batches_in_flight,
        human_age(r.oldest_pending_age_seconds),
        r.replicas.len(),
        pauses_text(s),
    )
}

/// The whole view as text (`--once`).
pub fn render_plain(s: &Snapshot, rates: &[TeamRate], out: &mut impl Write) -> std::io::Result<()> {
    let r = &s.report;
    writeln!(
        out,
        "prism-sync top ({} outbox) at {}",
        r.database,
        now_rfc3339()
    )?;
    writeln!(out)?;
    let rows: Vec<Vec<String>> = rates.iter().map(rate_cells).collect();
    crate::ops::table(out, &RATE_HEADER, &rows)?;
    writeln!(out)?;
    writeln!(out, "  batches in flight: {}", r.batches_in_flight)?;
    writeln!(
        out,
        "  oldest pending: {} · rows waiting on an older row of their record: {}",
        human_age(r.oldest_pending_age_seconds),
        r.rows_held_back
    )?;
    writeln!(out, "  paused: {}", pauses_text(s))?;
    render_replicas(&r.replicas, out)
}

const RATE_HEADER: [&str; 6] = [
    "team",
    "succeeded/s",
    "dead/s",
    "pending",
    "in flight",
    "retrying",
];

fn rate_cells(t: &TeamRate) -> Vec<String> {
    vec![
        t.team.clone(),
        format!("{:.1}", t.succeeded_per_second),
        format!("{:.1}", t.dead_per_second),
        t.pending.to_string(),
        t.in_flight.to_string(),
        t.retrying.to_string(),
    ]
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// How `top` runs.
#[derive(Debug, Clone, Copy)]
pub struct TopOptions {
    pub interval: Duration,
    pub once: bool,
    /// stdout is a terminal: draw the full-screen view.
    pub tty: bool,
}

/// Runs `top` until `q`/Ctrl-C (a terminal), a signal (`stop`), or after one snapshot
/// (`--once`).
pub async fn command(
    store: &Store,
    options: TopOptions,
    out: &mut impl Write,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut before = snapshot(store).await?;
    if options.once {
        tokio::time::sleep(options.interval).await;
        let after = snapshot(store).await?;
        render_plain(&after, &rates(&before, &after), out)?;
        return Ok(());
    }
    if options.tty {
        return run_terminal(store, options.interval, before, stop).await;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(options.interval) => {},
        }
        let after = snapshot(store).await?;
        writeln!(out, "{}", plain_line(&after, &rates(&before, &after)))?;
        out.flush()?;
        before = after;
    }
}

/// Cancels `stop` on SIGTERM or SIGINT, quietly: `top` has nothing to drain. (On a terminal
/// in raw mode Ctrl-C arrives as a key instead.)
pub fn stop_on_signals(stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        stop.cancel();
    });
}

/// Gives the terminal back (raw mode off, main screen) when dropped: on `q`, on an error and
/// while a panic unwinds (ratatui's panic hook covers a panic that aborts).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

async fn run_terminal(
    store: &Store,
    interval: Duration,
    mut before: Snapshot,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let quit = Arc::new(AtomicBool::new(false));
    let mut terminal = ratatui::try_init()?;
    let _guard = TerminalGuard;
    let keys = spawn_key_reader(quit.clone());
    let mut rates_now = Vec::new();
    let mut current = before.clone();
    let result = loop {
        if let Err(e) = terminal.draw(|frame| draw(frame, &current, &rates_now, interval)) {
            break Err(e.into());
        }
        let next = Instant::now() + interval;
        while Instant::now() < next && !quit.load(Ordering::Relaxed) && !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if quit.load(Ordering::Relaxed) || stop.is_cancelled() {
            break Ok(());
        }
        match snapshot(store).await {
            Ok(after) => {
                rates_now = rates(&before, &after);
                before = after.clone();
                current = after;
            }
            Err(e) => break Err(e.into()),
        }
    };
    quit.store(true, Ordering::Relaxed);
    let _ = keys.join();
    result
}

/// Reads keys on a thread of its own (crossterm's reads block) until `q`, Esc or Ctrl-C (raw
/// mode turns Ctrl-C into a key), or until `quit` is set by the view.
fn spawn_key_reader(quit: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !quit.load(Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => break,
            }
            let Ok(Event::Key(key)) = event::read() else {
                continue;
            };
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if key.kind == KeyEventKind::Press
                && (ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc))
            {
                break;
            }
        }
        quit.store(true, Ordering::Relaxed);
    })
}

fn draw(frame: &mut ratatui::Frame, s: &Snapshot, rates: &[TeamRate], interval: Duration) {
    let r = &s.report;
    let header = Style::default().add_modifier(Modifier::BOLD);
    let [summary, teams, replicas] = Layout::vertical([
        Constraint::Length(6),
        Constraint::Length(rates.len().max(1) as u16 + 3),
        Constraint::Min(4),
    ])
    .areas(frame.area());
    let n = |state: &str| r.rows.get(state).copied().unwrap_or(0);
    let lines = vec![
        Line::from(format!(
            "rows/s  succeeded {:.1}  dead {:.1}    pending {}  retrying {}  in flight {}",
            total(rates, |t| t.succeeded_per_second),
            total(rates, |t| t.dead_per_second),
            n("pending"),
            n("retrying"),
            n("in_flight"),
        )),
        Line::from(format!(
            "batches in flight {}    oldest pending {}    rows held back {}",
            r.batches_in_flight,
            human_age(r.oldest_pending_age_seconds),
            r.rows_held_back
        )),
        Line::from(format!("paused: {}", pauses_text(s))),
        Line::from(format!(
            "refresh every {}; q, Esc or Ctrl-C quits",
            humantime::format_duration(interval)
        )),
    ];
    let title = format!(" prism-sync top · {} outbox ", r.database);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        summary,
    );
    let widths = [
        Constraint::Fill(2),
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
    ];
    let rows = rates.iter().map(|t| Row::new(rate_cells(t)));
    frame.render_widget(
        Table::new(rows, widths)
            .header(Row::new(RATE_HEADER).style(header))
            .block(Block::bordered().title(" teams ")),
        teams,
    );
    let silent = r.replicas.iter().filter(|x| x.silent).count();
    let widths = [
        Constraint::Fill(3),
        Constraint::Fill(1),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Fill(2),
        Constraint::Length(7),
    ];
    let rows = r.replicas.iter().map(|x| Row::new(replica_cells(x)));
    frame.render_widget(
        Table::new(rows, widths)
            .header(
                Row::new([
                    "owner",
                    "host",
                    "version",
                    "last seen",
                    "held",
                    "concurrency",
                    "",
                ])
                .style(header),
            )
            .block(Block::bordered().title(format!(
                " replicas: {} ({silent} silent) ",
                r.replicas.len()
            ))),
        replicas,
    );
}
