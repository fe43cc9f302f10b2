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

-- Claims walk each lane (team, object type) in id order, so that a backlog in one lane does not
-- starve the others, and a paused team's rows are never even visited. Replaces the id-only index.
-- (The index build reads the outbox once; it holds writers back meanwhile, which is why finished
-- rows should be purged on a schedule — retention.* — before a table grows huge.)
CREATE INDEX prism_outbox_lane ON prism_outbox (team_id, object_type, id)
    WHERE state IN ('pending', 'retrying');
DROP INDEX prism_outbox_active;
