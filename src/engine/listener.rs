//! On Postgres: wakes the claimer as soon as a change commits (`NOTIFY` from the outbox
//! trigger), so that an idle daemon need not wait for its next poll.

use std::sync::Arc;
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
                Ok(l) => { failures = 0; l }
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
                n = listener.recv() => match n {
                    Ok(_) => shared.wake.notify_one(),
                    Err(e) => { debug!(error = %e, "LISTEN connection lost"); break; }
                },
            }
        }
    }
}
