//! What the API fault phases promise beyond "nothing lost", checked on the simulator's request
//! log (`GET /_sim/requests`: each entry logged when the simulator decided its answer, with when
//! the request arrived):
//!
//! - a 429 holds back every request of its team for the pause it asked for (`retry-after`,
//!   `retry-after-ms`), capped at `http.max_retry_after`; requests already on the wire when it
//!   was answered may still arrive ([`IN_FLIGHT`]);
//! - a huge `retry-after` stalls the team for the cap, not for what the server asked;
//! - a key answered `409 idempotency_key_in_use` is sent again under the same key, and that
//!   re-send gets an answer.
//!
//! Pure functions with tests of their own that plant each broken promise.

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

use crate::checker::Request;

/// How late after a 429 was answered a request that the daemon sent before reading it may
/// arrive: the network, the daemon's and the simulator's processing, with room for a loaded
/// machine. Requests arriving later than this were sent after the 429 arrived.
pub const IN_FLIGHT: Duration = Duration::from_millis(200);

/// How much later than the end of its capped pause a stalled team may send again (the deferred
/// batch waits for the claimer's next poll and a database write).
pub const CAP_SLACK: Duration = Duration::from_millis(1500);

/// After a pause ends, a request of another batch within this long shows that batch was waiting.
pub const RELEASE_WINDOW: Duration = Duration::from_millis(300);

/// A log entry's time (when it was answered), or `None` if the simulator wrote something
/// unreadable.
pub fn at(r: &Request) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&r.at, &time::format_description::well_known::Rfc3339).ok()
}

/// When a logged request arrived (sent, give or take the network), or when it was answered if
/// the log does not say. A request whose work was slow is answered seconds after it was sent.
fn received(r: &Request) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(
        &r.received_at,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
    .or_else(|| at(r))
}

