-- Liveness (every row ends) and record identity. Additive: applications keep inserting
-- (record_id, patch) as before.
--
-- first_attempt_at: when the row was first put in flight. retry.give_up_after counts from it: a row
--                   still failing past it goes dead with its last code, so no row (and no later
--                   change of its record) waits forever.
ALTER TABLE prism_outbox ADD COLUMN first_attempt_at TEXT;

-- Record identity: one UUID has several spellings (case, braces, hyphens, a urn:uuid: prefix), but
-- the per-record order guard and coalescing compare record_id as text. Every spelling of a UUID is
-- stored in the canonical lowercase hyphenated form: rewritten as it is inserted (a text that is
-- already canonical, the usual case, costs one GLOB), and once here for the rows already stored.
-- A text that is no UUID is left as written and goes dead as invalid_record_id.
CREATE TRIGGER prism_outbox_canonical_record_id AFTER INSERT ON prism_outbox
FOR EACH ROW WHEN typeof(NEW.record_id) = 'text'
    AND NEW.record_id NOT GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'
BEGIN
    UPDATE prism_outbox SET record_id = c.canonical
    FROM (SELECT substr(s, 1, 8) || '-' || substr(s, 9, 4) || '-' || substr(s, 13, 4) || '-'
                 || substr(s, 17, 4) || '-' || substr(s, 21, 12) AS canonical
          FROM (SELECT replace(replace(replace(replace(lower(NEW.record_id), 'urn:uuid:', ''),
                                                       '{', ''), '}', ''), '-', '') AS s)
          WHERE length(s) = 32 AND s NOT GLOB '*[^0-9a-f]*') AS c
    WHERE prism_outbox.id = NEW.id;
END;

UPDATE prism_outbox SET record_id = c.canonical
FROM (SELECT id, substr(s, 1, 8) || '-' || substr(s, 9, 4) || '-' || substr(s, 13, 4) || '-'
             || substr(s, 17, 4) || '-' || substr(s, 21, 12) AS canonical
      FROM (SELECT id, replace(replace(replace(replace(lower(record_id), 'urn:uuid:', ''),
                                               '{', ''), '}', ''), '-', '') AS s
            FROM prism_outbox
            WHERE typeof(record_id) = 'text' AND record_id NOT GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]')
      WHERE length(s) = 32 AND s NOT GLOB '*[^0-9a-f]*') AS c
WHERE prism_outbox.id = c.id;
