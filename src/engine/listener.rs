//! On Postgres: wakes the claimer as soon as a change commits (`NOTIFY` from the outbox
//! trigger), so that an idle daemon need not wait for its next poll. While its `LISTEN` holds
//! (`Shared::listening`), an idle claimer polls less often (`poll.idle_interval`); when the
//! connection is lost it polls at `poll.interval` again until a new `LISTEN` holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Shared;
use crate::backoff::RetryPolicy;
use crate::store::PgStore;

pub(super) async fn run(shared: Arc<Shared>, pg: PgStore, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            l = pg.listener() => match l {
                Ok(l) => {
                    failures = 0;
                    shared.listening.store(true, Ordering::Relaxed);
                    // A change committed while no LISTEN was held would go unnoticed until
                    // the next poll: look now.
                    shared.wake.notify_one();
                    l
                }
                Err(e) => {
                    failures += 1;
                    let wait = RetryPolicy { base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) }.ceiling(failures);
                    debug!(error = %e, "LISTEN failed; polling meanwhile");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(wait) => {} }
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // `try_recv`, not `recv`: a lost connection must be seen (notifications sent
                // meanwhile are gone), not reconnected behind the claimer's back.
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => shared.wake.notify_one(),
                    lost => {
                        // Until LISTEN holds again, the claimer polls at `poll.interval`, and it
                        // looks now for what a lost notification would have announced.
                        shared.listening.store(false, Ordering::Relaxed);
                        shared.wake.notify_one();
                        match lost {
                            Err(e) => debug!(error = %e, "LISTEN connection lost"),
                            _ => debug!("LISTEN connection lost"),
                        }
                        break;
                    }
                },
            }
        }
    }
}