fn span(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// The injected 429s logged in `[from, to)`, with their times.
fn rate_limits(
    log: &[Request],
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Vec<(OffsetDateTime, &Request)> {
    log.iter()
        .filter(|r| r.status == 429 && r.faults.iter().any(|f| f == "rate_limit"))
        .filter_map(|r| at(r).map(|t| (t, r)))
        .filter(|(t, _)| *t >= from && *t < to)
        .collect()
}

/// Requests of `team` that arrived in `(after, before)`, with their arrival. Arrival, not
/// answer: a request sent before a 429 whose work was slow is answered well inside the pause
/// without having broken it, and one sent inside the pause may be answered after it.
fn team_requests_between<'a>(
    log: &'a [Request],
    team: Option<&'a str>,
    after: OffsetDateTime,
    before: OffsetDateTime,
) -> impl Iterator<Item = (OffsetDateTime, &'a Request)> {
    log.iter()
        .filter(move |r| r.team.as_deref() == team)
        .filter_map(|r| received(r).map(|t| (t, r)))
        .filter(move |(t, _)| *t > after && *t < before)
}

/// Every request of a team sent while a 429 logged in `[from, to)` held it back: arrived more
/// than [`IN_FLIGHT`] after the 429 was answered and before the 429's `pause` ended. Returns how
/// many 429s were checked and the violations.
pub fn requests_during_pauses(
    log: &[Request],
    from: OffsetDateTime,
    to: OffsetDateTime,
    pause: Duration,
) -> (usize, Vec<String>) {
    let limits = rate_limits(log, from, to);
    let mut violations = Vec::new();
    for (t, limit) in &limits {
        let team = limit.team.as_deref();
        for (sent, r) in team_requests_between(log, team, *t + span(IN_FLIGHT), *t + span(pause)) {
            violations.push(format!(
                "a request of team {team:?} (key {:?}, answered {}) arrived {:.3}s after a 429 (key {:?}) that asked for a pause of {pause:?}: a 429 must hold back every batch of the team",
                r.idempotency_key,
                r.status,
                (sent - *t).as_seconds_f64(),
                limit.idempotency_key,
            ));
        }
    }
    (limits.len(), violations)
}

/// For a 429 logged in `[from, to)` that asked for more than `cap`: the team's next request
/// (arriving later than [`IN_FLIGHT`] after it) must arrive within `cap` + [`CAP_SLACK`], not
/// after the server's huge delay. Arrival, not answer: the phase after may make the server's
/// work slow, and a request sent on time would then be answered late. `log_end` is when the log
/// was read: a 429 too close to it to tell is skipped.
pub fn stalls_past_the_cap(
    log: &[Request],
    from: OffsetDateTime,
    to: OffsetDateTime,
    cap: Duration,
    log_end: OffsetDateTime,
) -> Vec<String> {
    let bound = span(cap + CAP_SLACK);
    let mut violations = Vec::new();
    for (t, limit) in rate_limits(log, from, to) {
        if t + bound > log_end {
            continue;
        }
        let team = limit.team.as_deref();
        let next = log
            .iter()
            .filter(|r| r.team.as_deref() == team)
            .filter_map(received)
            .filter(|sent| *sent > t + span(IN_FLIGHT))
            .min();
        match next {
            Some(sent) if sent - t <= bound => {}
            Some(sent) => violations.push(format!(
                "after a 429 (key {:?}) the team {team:?} sent nothing for {:.3}s: http.max_retry_after is {cap:?}",
                limit.idempotency_key,
                (sent - t).as_seconds_f64()
            )),
            None => violations.push(format!(
                "after a 429 (key {:?}) the team {team:?} never sent again: http.max_retry_after is {cap:?}",
                limit.idempotency_key
            )),
        }
    }
    violations
}

/// How many 429s logged in `[from, to)` were followed, right as their `pause` ended, by a
/// request of *another* batch of the team arriving: evidence that the pause held back a batch
/// that was ready (without it, [`requests_during_pauses`] would pass having tested nothing).
pub fn batches_held_back(
    log: &[Request],
    from: OffsetDateTime,
    to: OffsetDateTime,
    pause: Duration,
) -> usize {
    rate_limits(log, from, to)
        .into_iter()
        .filter(|(t, limit)| {
            let end = *t + span(pause);
            team_requests_between(
                log,
                limit.team.as_deref(),
                end - time::Duration::MILLISECOND,
                end + span(RELEASE_WINDOW),
            )
            .any(|(_, r)| r.idempotency_key != limit.idempotency_key)
        })
        .count()
}

/// Every key the simulator answered `409` must be sent again, and the last request under it
/// must have been answered with something other than a retryable status. (A 409 here is "key
/// in use": the checker separately requires that the simulator counted no
/// `idempotency_key_mismatch`.) The daemon may not have read the 409 (its own timeout can come
/// first); the re-send under the same key is owed either way. Returns how many keys got a 409.
pub fn key_in_use_not_resent(log: &[Request]) -> (usize, Vec<String>) {
    let mut by_key: HashMap<&str, Vec<&Request>> = HashMap::new();
    for r in log {
        if let Some(k) = r.idempotency_key.as_deref() {
            by_key.entry(k).or_default().push(r);
        }
    }
    let retryable = |s: u16| matches!(s, 401 | 403 | 408 | 409 | 429) || s >= 500;
    let mut violations = Vec::new();
    let mut keys = 0;
    let mut sorted: Vec<(&str, Vec<&Request>)> = by_key.into_iter().collect();
    sorted.sort_by_key(|(k, _)| *k);
    for (key, requests) in sorted {
        let Some(last_409) = requests.iter().rposition(|r| r.status == 409) else {
            continue;
        };
        keys += 1;
        match requests[last_409 + 1..].last() {
            None => violations.push(format!(
                "key {key} was answered 409 (in use) and never sent again: a 409 while a key is in use must be retried under the same key"
            )),
            Some(last) if retryable(last.status) => violations.push(format!(
                "key {key} was re-sent after its 409 but its last request was answered {}: it never got an answer",
                last.status
            )),
            Some(_) => {}
        }
    }
    (keys, violations)
}

mod self_test {
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";

    fn req(ms: i64, key: &str, status: u16, faults: &[&str]) -> Request {
        let t = OffsetDateTime::parse(T0, &time::format_description::well_known::Rfc3339).unwrap()
            + time::Duration::milliseconds(ms);
        let at = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        Request {
            received_at: at.clone(),
            at,
            idempotency_key: Some(key.into()),
            status,
            team: Some("team".into()),
            faults: faults.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    fn t(ms: i64) -> OffsetDateTime {
        OffsetDateTime::parse(T0, &time::format_description::well_known::Rfc3339).unwrap()
            + time::Duration::milliseconds(ms)
    }

    const PAUSE: Duration = Duration::from_millis(1000);

    /// A 429 at 1.000 s for key a; b was on the wire (answered 1.050 s); both go again after
    /// the pause.
    fn obeyed() -> Vec<Request> {
        vec![
            req(900, "b", 200, &[]),
            req(1000, "a", 429, &["rate_limit"]),
            req(1050, "c", 200, &[]),
            req(2005, "b", 200, &[]),
            req(2060, "a", 200, &[]),
        ]
    }

    #[test]
    fn a_pause_obeyed_by_every_batch_passes_and_shows_a_batch_held_back() {
        let log = obeyed();
        let (checked, v) = requests_during_pauses(&log, t(0), t(5000), PAUSE);
        assert_eq!((checked, v), (1, Vec::<String>::new()));
        assert_eq!(batches_held_back(&log, t(0), t(5000), PAUSE), 1);
        assert_eq!(
            stalls_past_the_cap(&log, t(0), t(5000), PAUSE, t(10_000)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn another_batch_sent_during_the_pause_is_caught() {
        let mut log = obeyed();
        log.insert(3, req(1400, "d", 200, &[]));
        let (_, v) = requests_during_pauses(&log, t(0), t(5000), PAUSE);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("key Some(\"d\")"), "{v:?}");
    }

    #[test]
    fn a_pause_is_judged_by_when_requests_arrived_not_when_they_were_answered() {
        // c went out before the 429 was answered and its slow work ended inside the pause: no
        // violation.
        let mut log = obeyed();
        log[2].received_at = req(950, "c", 200, &[]).at;
        log[2].at = req(1600, "c", 200, &["slow_work"]).at;
        let (_, v) = requests_during_pauses(&log, t(0), t(5000), PAUSE);
        assert_eq!(v, Vec::<String>::new());
        // d went out inside the pause and was answered after it ended: caught.
        let mut d = req(2500, "d", 200, &["slow_work"]);
        d.received_at = req(1500, "d", 200, &[]).at;
        log.push(d);
        let (_, v) = requests_during_pauses(&log, t(0), t(5000), PAUSE);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("key Some(\"d\")"), "{v:?}");
    }

    #[test]
    fn a_pause_that_held_back_no_other_batch_is_no_evidence() {
        let log = vec![
            req(1000, "a", 429, &["rate_limit"]),
            req(2060, "a", 200, &[]),
        ];
        assert_eq!(batches_held_back(&log, t(0), t(5000), PAUSE), 0);
    }

    #[test]
    fn a_stall_longer_than_the_cap_is_caught() {
        let log = vec![
            req(1000, "a", 429, &["rate_limit"]),
            req(9000, "a", 200, &[]),
        ];
        let v = stalls_past_the_cap(&log, t(0), t(5000), PAUSE, t(20_000));
        assert!(v[0].contains("sent nothing for 8.000s"), "{v:?}");
        let v = stalls_past_the_cap(&log[..1], t(0), t(5000), PAUSE, t(20_000));
        assert!(v[0].contains("never sent again"), "{v:?}");
    }

    #[test]
    fn a_request_sent_in_time_whose_answer_was_slow_is_no_stall() {
        // Sent 1.1 s after the 429, answered 5 s later (the next phase's slow work).
        let mut slow = req(6100, "a", 200, &["slow_work"]);
        slow.received_at = req(1100, "a", 200, &[]).at;
        let log = vec![req(0, "a", 429, &["rate_limit"]), slow.clone()];
        assert_eq!(
            stalls_past_the_cap(&log, t(-1), t(5000), PAUSE, t(20_000)),
            Vec::<String>::new()
        );
        // Sent late, it is caught whenever it was answered.
        slow.received_at = req(4000, "a", 200, &[]).at;
        let log = vec![req(0, "a", 429, &["rate_limit"]), slow];
        let v = stalls_past_the_cap(&log, t(-1), t(5000), PAUSE, t(20_000));
        assert!(v[0].contains("sent nothing for 4.000s"), "{v:?}");
    }

    #[test]
    fn a_409_not_followed_by_an_answered_resend_is_caught() {
        let log = vec![
            req(0, "a", 409, &[]),
            req(500, "a", 200, &[]),
            req(0, "b", 409, &[]),
            req(0, "c", 409, &[]),
            req(300, "c", 503, &[]),
            req(0, "d", 200, &[]),
        ];
        let (keys, v) = key_in_use_not_resent(&log);
        assert_eq!(keys, 3);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("key b") && v[0].contains("never sent again"));
        assert!(v[1].contains("key c") && v[1].contains("answered 503"));
    }
}
