-- Half the database cost per synced change (issue 16): the hot path stops rewriting outbox rows.
--
-- Before, a claim rewrote every claimed row (state, batch) and its outcome rewrote it again, each
-- a non-HOT update (a whole new tuple and an entry in every index): about 1,500 bytes of WAL
-- per synced change. From this migration on, prism_outbox is written by the application's
-- INSERT only (and by an operator's rebasing replay, which changes a patch):
--
-- * A claim inserts one narrow row per claimed row into prism_outbox_claims (its batch) and
--   locks the outbox row as before (FOR UPDATE SKIP LOCKED).
-- * A batch whose rows succeed is recorded once, by its own state ('done'): such rows keep
--   state NULL on their claim row, which reads "my batch's outcome". Only rows whose outcome is
--   not their batch's (an item error, a release, dead at the claim, a replay, a discard) are
--   written per row, on the claim row.
-- * A new row's prism_outbox.state stays 'pending' for good; its state is derived. Read it in
--   prism_outbox_rows (redefined below), as the README says; rows finished before this
--   migration keep their stored state, which the view falls back to.
-- * Each lane (team_id, object_type) keeps a floor (prism_lane_floors): claims walk the lane
--   from it, so the rows claimed before it are not walked again. ARCHITECTURE.md, "The lane
--   floor", has the invariant and why a row that commits late below the floor is still found
--   (late_txid, and the (team_id, object_type, txid) index built in 0016).
--
-- Every replica must be stopped before this migration runs: a replica of an earlier version
-- claims by prism_outbox.state and would send again rows a new one has claimed.
--
-- The tables are new, so creating them holds nothing back; the copy below reads the outbox's
-- in-flight and retrying rows through prism_outbox_record (bounded by the backlog, not the
-- history) and takes no lock that holds back the application's inserts.

-- The trigger below and the new column take their tables' locks for an instant; while one
-- waits for an application transaction that holds the outbox, the application's next inserts
-- queue behind it. So it waits at most 2 s; the migrator tries again a moment later.
SET LOCAL lock_timeout = '2s';

CREATE TABLE prism_outbox_claims (
    -- The outbox row's id. No foreign key: its check costs about 10 µs of server CPU per
    -- claimed row. Purge deletes a row's claim row with it; a row an application deletes
    -- itself leaves its claim row, which the readers of claim rows join to the outbox.
    id                 bigint      PRIMARY KEY,
    team_id            text        NOT NULL,      -- the outbox row's lane, as stored
    object_type        text        NOT NULL,
    record_id          uuid        NOT NULL,      -- the outbox row's record
    batch_id           uuid,
    -- NULL: the outcome of its batch (in flight while the batch is open, succeeded once it is
    -- done: a success is only ever its batch's); otherwise the row's own: waiting again
    -- (replayed, or parked behind an older change of its record), retrying, dead.
    state              text        CHECK (state IN ('pending', 'retrying', 'dead')),
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    first_attempt_at   timestamptz,
    last_error_code    text,
    last_error_message text,
    completed_at       timestamptz
);

-- The rows waiting again (replayed or retrying), per lane in id order: a claim's third source.
CREATE INDEX prism_outbox_claims_waiting ON prism_outbox_claims (team_id, object_type, id)
    WHERE state IN ('pending', 'retrying');
-- A batch's rows: its end when nothing answered (dead at once), a lease's oldest row, purge.
CREATE INDEX prism_outbox_claims_batch ON prism_outbox_claims (batch_id);
-- Dead rows: the gauges' count by code, `rows --state dead`, and purge and replay asking
-- whether a record has an older dead change (without reading the record's history).
CREATE INDEX prism_outbox_claims_dead ON prism_outbox_claims (record_id, id) WHERE state = 'dead';

CREATE TABLE prism_lane_floors (
    team_id     text   NOT NULL,
    object_type text   NOT NULL,
    -- Every committed row of the lane with id < floor_id has a claim row, or its txid is at or
    -- past late_txid (it committed after the floor was set, or is still to commit).
    floor_id    bigint NOT NULL,
    late_txid   xid8   NOT NULL,
    PRIMARY KEY (team_id, object_type)
);

-- Rows in flight or retrying carry their progress over into claim rows. Waiting ('pending')
-- rows have none: the claims find them in the lanes, from floor 0.
SET LOCAL enable_seqscan = off;
INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, batch_id, state, attempts,
                                 next_attempt_at, first_attempt_at, last_error_code,
                                 last_error_message)
SELECT id, team_id, object_type, record_id, batch_id, NULLIF(state, 'in_flight'), attempts, next_attempt_at,
       COALESCE(first_attempt_at, now()), last_error_code, last_error_message
FROM prism_outbox WHERE state IN ('in_flight', 'retrying');

-- Their stored state goes back to 'pending' (what every row inserted from now on keeps): the
-- claims' statements read a row's progress from its claim row, and a stored 'in_flight' would
-- keep a row that waits again out of its record's followers. Bounded by the backlog.
UPDATE prism_outbox SET state = 'pending' WHERE state IN ('in_flight', 'retrying');

-- Each batch's lowest row id, stored with it: the open batches' lowest is part of the bound
-- below which every row has finished (prism_unfinished_bound, below). NULL for batches stored
-- before this migration (their claim rows are read instead).
ALTER TABLE prism_batches ADD COLUMN first_row_id bigint;

-- A replica of an earlier version claims by prism_outbox.state, which prism-sync no longer
-- writes: it would send again rows a current replica has claimed. Its claim puts rows
-- 'in_flight' in prism_outbox; that now fails, loudly, instead.
CREATE FUNCTION prism_outbox_refuse_old_claims() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'prism-sync: this outbox keeps claims in prism_outbox_claims since migration 0015; stop replicas of earlier versions (they would send rows twice) and run the current version';
END $$;
CREATE TRIGGER prism_outbox_refuse_old_claims BEFORE UPDATE ON prism_outbox
    FOR EACH ROW WHEN (NEW.state = 'in_flight') EXECUTE FUNCTION prism_outbox_refuse_old_claims();

-- The lowest row id that may be unfinished: below it every row has succeeded or is dead. The
-- per-record order guard reads a record's older rows only from here on, so that a record's
-- history does not lengthen it. The least of: every lane's floor (a lane's rows from its floor
-- on may never have been claimed), every lane's late rows (below the floor, never claimed),
-- the rows waiting again, and the open batches' rows. Lanes are found by a skip scan of the
-- lane index and in the floors; each lane's part is a probe or two of an index, so the bound
-- costs the same however many rows have finished or wait. plpgsql, so that a session plans
-- the query once (a LANGUAGE sql function's body is planned again at every call). STABLE: one value per statement that calls it as (SELECT prism_unfinished_bound()).
CREATE FUNCTION prism_unfinished_bound() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE lanes(team_id, object_type) AS (
        (SELECT team_id, object_type FROM prism_outbox
         WHERE state IN ('pending', 'retrying') ORDER BY team_id, object_type LIMIT 1)
        UNION ALL
        SELECT n.team_id, n.object_type FROM lanes CROSS JOIN LATERAL (
            SELECT o.team_id, o.object_type FROM prism_outbox o
            WHERE o.state IN ('pending', 'retrying')
              AND (o.team_id, o.object_type) > (lanes.team_id, lanes.object_type)
            ORDER BY o.team_id, o.object_type LIMIT 1) n),
    fl AS (
        SELECT l.team_id, l.object_type, COALESCE(f.floor_id, 0) AS floor_id,
               COALESCE(f.late_txid, '0'::xid8) AS late_txid
        FROM (SELECT team_id, object_type FROM lanes
              UNION SELECT team_id, object_type FROM prism_lane_floors) l
        LEFT JOIN prism_lane_floors f
             ON f.team_id = l.team_id AND f.object_type = l.object_type)
    SELECT least(
        (SELECT min(floor_id) FROM fl),
        -- o.id + 0: through the txid index (a short range), not a walk of the lane's ids
        -- below its floor (its history), which min(o.id) would otherwise be planned as.
        (SELECT min((SELECT min(o.id + 0) FROM prism_outbox o
                     WHERE o.team_id = fl.team_id AND o.object_type = fl.object_type
                       AND o.txid >= fl.late_txid AND o.id + 0 < fl.floor_id
                       AND o.state IN ('pending', 'retrying')
                       AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)))
         FROM fl),
        (SELECT min((SELECT c.id FROM prism_outbox_claims c
                     WHERE c.team_id = fl.team_id AND c.object_type = fl.object_type
                       AND c.state IN ('pending', 'retrying')
                     ORDER BY c.id LIMIT 1))
         FROM fl),
        (SELECT min(COALESCE(b.first_row_id,
                             (SELECT min(c.id) FROM prism_outbox_claims c WHERE c.batch_id = b.id)))
         FROM prism_batches b WHERE b.state = 'open'),
        (SELECT COALESCE(max(id), 0) + 1 FROM prism_outbox)));
