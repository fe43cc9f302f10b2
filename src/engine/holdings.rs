//! The one record of the batches this process holds: a [`Held`] is a batch's in-process life,
//! from the claimer leasing it until it is settled (deferred, released, split, or its outcome
//! written). The claimer creates it, the team's buffer and a worker carry it, the recorder lets
//! go of an answered one once its write lands, and dropping it (also when a worker is aborted
//! mid-send) takes the batch out of the set.
//!
//! **Invariant:** everything the engine counts about held batches (a team's free buffer room,
//! whether a refused team may probe, the leases the heartbeat extends, what a drain waits for)
//! is read from [`Holdings`], which only `Held` changes; so the counts cannot drift apart.
//! Buffer room a claim round has set aside for the batches it is claiming is counted there too,
//! as a [`Reserved`] (taken by the round before it claims, let go once its batches are
//! buffered), so that claim rounds running at once never fill a buffer past its size. A buffer
//! has a size in batches and one in bytes (its batches' request bodies), and both are counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::store::LeasedBatch;

/// Where a held batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Leased and waiting in its team's buffer for a worker.
    Buffered,
    /// Taken by a worker: being sent, or settled by it.
    Working,
    /// Answered; its outcome write is queued for the recorder.
    Recording,
}

const STAGES: usize = 3;

impl Stage {
    fn index(self) -> usize {
        match self {
            Stage::Buffered => 0,
            Stage::Working => 1,
            Stage::Recording => 2,
        }
    }
}

/// Room in a team's buffer, or a buffer's size: ready batches, and the bytes of their request
/// bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Room {
    pub(super) places: usize,
    pub(super) bytes: usize,
}

/// The batches this process holds, per team and stage.
pub(super) struct Holdings {
    state: Mutex<State>,
    /// Answered batches whose outcome write is still queued: a worker hands the write to the
    /// recorder and goes on to its next batch, but no more than this many wait at once.
    recording: Arc<Semaphore>,
    /// The claimer's wake-up: a batch moving on or let go may open room in a buffer.
    wake: Arc<Notify>,
}

struct State {
    /// One entry per `Held` (by ticket, not batch id: a batch whose lease lapsed while we held
    /// it may be leased again by us before the first `Held` is gone).
    entries: HashMap<u64, Entry>,
    /// Per team, how many entries are at each stage.
    counts: Vec<[usize; STAGES]>,
    /// Per team, the request bytes of its buffered batches.
    buffered_bytes: Vec<usize>,
    /// Per team, buffer room claim rounds in progress have set aside ([`Reserved`]).
    reserved: Vec<Room>,
    next_ticket: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    batch_id: Uuid,
    team: usize,
    stage: Stage,
    /// Its request body's length.
    bytes: usize,
}

impl State {
    fn move_to(&mut self, ticket: u64, stage: Stage) {
        if let Some(entry) = self.entries.get_mut(&ticket) {
            self.counts[entry.team][entry.stage.index()] -= 1;
            self.counts[entry.team][stage.index()] += 1;
            if entry.stage == Stage::Buffered {
                self.buffered_bytes[entry.team] -= entry.bytes;
            }
            if stage == Stage::Buffered {
                self.buffered_bytes[entry.team] += entry.bytes;
            }
            entry.stage = stage;
        }
    }

    /// The free room in team `team`'s buffer of `capacity`.
    fn room(&self, team: usize, capacity: Room) -> Room {
        let reserved = self.reserved[team];
        Room {
            places: capacity
                .places
                .saturating_sub(self.counts[team][Stage::Buffered.index()])
                .saturating_sub(reserved.places),
            bytes: capacity
                .bytes
                .saturating_sub(self.buffered_bytes[team])
                .saturating_sub(reserved.bytes),
        }
    }
}

