//! The recorder: every batch end goes through one task, which commits whatever has queued up
//! meanwhile in one transaction (group commit: one fsync for many batches), each end fenced on
//! its own lease. An answered batch is handed over whole (its [`Answered`]) and settled here once
//! its write lands, so a worker moves on at once and no task is left behind that shutdown could
//! not wait for: the recorder drains its queue before the engine stops.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::Shared;
use super::settle::Answered;
use crate::model::RowState;
use crate::store::{FinishBatch, Store, StoreError};

/// One batch end for the recorder, and who hears how it went.
pub(super) struct Recording {
    end: FinishBatch,
    reply: Reply,
}

enum Reply {
    /// A worker waits for the result.
    Worker(oneshot::Sender<Option<bool>>),
    /// An answered batch, counted and let go by the recorder once its write lands.
    Answered(Box<Answered>),
}

impl Reply {
    /// `written`: `Some(true)` written, `Some(false)` the batch is no longer ours, `None` the
    /// database could not be written.
    fn deliver(self, written: Option<bool>) {
        match self {
            // A worker that stopped waiting has nothing left to do with the answer.
            Reply::Worker(reply) => drop(reply.send(written)),
            Reply::Answered(answered) => answered.settle(written),
        }
    }
}

pub(super) type Queue = mpsc::UnboundedReceiver<Recording>;

impl Shared {
    /// Records a batch's end durably and waits for it; `Some(false)` when the batch is no longer
    /// ours, `None` when the database could not be written (the batch stays stored and is
    /// re-sent later).
    pub(super) async fn record(&self, end: FinishBatch) -> Option<bool> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(end, Reply::Worker(reply));
        // A closed recorder drops `reply`, and the receiver then reads as "not written".
        answer.await.ok().flatten()
    }

    /// Queues an answered batch's end for the recorder at once (so a draining engine still
    /// writes it); the recorder settles `answered` when the write lands.
    pub(super) fn record_answered(&self, end: FinishBatch, answered: Answered) {
        self.enqueue(end, Reply::Answered(Box::new(answered)));
    }

    fn enqueue(&self, end: FinishBatch, reply: Reply) {
        // Rows it leaves retrying come due by the claimer's clock, not its next idle poll.
        let retry_in = end
            .rows
            .iter()
            .filter(|r| r.state == RowState::Retrying)
            .map(|r| r.retry_in)
            .fold(f64::INFINITY, f64::min);
        if retry_in.is_finite() {
            self.look_again_in(Duration::try_from_secs_f64(retry_in.max(0.0)).unwrap_or_default());
        }
        if let Err(mpsc::error::SendError(refused)) = self.recorder.send(Recording { end, reply }) {
            // The recorder has stopped (only after every worker has): nothing was written.
            refused.reply.deliver(None);
        }
    }
}

/// At most this many batch ends share one transaction.
const MAX_GROUP: usize = 64;

/// Commits batch ends in groups: whatever queued while the previous commit ran goes into the
/// next transaction. Stops when `stop` fires and the queue is empty.
pub(super) async fn run(store: Store, mut queue: Queue, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            biased;
            r = queue.recv() => match r { Some(r) => r, None => return },
            _ = stop.cancelled() => match queue.try_recv() { Ok(r) => r, Err(_) => return },
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let (ends, replies): (Vec<FinishBatch>, Vec<Reply>) =
            group.into_iter().map(|r| (r.end, r.reply)).unzip();
        let written = record_group(&store, &ends).await;
        for (reply, written) in replies.into_iter().zip(written) {
            reply.deliver(written);
        }
    }
}

/// Writes a group of batch ends, one result per batch (`None`: not written). A group the
/// database refuses for what one batch holds is written batch by batch, so that one batch's
/// write never holds the others back.
async fn record_group(store: &Store, batches: &[FinishBatch]) -> Vec<Option<bool>> {
    match must_write("recording batch outcomes", || store.finish_batches(batches)).await {
        Ok(written) => (0..batches.len())
            .map(|i| Some(written.get(i).copied().unwrap_or(false)))
            .collect(),
        Err(e) if e.is_refused_write() && batches.len() > 1 => {
            warn!(error = %e, batches = batches.len(), "the database refused a group of outcomes; writing its batches one by one");
            let mut written = Vec::with_capacity(batches.len());
            for f in batches {
                let alone =
                    match must_write("recording a batch outcome", || store.finish_batch(f)).await {
                        Ok(w) => Some(w),
                        Err(e) if e.is_refused_write() => record_without_texts(store, f, &e).await,
                        Err(_) => None,
                    };
                written.push(alone);
            }
            written
        }
        // A group of one is that batch alone: the same write would be refused again.
        Err(e) if e.is_refused_write() => vec![record_without_texts(store, &batches[0], &e).await],
        Err(_) => vec![None; batches.len()],
    }
}

/// Writes a batch's end that the database refused once more without any text from the API
/// (codes reduced to plain identifiers, no messages), so that its rows still end instead of
/// being re-sent for ever.
async fn record_without_texts(
    store: &Store,
    f: &FinishBatch,
    refused: &StoreError,
) -> Option<bool> {
    error!(batch_id = %f.batch_id, error = %refused, "the database refused this batch's outcome; writing it without the API's texts");
    let plain = f.without_texts();
    must_write("recording a batch outcome without texts", || {
        store.finish_batch(&plain)
    })
    .await
    .ok()
}

/// A database write that must happen: retried with backoff while the failure is passing (the
/// database may be restarting or busy), but not forever: an unrecorded batch keeps its stored
/// key and is re-sent once its lease lapses. A write the database refuses for what it holds is
/// not retried: the same bytes would be refused again.
pub(super) async fn must_write<T, F, Fut>(what: &str, write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter();
    write
        .retry(policy)
        .when(|e: &StoreError| !e.is_refused_write())
        .notify(|e: &StoreError, after| warn!(error = %e, retry_in = ?after, "{what}: database write failed"))
        .await
        .inspect_err(|e| {
            if !e.is_refused_write() {
                error!(error = %e, "{what}: giving up; the batch stays stored and will be re-sent under its key");
            }
        })
}
