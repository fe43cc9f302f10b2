//! prism-sync drains a transactional outbox of contact changes into the Micro Prism
//! bulk-update API: batches of up to 100, each stored with its idempotency key and exact bytes
//! before it is sent, every item's outcome recorded, per-record order kept.
//!
//! Module map, in pipeline order (see ARCHITECTURE.md):
//! - [`settings`]: layered configuration.
//! - [`store`]: the outbox on SQLite or Postgres: claim → store batch → lease → record outcomes.
//! - [`batch`]: validation, coalescing and the request bytes (pure).
//! - [`linger`]: whether a claim lane's partial tail may wait to fill its batch (pure).
//! - [`client`]: one HTTP send of a stored batch.
//! - [`classify`]: what an answer means for the batch and each item (pure).
//! - [`backoff`]: retry times as a function of the attempt count (pure).
//! - [`engine`]: the daemon loop tying these together.
//! - [`fleet`]: the replicas as one fleet: registry, shared request ceiling and pause, `top`.
//! - [`sim`]: the Micro API simulator used by tests, the demo and benchmarks.

/// Kills the process on the spot when the named failpoint is armed (fault-suite builds only, with
/// `--features failpoints` and `FAILPOINTS=name=return`): the closest thing to `kill -9` at an
/// exact phase boundary. Points: `after_claim`, `before_send`, `after_response`,
/// `before_outcomes`, `mid_outcomes` (outcome rows written, transaction not committed),
/// `after_outcomes`.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                eprintln!(concat!("failpoint ", $name, ": aborting"));
                std::process::abort();
            }
        }
    };
}

pub mod backoff;
pub mod batch;
pub mod classify;
pub mod cli;
pub mod client;
pub mod concurrency;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod fleet;
pub mod health;
pub mod linger;
pub mod model;
pub mod ops;
pub mod pauses;
pub mod responses;
pub mod settings;
pub mod sim;
pub mod store;
pub mod telemetry;
