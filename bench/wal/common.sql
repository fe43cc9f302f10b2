-- Shared by every variant: the per-statement WAL tally of a drain.
-- wal_steps is UNLOGGED: its own writes add nothing to the WAL it counts.
CREATE UNLOGGED TABLE wal_steps (step text PRIMARY KEY, bytes numeric NOT NULL DEFAULT 0,
                                 ms numeric NOT NULL DEFAULT 0);

-- Adds the WAL inserted since `since` to step `what`, and returns the position now.
CREATE FUNCTION wal_tally(what text, since pg_lsn) RETURNS pg_lsn LANGUAGE plpgsql AS $$
DECLARE now_at pg_lsn := pg_current_wal_insert_lsn();
        now_t timestamptz := clock_timestamp();
        -- The time since the previous tally (wall clock of this backend: the step's statements).
        took numeric := COALESCE(extract(epoch FROM now_t - NULLIF(current_setting('wal.t', true), '')::timestamptz)
                                 * 1000, 0);
BEGIN
    INSERT INTO wal_steps VALUES (what, now_at - since, took)
    ON CONFLICT ON CONSTRAINT wal_steps_pkey DO UPDATE SET bytes = wal_steps.bytes + EXCLUDED.bytes,
                                                           ms = wal_steps.ms + EXCLUDED.ms;
    PERFORM set_config('wal.t', clock_timestamp()::text, false);
    RETURN pg_current_wal_insert_lsn();
END $$;

-- One notice per step, in bytes per row.
CREATE PROCEDURE wal_report(nrows bigint) LANGUAGE plpgsql AS $$
DECLARE s record;
BEGIN
    FOR s IN SELECT * FROM wal_steps ORDER BY bytes DESC LOOP
        RAISE NOTICE '%', rpad(s.step, 34) || rpad(round(s.bytes / nrows)::text, 8)
                          || round(s.ms * 1000 / nrows) || ' µs';
    END LOOP;
END $$;

-- The batch body and item map of a claim's rows, as prism-sync builds them (batch.rs).
CREATE FUNCTION wal_body(records uuid[], patches jsonb[]) RETURNS bytea LANGUAGE sql AS $$
    SELECT convert_to('{"items":[' || string_agg(format('{"id":"%s","patch":%s}', r, p::text), ',') || ']}', 'UTF8')
    FROM unnest(records, patches) AS u(r, p)
$$;
CREATE FUNCTION wal_items(records uuid[], ids bigint[]) RETURNS text LANGUAGE sql AS $$
    SELECT '[' || string_agg(format('{"r":"%s","rows":[%s],"a":0}', r, i), ',') || ']'
    FROM unnest(records, ids) AS u(r, i)
$$;

-- What a variant changes in the drain: its file sets these.
--   floor_walk:        claims walk the lane from prism_lane_floor (the lane index is not partial).
--   success_per_batch: a batch whose rows all succeeded is written once (its state), not per row.
--   claims_table:      a claim inserts a narrow row per claimed row into prism_outbox_claims
--                      instead of updating prism_outbox (whose rows then never change).
--   lane_lock:         no row locks: a claim locks its lane's floor row (SKIP LOCKED: another
--                      claimer skips the lane) and the claimed rows are told by their claim rows.
--   queue:             a trigger on prism_outbox copies every new row into prism_outbox_queue (the
--                      variant's file makes both), which holds exactly the unfinished rows: a claim
--                      walks the queue (lane index WHERE batch_id IS NULL, no floor), locks and sets
--                      batch_id on its queue rows, and a success deletes them; prism_outbox is
--                      written only by the application's INSERT and locked by nothing.
--   queue_history:     with queue, a claim also inserts a claim row per claimed row into
--                      prism_outbox_claims (id, batch_id, first_attempt_at), so that a row's batch is
--                      known after it leaves the queue; without it, only the batch's item map says so.
-- The narrow per-row table of the claims_table variants (empty in the others). A row appears when
-- its outbox row is first claimed. state NULL: the row follows its batch (in flight while the batch
-- is open, succeeded once it is done); 'retrying', 'succeeded' or 'dead' are written per row, for
-- rows whose outcome is not their batch's.
CREATE TABLE prism_outbox_claims (
    id                 bigint PRIMARY KEY,
    batch_id           uuid,            -- NULL only for a row that went dead at its claim
    state              text CHECK (state IN ('retrying', 'succeeded', 'dead')),
    attempts           integer NOT NULL DEFAULT 0,
    first_attempt_at   timestamptz NOT NULL DEFAULT now(),
    next_attempt_at    timestamptz,
    last_error_code    text,
    last_error_message text,
    completed_at       timestamptz
);
CREATE INDEX prism_outbox_claims_retrying ON prism_outbox_claims (next_attempt_at)
    WHERE state = 'retrying';

CREATE UNLOGGED TABLE wal_config (floor_walk bool NOT NULL, success_per_batch bool NOT NULL,
                                  claims_table bool NOT NULL DEFAULT false,
                                  lane_lock bool NOT NULL DEFAULT false,
                                  queue bool NOT NULL DEFAULT false,
                                  queue_history bool NOT NULL DEFAULT false);

-- The drain: claim up to claim_rows rows in batches of batch_rows, store the batches, mark the rows
-- in flight (one transaction), then record every batch's success (another), until nothing waits.
-- The statements are prism-sync's (src/store/postgres.rs) with the variant's changes.
CREATE PROCEDURE wal_drain(claim_rows int, batch_rows int) LANGUAGE plpgsql AS $$
DECLARE
    t pg_lsn; n bigint := 0; fl bigint := 0;
    use_floor bool := (SELECT floor_walk FROM wal_config);
    batch_success bool := (SELECT success_per_batch FROM wal_config);
    use_claims bool := (SELECT claims_table FROM wal_config);
    lane_lock bool := (SELECT lane_lock FROM wal_config);
    use_queue bool := (SELECT queue FROM wal_config);
    queue_history bool := (SELECT queue_history FROM wal_config);
    ids bigint[]; recs uuid[]; patches jsonb[]; bids uuid[]; owners uuid[];
BEGIN
    SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off;
    SET enable_hashjoin = off; SET enable_mergejoin = off;
    LOOP
        t := pg_current_wal_insert_lsn(); PERFORM set_config('wal.t', clock_timestamp()::text, false);
        IF use_floor THEN
            IF lane_lock THEN
                -- The lane's row is the lane's claim lock (another claimer would skip the lane).
                SELECT floor_id INTO fl FROM prism_lane_floor
                WHERE team_id = '' AND object_type = 'contact' FOR UPDATE SKIP LOCKED;
            ELSE
                SELECT floor_id INTO fl FROM prism_lane_floor WHERE team_id = '' AND object_type = 'contact';
            END IF;
        END IF;
        IF use_queue THEN
            -- The queue's claim: its waiting rows of the lane (batch_id IS NULL: the lane index's
            -- predicate) below the watermark, none with an older row of its record still queued
            -- (waiting, retrying or in flight), the patch from prism_outbox; only queue rows locked.
            SELECT coalesce(array_agg(c.id ORDER BY c.id), '{}'), array_agg(c.record_id ORDER BY c.id),
                   array_agg(c.patch ORDER BY c.id)
            INTO ids, recs, patches
            FROM (SELECT q.id, q.record_id, o.patch
                  FROM prism_outbox_queue q JOIN prism_outbox o ON o.id = q.id
                  WHERE q.team_id = '' AND q.object_type = 'contact' AND q.batch_id IS NULL
                    AND q.next_attempt_at <= now()
                    AND q.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
                    AND NOT EXISTS (SELECT 1 FROM prism_outbox_queue p
                                    WHERE p.record_id = q.record_id AND p.id < q.id)
                  ORDER BY q.id LIMIT claim_rows FOR UPDATE OF q SKIP LOCKED) c;
        ELSE
        -- Dynamic only so that the row locks can be left out (lane_lock); the statement is
        -- prism-sync's claim.
        EXECUTE format('SELECT coalesce(array_agg(c.id ORDER BY c.id), ''{}''), array_agg(c.record_id ORDER BY c.id),
               array_agg(c.patch ORDER BY c.id)
        FROM (SELECT o.id, o.record_id, o.patch FROM prism_outbox o
              WHERE o.team_id = '''' AND o.object_type = ''contact'' AND o.id >= $1
                AND o.state IN (''pending'', ''retrying'') AND o.next_attempt_at <= now()
                AND (NOT $3 OR NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id))
                AND o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
                -- The per-record order guard: no older row of the record unfinished.
                AND (SELECT 1 FROM prism_outbox p
                     WHERE p.record_id = o.record_id AND p.id < o.id
                       AND CASE WHEN $3 THEN NOT EXISTS (
                                SELECT 1 FROM prism_outbox_claims c LEFT JOIN prism_batches b ON b.id = c.batch_id
                                WHERE c.id = p.id AND (c.state IN (''succeeded'', ''dead'')
                                                       OR (c.state IS NULL AND b.state = ''done'')))
                           ELSE p.state IN (''pending'', ''retrying'', ''in_flight'')
                                AND (NOT $4 OR p.state <> ''in_flight''
                                     OR EXISTS (SELECT 1 FROM prism_batches b
                                                WHERE b.id = p.batch_id AND b.state = ''open'')) END
                     LIMIT 1) IS NULL
              ORDER BY o.id LIMIT $2 %s) c', CASE WHEN lane_lock THEN '' ELSE 'FOR UPDATE OF o SKIP LOCKED' END)
        INTO ids, recs, patches USING fl, claim_rows, use_claims, batch_success;
        END IF;
        EXIT WHEN cardinality(ids) = 0;
        t := wal_tally('claim: select (row locks)', t);
        SELECT array_agg(gen_random_uuid()) INTO bids
        FROM generate_series(1, (cardinality(ids) + batch_rows - 1) / batch_rows);
        SELECT array_agg(bids[(g - 1) / batch_rows + 1] ORDER BY g) INTO owners
        FROM generate_series(1, cardinality(ids)) g;
        INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count,
                                   row_count, lease_owner, lease_expires_at, parent_id, team_id, operation)
        SELECT bids[k + 1], 'prism-sync-' || gen_random_uuid(), 'contact', wal_body(r, p),
               wal_items(r, i), cardinality(i), cardinality(i), 'bench',
               now() + make_interval(secs => 60), NULL, '', 'update'
        FROM (SELECT (g - 1) / batch_rows AS k, array_agg(ids[g] ORDER BY g) AS i,
                     array_agg(recs[g] ORDER BY g) AS r, array_agg(patches[g] ORDER BY g) AS p
              FROM generate_series(1, cardinality(ids)) g GROUP BY 1) b;
        t := wal_tally('claim: insert batches', t);
        IF use_queue THEN
            -- The claimed rows leave the lane index (non-HOT: its predicate names batch_id).
            UPDATE prism_outbox_queue q SET batch_id = u.batch_id
            FROM unnest(ids, owners) AS u(id, batch_id) WHERE q.id = u.id;
            t := wal_tally('claim: queue rows in flight', t);
            IF queue_history THEN
                INSERT INTO prism_outbox_claims (id, batch_id, first_attempt_at)
                SELECT u.id, u.batch_id, now() FROM unnest(ids, owners) AS u(id, batch_id);
                t := wal_tally('claim: history (claim rows)', t);
            END IF;
        ELSIF use_claims THEN
            INSERT INTO prism_outbox_claims (id, batch_id, first_attempt_at)
            SELECT u.id, u.batch_id, now() FROM unnest(ids, owners) AS u(id, batch_id);
        ELSE
            UPDATE prism_outbox o SET state = 'in_flight', batch_id = u.batch_id,
                   first_attempt_at = COALESCE(o.first_attempt_at, now())
            FROM unnest(ids, owners) AS u(id, batch_id) WHERE o.id = u.id;
        END IF;
        IF NOT use_queue THEN t := wal_tally('claim: rows in flight', t); END IF;
        IF use_floor THEN
            -- The lane's floor: its first row still waiting (here: the next after this claim).
            UPDATE prism_lane_floor SET floor_id = COALESCE(
                (SELECT o.id FROM prism_outbox o
                 WHERE o.team_id = '' AND o.object_type = 'contact' AND o.id >= fl
                   AND o.state IN ('pending', 'retrying')
                   AND (NOT use_claims OR NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id))
                 ORDER BY o.id LIMIT 1),
                ids[cardinality(ids)] + 1)
            WHERE team_id = '' AND object_type = 'contact';
            t := wal_tally('claim: lane floor', t);
        END IF;
        COMMIT;
        t := wal_tally('commit records', t);

        UPDATE prism_batches b SET state = 'done', completed_at = now(), lease_owner = NULL,
               lease_expires_at = NULL, last_status = 200, last_error = NULL
        FROM unnest(bids) AS u(id)
        WHERE b.id = u.id AND b.lease_owner = 'bench' AND b.state = 'open';
        t := wal_tally('outcome: fence batches', t);
        INSERT INTO prism_batch_attempts (batch_id, attempt, owner, http_status, outcome, detail, replay, duration_ms)
        SELECT u.id, (SELECT COALESCE(max(a.attempt), 0) + 1 FROM prism_batch_attempts a WHERE a.batch_id = u.id),
               'bench', 200, 'ok', NULL, false, 3
        FROM unnest(bids) AS u(id);
        t := wal_tally('outcome: insert attempts', t);
        IF use_queue THEN
            -- The batch's rows are finished: they leave the queue (their success is the batch's).
            DELETE FROM prism_outbox_queue q USING unnest(ids, owners) AS u(id, batch_id)
            WHERE q.id = u.id AND q.batch_id = u.batch_id;
            t := wal_tally('outcome: queue rows deleted', t);
        END IF;
        IF batch_success THEN
            -- Every row of these batches succeeded: the batches' state says so, no row is written.
            COMMIT;
            t := wal_tally('commit records', t);
            n := n + cardinality(ids);
            CONTINUE;
        END IF;
        UPDATE prism_outbox o SET
            state = CASE WHEN (u.state = 'retrying' AND o.first_attempt_at <= now() - make_interval(secs => u.give_up))
                    THEN 'dead' ELSE u.state END,
            attempts = o.attempts + 1,
            next_attempt_at = CASE WHEN u.state = 'retrying'
                THEN now() + make_interval(secs => u.retry_in) ELSE o.next_attempt_at END,
            completed_at = CASE WHEN u.state IN ('succeeded', 'dead') OR
                (u.state = 'retrying' AND o.first_attempt_at <= now() - make_interval(secs => u.give_up))
                THEN now() ELSE NULL END,
            last_error_code = COALESCE(u.code, o.last_error_code),
            last_error_message = COALESCE(u.message, o.last_error_message)
        FROM unnest(ids, array_fill('succeeded'::text, ARRAY[cardinality(ids)]),
                    array_fill(NULL::text, ARRAY[cardinality(ids)]), array_fill(NULL::text, ARRAY[cardinality(ids)]),
                    array_fill(0::float8, ARRAY[cardinality(ids)]), owners,
                    array_fill(86400::float8, ARRAY[cardinality(ids)]))
             AS u(id, state, code, message, retry_in, batch_id, give_up)
        WHERE o.id = u.id AND o.batch_id = u.batch_id AND o.state = 'in_flight';
        t := wal_tally('outcome: rows succeeded', t);
        COMMIT;
        t := wal_tally('commit records', t);
        n := n + cardinality(ids);
    END LOOP;
    COMMIT;
    CALL wal_report(n);
END $$;
