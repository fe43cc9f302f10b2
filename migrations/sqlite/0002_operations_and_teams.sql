-- Deletes and several teams. Additive: `ALTER TABLE ... ADD COLUMN` with a constant default does
-- not rewrite the table, and applications that insert only (record_id, patch) keep working.
--
-- operation: 'update' (batch/update with the patch) or 'delete' (batch/delete; the patch is not
--            sent, conventionally '{}'). Anything else goes dead as invalid_operation.
-- team_id:   '' means the configured default team (micro.team_id); otherwise a team id that has a
--            [teams."<id>"] entry (or equals micro.team_id). Others go dead as unknown_team.
ALTER TABLE prism_outbox ADD COLUMN operation TEXT NOT NULL DEFAULT 'update';
ALTER TABLE prism_outbox ADD COLUMN team_id TEXT NOT NULL DEFAULT '';

ALTER TABLE prism_batches ADD COLUMN operation TEXT NOT NULL DEFAULT 'update';
ALTER TABLE prism_batches ADD COLUMN team_id TEXT NOT NULL DEFAULT '';

-- Claims walk each lane (team, object type) in id order, so that a backlog in one lane does not
-- starve the others, and a paused team's rows are never even visited. Replaces the id-only index.
CREATE INDEX prism_outbox_lane ON prism_outbox (team_id, object_type, id)
    WHERE state IN ('pending', 'retrying');
DROP INDEX prism_outbox_active;
