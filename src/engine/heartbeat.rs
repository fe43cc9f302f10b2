//! The heartbeat: extends the leases of every batch the process holds (buffered, on the wire,
//! or waiting for its outcome write), every third of a lease, so that no other process takes
//! over a batch this one is still working on.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Shared;

pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.cfg.lease / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {},
        }
        let ours = shared.holdings.batch_ids();
        if ours.is_empty() {
            continue;
        }
        if let Err(e) = shared
            .store
            .extend_leases(&shared.cfg.owner, shared.cfg.lease, &ours)
            .await
        {
            warn!(error = %e, "could not extend batch leases");
        }
    }
}