impl Holdings {
    pub(super) fn new(teams: usize, recording_slots: usize, wake: Arc<Notify>) -> Arc<Holdings> {
        Arc::new(Holdings {
            state: Mutex::new(State {
                entries: HashMap::new(),
                counts: vec![[0; STAGES]; teams],
                buffered_bytes: vec![0; teams],
                reserved: vec![Room::default(); teams],
                next_ticket: 0,
            }),
            recording: Arc::new(Semaphore::new(recording_slots.max(1))),
            wake,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding this lock (plain map and counter updates).
        self.state.lock().expect("holdings lock")
    }

    /// Holds a batch just leased for team `team` (its index), waiting in the team's buffer.
    pub(super) fn buffer(self: &Arc<Self>, batch: LeasedBatch, team: usize) -> Held {
        self.hold(batch, team, Stage::Buffered)
    }

    /// Holds a batch this worker goes on to send at once (a split batch's half).
    pub(super) fn work_on(self: &Arc<Self>, batch: LeasedBatch, team: usize) -> Held {
        self.hold(batch, team, Stage::Working)
    }

    fn hold(self: &Arc<Self>, batch: LeasedBatch, team: usize, stage: Stage) -> Held {
        let ticket = {
            let mut state = self.state();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let entry = Entry {
                batch_id: batch.id,
                team,
                stage,
                bytes: batch.body.len(),
            };
            state.entries.insert(ticket, entry);
            state.counts[team][stage.index()] += 1;
            if stage == Stage::Buffered {
                state.buffered_bytes[team] += entry.bytes;
            }
            ticket
        };
        Held {
            batch,
            ticket,
            holdings: Arc::clone(self),
            _recording: None,
        }
        .touched()
    }

    /// Batches of team `team` waiting in its buffer.
    #[cfg(test)]
    pub(super) fn buffered(&self, team: usize) -> usize {
        self.state().counts[team][Stage::Buffered.index()]
    }

    /// Free room in team `team`'s buffer of `capacity`: neither taken by a buffered batch nor
    /// set aside by a claim round in progress.
    pub(super) fn room(&self, team: usize, capacity: Room) -> Room {
        self.state().room(team, capacity)
    }

    /// Sets aside room in the teams' buffers for one claim round: `share(team, room)` says how
    /// much of team `team`'s free room (`room`, of `capacity(team)`) the round takes; the
    /// reading of the room and the setting aside are one step, so two rounds never take the same
    /// place or byte. The room stays taken until the [`Reserved`] is dropped (after the round's
    /// batches are buffered, which count in their own right).
    pub(super) fn reserve(
        self: &Arc<Self>,
        capacity: impl Fn(usize) -> Room,
        mut share: impl FnMut(usize, Room) -> Room,
    ) -> Reserved {
        let mut state = self.state();
        let teams = state.reserved.len();
        let mut taken = vec![Room::default(); teams];
        for (team, slot) in taken.iter_mut().enumerate() {
            let room = state.room(team, capacity(team));
            let wanted = share(team, room);
            *slot = Room {
                places: wanted.places.min(room.places),
                bytes: wanted.bytes.min(room.bytes),
            };
            state.reserved[team].places += slot.places;
            state.reserved[team].bytes += slot.bytes;
        }
        Reserved {
            taken,
            holdings: Arc::clone(self),
        }
    }

    /// Batches of team `team` not yet answered: buffered or with a worker.
    pub(super) fn unanswered(&self, team: usize) -> usize {
        let counts = self.state().counts[team];
        counts[Stage::Buffered.index()] + counts[Stage::Working.index()]
    }

    /// Every batch held, whatever its stage: the leases the heartbeat keeps alive.
    pub(super) fn batch_ids(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self.state().entries.values().map(|e| e.batch_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub(super) fn len(&self) -> usize {
        self.state().entries.len()
    }
}

/// Buffer room one claim round set aside, per team (see [`Holdings::reserve`]); dropping it
/// gives it back.
pub(super) struct Reserved {
    taken: Vec<Room>,
    holdings: Arc<Holdings>,
}

impl Reserved {
    /// The places set aside in team `team`'s buffer.
    pub(super) fn places(&self, team: usize) -> usize {
        self.taken.get(team).map_or(0, |r| r.places)
    }

    /// The bytes set aside in team `team`'s buffer.
    pub(super) fn bytes(&self, team: usize) -> usize {
        self.taken.get(team).map_or(0, |r| r.bytes)
    }

    /// Whether no place was set aside at all.
    pub(super) fn is_empty(&self) -> bool {
        self.taken.iter().all(|r| r.places == 0)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // No wake-up: the claimer itself drops a round's reservation, and looks again then.
        if let Ok(mut state) = self.holdings.state.lock() {
            for (team, room) in self.taken.iter().enumerate() {
                state.reserved[team].places -= room.places;
                state.reserved[team].bytes -= room.bytes;
            }
        }
    }
}

/// One batch this process holds. Dropping it lets go of the batch (and of its place among the
/// queued outcome writes) and wakes the claimer.
pub(super) struct Held {
    batch: LeasedBatch,
    ticket: u64,
    holdings: Arc<Holdings>,
    _recording: Option<OwnedSemaphorePermit>,
}

impl Held {
    pub(super) fn batch(&self) -> &LeasedBatch {
        &self.batch
    }

    /// A worker took the batch from its team's buffer: a place in the buffer is free.
    pub(super) fn take_up(self) -> Held {
        self.holdings.state().move_to(self.ticket, Stage::Working);
        self.touched()
    }

    /// The batch was answered and its outcome write goes to the recorder: waits for one of the
    /// bounded places among the queued writes, then counts the batch as recording.
    pub(super) async fn into_recording(mut self) -> Held {
        let permit = Arc::clone(&self.holdings.recording)
            .acquire_owned()
            .await
            .expect("the recording semaphore is never closed");
        self._recording = Some(permit);
        self.holdings.state().move_to(self.ticket, Stage::Recording);
        self.touched()
    }

    fn touched(self) -> Held {
        self.holdings.wake.notify_one();
        self
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Runs during unwinding too: a poisoned lock is left alone rather than panicking again.
        if let Ok(mut state) = self.holdings.state.lock()
            && let Some(entry) = state.entries.remove(&self.ticket)
        {
            state.counts[entry.team][entry.stage.index()] -= 1;
            if entry.stage == Stage::Buffered {
                state.buffered_bytes[entry.team] -= entry.bytes;
            }
        }
        self.holdings.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::NewBatch;
    use crate::model::{ObjectType, Operation};

    fn leased() -> LeasedBatch {
        LeasedBatch::fresh(NewBatch {
            id: Uuid::now_v7(),
            idempotency_key: Uuid::now_v7().to_string(),
            team: String::new(),
            object_type: ObjectType::Contact,
            operation: Operation::Update,
            body: b"{\"items\":[]}".to_vec(),
            items: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_held_batch_is_counted_at_its_stage_until_it_is_dropped() {
        let holdings = Holdings::new(2, 1, Arc::new(Notify::new()));
        let held = holdings.buffer(leased(), 1);
        assert_eq!((holdings.buffered(1), holdings.unanswered(1)), (1, 1));
        assert_eq!(holdings.buffered(0), 0);
        let held = held.take_up();
        assert_eq!((holdings.buffered(1), holdings.unanswered(1)), (0, 1));
        let held = held.into_recording().await;
        assert_eq!(holdings.unanswered(1), 0);
        assert_eq!(holdings.batch_ids(), vec![held.batch().id]);
        drop(held);
        assert_eq!((holdings.len(), holdings.batch_ids().len()), (0, 0));
    }

    /// A buffer of 8 places and 1,000 bytes.
    const EIGHT: Room = Room {
        places: 8,
        bytes: 1000,
    };

    fn places(room: Room) -> usize {
        room.places
    }

    #[tokio::test]
    async fn reserved_places_are_not_free_until_let_go_and_never_exceed_the_room() {
        let holdings = Holdings::new(2, 1, Arc::new(Notify::new()));
        let _held = holdings.buffer(leased(), 0);
        assert_eq!(places(holdings.room(0, EIGHT)), 7);
        let first = holdings.reserve(
            |_| EIGHT,
            |_, room| Room {
                places: room.places.div_ceil(2),
                ..room
            },
        );
        assert_eq!((first.places(0), first.places(1)), (4, 4));
        let room = |team| places(holdings.room(team, EIGHT));
        assert_eq!((room(0), room(1)), (3, 4));
        let second = holdings.reserve(
            |_| EIGHT,
            |_, room| Room {
                places: room.places + 5,
                ..room
            },
        );
        assert_eq!((second.places(0), second.places(1)), (3, 4));
        assert_eq!(room(0), 0);
        let none = holdings.reserve(|_| EIGHT, |_, room| room);
        assert!(none.is_empty());
        drop(first);
        assert_eq!((room(0), room(1)), (4, 4));
        drop(second);
        assert_eq!((room(0), room(1)), (7, 8));
    }

    #[tokio::test]
    async fn a_buffers_bytes_count_its_buffered_batches_and_reserved_bytes_until_let_go() {
        let holdings = Holdings::new(1, 1, Arc::new(Notify::new()));
        let mut big = leased();
        big.body = bytes::Bytes::from(vec![b' '; 600]);
        let held = holdings.buffer(big.clone(), 0);
        let bytes = |h: &Holdings| h.room(0, EIGHT).bytes;
        assert_eq!(bytes(&holdings), 400);
        let reserved = holdings.reserve(
            |_| EIGHT,
            |_, room| Room {
                places: 1,
                bytes: room.bytes + 1,
            },
        );
        assert_eq!(reserved.bytes(0), 400, "never more than the free bytes");
        assert_eq!(bytes(&holdings), 0);
        drop(reserved);
        assert_eq!(bytes(&holdings), 400);
        // A worker took it: it is no longer in the buffer, whatever it holds.
        let held = held.take_up();
        assert_eq!(bytes(&holdings), 1000);
        drop(held);
        let twice = holdings.buffer(big.clone(), 0);
        let again = holdings.buffer(big, 0);
        assert_eq!(
            bytes(&holdings),
            0,
            "1,200 bytes buffered: no room, never below zero"
        );
        drop(twice);
        drop(again);
        assert_eq!(bytes(&holdings), 1000);
    }

    #[tokio::test]
    async fn a_batch_held_twice_stays_held_until_both_are_let_go() {
        let holdings = Holdings::new(1, 2, Arc::new(Notify::new()));
        let batch = leased();
        let first = holdings.buffer(batch.clone(), 0);
        let second = holdings.work_on(batch.clone(), 0);
        assert_eq!(holdings.batch_ids(), vec![batch.id]);
        drop(first);
        assert_eq!(holdings.batch_ids(), vec![batch.id]);
        assert_eq!(holdings.unanswered(0), 1);
        drop(second);
        assert!(holdings.batch_ids().is_empty());
    }

    #[tokio::test]
    async fn queued_outcome_writes_are_bounded_and_a_dropped_one_frees_its_place() {
        let holdings = Holdings::new(1, 1, Arc::new(Notify::new()));
        let first = holdings.work_on(leased(), 0).into_recording().await;
        let second = holdings.work_on(leased(), 0).into_recording();
        tokio::pin!(second);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut second).await;
        assert!(
            waited.is_err(),
            "a second write waits while the only place is taken"
        );
        drop(first);
        let second = second.await;
        assert_eq!(holdings.len(), 1);
        drop(second);
        assert_eq!(holdings.len(), 0);
    }
}
