-- Record identity, continued (0003). The claim took a record id with surrounding whitespace (a
-- line read from a CRLF file, a padded column) or stored as a BLOB for the UUID it spells, but
-- 0003's trigger rewrote only text without whitespace into the canonical form, and the order
-- guard compares record_id as stored: ' 182bd5e5-…' and '182bd5e5-…' were two records, their
-- changes sent in either order, or as two items of one request. Now every value that is a UUID
-- once ASCII whitespace (space, tab, CR, LF) is trimmed is stored in the canonical form, text or
-- BLOB, as it is inserted and once here for the rows already stored; and the claim takes only
-- canonical ids (any other value goes dead as invalid_record_id), so the two can no longer
-- disagree. A canonical text, the usual case, still costs one GLOB.
DROP TRIGGER IF EXISTS prism_outbox_canonical_record_id;
CREATE TRIGGER prism_outbox_canonical_record_id AFTER INSERT ON prism_outbox
FOR EACH ROW WHEN NOT (typeof(NEW.record_id) = 'text' AND NEW.record_id GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]')
BEGIN
    UPDATE prism_outbox SET record_id = c.canonical
    FROM (SELECT substr(s, 1, 8) || '-' || substr(s, 9, 4) || '-' || substr(s, 13, 4) || '-'
                 || substr(s, 17, 4) || '-' || substr(s, 21, 12) AS canonical
          FROM (SELECT replace(replace(replace(replace(
                           lower(trim(CAST(NEW.record_id AS TEXT), ' ' || char(9, 10, 13))),
                           'urn:uuid:', ''), '{', ''), '}', ''), '-', '') AS s)
          WHERE length(s) = 32 AND s NOT GLOB '*[^0-9a-f]*') AS c
    WHERE prism_outbox.id = NEW.id;
END;

UPDATE prism_outbox SET record_id = c.canonical
FROM (SELECT id, substr(s, 1, 8) || '-' || substr(s, 9, 4) || '-' || substr(s, 13, 4) || '-'
             || substr(s, 17, 4) || '-' || substr(s, 21, 12) AS canonical
      FROM (SELECT id, replace(replace(replace(replace(
                       lower(trim(CAST(record_id AS TEXT), ' ' || char(9, 10, 13))),
                       'urn:uuid:', ''), '{', ''), '}', ''), '-', '') AS s
            FROM prism_outbox
            WHERE NOT (typeof(record_id) = 'text' AND record_id GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'))
      WHERE length(s) = 32 AND s NOT GLOB '*[^0-9a-f]*') AS c
WHERE prism_outbox.id = c.id;
