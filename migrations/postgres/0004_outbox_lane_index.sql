-- no-transaction
-- Claims walk each lane (team, object type) in id order, so that a backlog in one lane does not
-- starve the others, and a paused team's rows are never even visited.
--
-- CONCURRENTLY: the build reads the whole outbox, and a plain CREATE INDEX holds every INSERT
-- back until it ends. CONCURRENTLY cannot run in a transaction (hence the first line) and only
-- one statement a migration. IF NOT EXISTS: databases that applied 0002 as first released have
-- it already; an interrupted build leaves an INVALID index, which prism-sync drops before it
-- migrates again (store/postgres/migrate.rs).
CREATE INDEX CONCURRENTLY IF NOT EXISTS prism_outbox_lane ON prism_outbox (team_id, object_type, id)
    WHERE state IN ('pending', 'retrying');
