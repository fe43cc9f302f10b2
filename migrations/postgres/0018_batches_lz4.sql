-- A claim stores each batch's request body (about 10 kB of JSON for 100 items) and its items
-- (about 6 kB): both are compressed on the way in, with Postgres' default pglz at about 320 µs a
-- batch of server CPU, 3 µs for every synced change. lz4 compresses them in about 85 µs to the
-- same size (docs/database-cost.md, "Ninth look"). Only rows written from now on use it; the
-- stored ones stay readable as they are (no rewrite).
--
-- lz4 needs Postgres 14 or later built with it (the default_toast_compression setting lists it
-- then); on any other server this migration changes nothing.
--
-- The column change takes the batches table's lock for an instant; while it waits for a
-- transaction of a running replica, that replica's next statements on the table queue behind
-- it. So it waits at most 2 s; the migrator tries again a moment later.
SET LOCAL lock_timeout = '2s';

DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 140000
       AND EXISTS (SELECT 1 FROM pg_settings
                   WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        EXECUTE 'ALTER TABLE prism_batches ALTER COLUMN body SET COMPRESSION lz4, '
                'ALTER COLUMN items SET COMPRESSION lz4';
    END IF;
END $$;
