-- v8: trigger-fed queue. prism_outbox is written only by the application's INSERT and never
-- locked or updated after it; a statement-level AFTER INSERT trigger copies each new row's claim
-- keys into prism_outbox_queue, a narrow table holding exactly the unfinished rows (waiting,
-- retrying, in flight). A claim walks the queue's lane index (batch_id IS NULL: waiting rows only,
-- so no lane floor), locks its queue rows FOR UPDATE SKIP LOCKED and sets their batch_id (a non-HOT
-- update of a narrow row), and writes a claim row per claimed row into prism_outbox_claims (the
-- row's batch, once it has left the queue). A batch whose rows all succeeded is recorded once, by
-- its state, and its rows are deleted from the queue. The per-record order guard: no row of the
-- record with a smaller id still in the queue (in flight ones included).
-- Not measured: failures (a retrying row would go back to batch_id NULL with a later
-- next_attempt_at; a dead row would leave the queue with a claim row of state 'dead').
-- IF EXISTS and _batched: 0012-0013 replaced prism_outbox_batch with prism_outbox_batched.
DROP INDEX IF EXISTS prism_outbox_lane, prism_outbox_record, prism_outbox_batch, prism_outbox_batched,
           prism_outbox_completed, prism_outbox_dead_record;
CREATE INDEX IF NOT EXISTS prism_outbox_record_all ON prism_outbox (record_id, id);

CREATE TABLE prism_outbox_queue (
    id              bigint      PRIMARY KEY,
    team_id         text        NOT NULL,
    object_type     text        NOT NULL,
    record_id       uuid        NOT NULL,
    txid            xid8        NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    batch_id        uuid                    -- NULL: waiting (or retrying); set: in flight
);
CREATE INDEX prism_outbox_queue_lane ON prism_outbox_queue (team_id, object_type, id)
    WHERE batch_id IS NULL;
CREATE INDEX prism_outbox_queue_record ON prism_outbox_queue (record_id, id);

-- One statement, one trigger call: the new rows come as a transition table. Created before the
-- fill, so the fill's WAL (the application's insert) includes the queue rows.
CREATE FUNCTION prism_outbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO prism_outbox_queue (id, team_id, object_type, record_id, txid, next_attempt_at)
    SELECT id, team_id, object_type, record_id, txid, next_attempt_at FROM new_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER prism_outbox_enqueue AFTER INSERT ON prism_outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION prism_outbox_enqueue();

-- The state to read: queued rows wait or are in flight; a row gone from the queue is finished, by
-- its claim row's own state if it has one, else by its batch's (v8n keeps no claim rows: there a
-- row out of the queue reads as succeeded, as every row does in this bench; a dead row would need
-- a per-row record).
CREATE VIEW prism_outbox_state AS
    SELECT o.id,
           CASE WHEN q.id IS NOT NULL THEN CASE WHEN q.batch_id IS NULL THEN 'pending' ELSE 'in_flight' END
                WHEN c.state IS NOT NULL THEN c.state
                WHEN c.id IS NOT NULL THEN CASE WHEN b.state = 'done' THEN 'succeeded' ELSE 'in_flight' END
                ELSE 'succeeded' END AS state
    FROM prism_outbox o
    LEFT JOIN prism_outbox_queue q ON q.id = o.id
    LEFT JOIN prism_outbox_claims c ON c.id = o.id
    LEFT JOIN prism_batches b ON b.id = c.batch_id;
INSERT INTO wal_config (floor_walk, success_per_batch, claims_table, lane_lock, queue, queue_history)
VALUES (false, true, false, false, true, true);
