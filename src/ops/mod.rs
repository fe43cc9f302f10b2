//! The operator's verbs: `enqueue`, `status`, `inspect`, `replay`, `purge`, `rows`, `discard`,
//! `audit`. Each writes to a `&mut impl Write` so tests read exactly what an operator sees; each
//! works on both engines and while a daemon runs on the same database. No SQL here: the verbs
//! read and write through typed `Store` methods (`store/views.rs`).

pub mod audit;
pub mod completions;
pub mod discard;
pub mod enqueue;
pub mod history;
pub mod inspect;
pub mod pause;
pub mod purge;
pub mod replay;
pub mod rows;
pub mod select;
pub mod status;
pub mod supersede;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Turns `2026-11-28T10:00:00Z` or a relative `2h` (that long ago) into a UTC time.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t.to_offset(time::UtcOffset::UTC));
    }
    match humantime::parse_duration(text) {
        Ok(d) => time::Duration::try_from(d)
            .ok()
            .and_then(|d| OffsetDateTime::now_utc().checked_sub(d))
            .ok_or_else(|| format!("{text:?} ago is before any time this tool can name")),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-28T10:00:00Z) nor a duration ago (2h, 30m)"
        )),
    }
}

/// Who did it, for the audit log: `--actor`, else `PRISM_SYNC_ACTOR`, else the user who ran
/// `sudo`, else the OS user (`USER`/`LOGNAME`, then the password database's name for the
/// process's uid, so that a service account without a login environment is still named).
pub fn actor(explicit: Option<&str>) -> String {
    let named = |v: Option<String>| v.filter(|a| !a.trim().is_empty());
    named(explicit.map(str::to_owned))
        .or_else(|| named(std::env::var("PRISM_SYNC_ACTOR").ok()))
        .or_else(|| named(std::env::var("SUDO_USER").ok()))
        .or_else(|| named(std::env::var("USER").ok()))
        .or_else(|| named(std::env::var("LOGNAME").ok()))
        .or_else(os_user)
        .unwrap_or_else(|| "unknown".into())
}

/// The password database's name for this process's real uid, or `uid:N` when it has none.
fn os_user() -> Option<String> {
    #[cfg(unix)]
    {
        // SAFETY: getuid cannot fail; getpwuid_r writes at most `buf.len()` bytes into `buf` and
        // fills `pwd`, whose `pw_name` then points into `buf`, which outlives its use here.
        let uid = unsafe { libc::getuid() };
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == 0 && !found.is_null() && !pwd.pw_name.is_null() {
            let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
            return Some(name.to_string_lossy().into_owned());
        }
        Some(format!("uid:{uid}"))
    }
    #[cfg(not(unix))]
    None
}

/// Asks `question` and reads the answer: only `y` or `yes` (any case) confirms; anything else,
/// or the end of the input, does not.
pub fn confirm(
    question: &str,
    out: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> std::io::Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// A plain left-aligned text table.
pub fn table(
    out: &mut impl std::io::Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

pub fn human_age(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "0s".into();
    }
    let secs = seconds.round() as u64;
    if secs == 0 {
        return format!("{}ms", (seconds * 1000.0).round() as u64);
    }
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// A stored `team_id` as operators read it: the empty value is the configured default team.
pub(crate) fn team_name(team_id: &str) -> &str {
    if team_id.is_empty() {
        "default"
    } else {
        team_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_rfc_3339_or_a_duration_ago_and_a_duration_too_long_is_an_error() {
        let t = parse_time("2026-11-28T12:00:00+02:00").unwrap();
        assert_eq!(
            t,
            OffsetDateTime::parse("2026-11-28T10:00:00Z", &Rfc3339).unwrap()
        );
        let then = parse_time("2h").unwrap();
        let ago = OffsetDateTime::now_utc() - then;
        assert!(ago >= time::Duration::hours(2) && ago < time::Duration::hours(3));
        // Further back than the year -9999: an error, not a panic.
        assert!(
            parse_time("20000y")
                .unwrap_err()
                .contains("before any time")
        );
        assert!(parse_time("soon").is_err());
    }
}