END $$;

-- The same columns as 0014's view, derived: from the claim row when there is one (and its
-- batch while it follows it), else as stored. A row its batch's success finished counts that
-- try in attempts, as the per-row write used to.
CREATE OR REPLACE VIEW prism_outbox_rows AS
SELECT o.id, o.record_id, o.patch, o.object_type, o.operation, o.team_id, o.enqueued_at,
       CASE WHEN c.id IS NULL THEN o.state
            WHEN c.state IS NOT NULL THEN c.state
            WHEN b.state = 'done' THEN 'succeeded'
            ELSE 'in_flight' END AS state,
       CASE WHEN c.id IS NULL THEN o.attempts
            WHEN c.state IS NULL AND b.state = 'done' THEN c.attempts + 1
            ELSE c.attempts END AS attempts,
       CASE WHEN c.id IS NULL THEN o.next_attempt_at ELSE c.next_attempt_at END AS next_attempt_at,
       CASE WHEN c.id IS NULL THEN o.first_attempt_at ELSE c.first_attempt_at END AS first_attempt_at,
       CASE WHEN c.id IS NULL THEN o.batch_id ELSE c.batch_id END AS batch_id,
       CASE WHEN c.id IS NULL THEN o.last_error_code ELSE c.last_error_code END AS last_error_code,
       CASE WHEN c.id IS NULL THEN o.last_error_message ELSE c.last_error_message END
           AS last_error_message,
       CASE WHEN c.id IS NULL THEN o.completed_at
            WHEN c.state IS NULL AND b.state = 'done' THEN b.completed_at
            ELSE c.completed_at END AS completed_at
FROM prism_outbox o
LEFT JOIN prism_outbox_claims c ON c.id = o.id
LEFT JOIN prism_batches b ON b.id = c.batch_id AND c.state IS NULL;
