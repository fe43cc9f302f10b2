-- Deletes and several teams. Additive: since Postgres 11, ADD COLUMN with a constant default is a
-- catalogue change, not a table rewrite, and applications that insert only (record_id, patch)
-- keep working.
--
-- operation: 'update' (batch/update with the patch) or 'delete' (batch/delete; the patch is not
--            sent, conventionally '{}'). Anything else goes dead as invalid_operation.
-- team_id:   '' means the configured default team (micro.team_id); otherwise a team id that has a
--            [teams."<id>"] entry (or equals micro.team_id). Others go dead as unknown_team.
ALTER TABLE prism_outbox ADD COLUMN operation text NOT NULL DEFAULT 'update';
ALTER TABLE prism_outbox ADD COLUMN team_id text NOT NULL DEFAULT '';

ALTER TABLE prism_batches ADD COLUMN operation text NOT NULL DEFAULT 'update';
ALTER TABLE prism_batches ADD COLUMN team_id text NOT NULL DEFAULT '';

-- The lane index that replaces prism_outbox_active is built by 0004 and the old index dropped by
-- 0005, both CONCURRENTLY: a plain CREATE INDEX here, inside the migration's transaction, held
-- the application's inserts back for as long as it read the whole outbox. (This migration as
-- first released built it here; databases that applied that form have the same indexes, and
-- prism-sync updates its recorded checksum before migrating: store/postgres/migrate.rs.)
