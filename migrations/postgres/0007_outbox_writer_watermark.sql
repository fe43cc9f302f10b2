-- The visibility watermark, held back only by transactions that may still commit outbox rows.
--
-- A row is claimable once its txid is below the watermark. pg_snapshot_xmin() of the claim's
-- snapshot was the watermark before: it counts every transaction holding an xid anywhere on the
-- server, so a batch job in another database, or an idle-in-transaction session that wrote some
-- other table, stopped all syncing. An INSERT (or COPY) into prism_outbox takes a
-- RowExclusiveLock on it before it draws an id, and keeps it until its transaction ends,
-- prepared or not; a transaction that did not hold it when the claim's snapshot was taken
-- cannot own a row older than the rows the claim sees.
--
-- Given the claim statement's own snapshot, the watermark is the oldest of its in-progress xids
-- that is not known to be a running non-writer, or its xmax when there is none. Known means: in
-- ONE read of pg_locks (so that a transaction's locks are seen together), the holder of the xid's
-- lock holds no RowExclusiveLock on prism_outbox; and then, AFTER that read, pg_xact_status still
-- says the xid is in progress. The order matters: a transaction leaves the proc array before it
-- releases its locks, so one seen without the lock and still running afterwards did not hold it
-- when the snapshot was taken either (its rows, if any, will be newer than every row the claim
-- sees); one that ended in between (perhaps committing an older row the snapshot does not show)
-- counts. ARCHITECTURE.md, "Postgres visibility watermark", has the whole argument and the one
-- residual case.
--
-- Locks held under a virtual transaction id ending in /0 belong to a transaction that has left
-- the proc array's books and not yet let go of its locks: committing or aborting (pg_xact_status
-- then no longer says in progress), or being PREPARED, when its locks move one lock-table
-- partition at a time to the prepared transaction's own entry (-1/xid) and, for a moment, its
-- xid's lock and its outbox lock may sit under two holders. No xid held under /0 is known quiet,
-- and while such a holder has an outbox lock nothing is: the watermark is then, for that
-- statement, the old pg_snapshot_xmin.
--
-- VOLATILE and plpgsql on purpose: the two reads run in this order, and the snapshot is the
-- caller's (passed in), so the caller's visibility and this watermark describe the same moment.
-- Call it once per statement: `o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))`.
CREATE FUNCTION prism_outbox_watermark(snap pg_snapshot) RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    outbox oid := 'prism_outbox'::regclass;
    here oid := (SELECT oid FROM pg_database WHERE datname = current_database());
    quiet xid[];
BEGIN
    IF NOT EXISTS (SELECT FROM pg_snapshot_xip(snap)) THEN
        RETURN pg_snapshot_xmax(snap);  -- nothing in progress: no need to read the lock table
    END IF;
    -- Only the rows that matter are grouped: on a busy server pg_locks has thousands.
    WITH holders AS (
        SELECT l.virtualtransaction LIKE '%/0' AS ending,
               array_agg(l.transactionid) FILTER (WHERE l.locktype = 'transactionid') AS xids,
               bool_or(l.locktype = 'relation') AS writes_outbox
        FROM pg_locks l
        WHERE l.granted
          AND ((l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock')
               OR (l.locktype = 'relation' AND l.database = here AND l.relation = outbox
                   AND l.mode = 'RowExclusiveLock'))
        GROUP BY l.virtualtransaction)
    SELECT CASE WHEN bool_or(h.ending AND h.writes_outbox) THEN '{}'
                ELSE COALESCE(array_agg(x) FILTER (WHERE x IS NOT NULL AND NOT h.writes_outbox
                                                         AND NOT h.ending), '{}')
           END
    INTO quiet
    FROM holders h LEFT JOIN LATERAL unnest(h.xids) AS x ON true;

    RETURN COALESCE((SELECT min(x) FROM pg_snapshot_xip(snap) AS x
                     WHERE NOT COALESCE(x::xid = ANY (quiet)
                                        AND pg_xact_status(x) = 'in progress', false)),
                    pg_snapshot_xmax(snap));
END $$;
