//! The fault suite (issue #6, "Survive everything"): real `prism-sync run` processes, real SQLite
//! files and real Postgres databases, the simulator over real HTTP; faults are injected while
//! work goes on, then healed, then the checker (`checker.rs`) reads both sides and lists every
//! broken promise.
//!
//! - `crash`: kill -9 at every phase boundary (failpoints build) and while an applied request's
//!   answer is on the wire; the restarted daemon finishes everything.
//! - `database`: a private Postgres cluster stopped (`-m immediate`) and started under the
//!   daemon; a SQLite file write-locked by another process.
//! - `api`: a seeded schedule of API faults (429 storms, 5xx, timeouts, slow and dropped answers,
//!   damaged 200s, a revoked key) with a poison item throughout, and each phase's promised
//!   effect checked on the simulator's request log (`effects.rs`).
//! - `replicas`: two and three daemons on one Postgres database, two on one SQLite file, one of
//!   them killed mid-run.
//! - `key_lifetime`: short simulator TTL and `batch.max_key_age`: unanswered batches are released
//!   to new keys before the API forgets them.
//! - `hostile_rows`: malformed outbox rows against the real process, with its memory measured.
//! - `liveness`: hostile answers (NUL and bytes that are not UTF-8 in messages and codes,
//!   answers too large to read, damaged 200s, a 429 storm without `retry-after`, codes retried
//!   for ever), a batch of a team removed between runs and a key refused with nothing stored;
//!   every row must end within a stated bound.
//! - `fuzz`: the response parser and outcome classifier at scale.
//!
//! One seed drives every scenario (`PRISM_SYNC_FAULT_SEED`, printed); `PRISM_SYNC_SOAK=1` runs a
//! longer soak. The report goes to `target/fault-suite-report.json` (see `harness::report_path`),
//! with the number of scenarios expected from `harness::SCENARIOS` beside those that ran.
//! The crash scenarios need the failpoints build: see `harness::failpoints_bin`.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod checker;
mod crash;
mod database;
mod effects;
mod fuzz;
mod harness;
mod hostile_rows;
mod key_lifetime;
mod liveness;
mod replicas;
