-- prism_unfinished_bound() (0015), with its late-row range read through the txid index
-- (prism_outbox_lane_txid, 0016) whatever the table's statistics say. In 0015 the range's state
-- test implied the lane index's predicate, and on a table whose statistics say it is small (a
-- freshly filled outbox, before autovacuum has analyzed it) the planner walked the lane index
-- from the lane's first row instead: every row the lane ever had, once per claim statement
-- (5 ms at 30,000 rows). The state test is now spelt so that it implies no partial index's
-- predicate, as the claim's own late-row reads are (late_rows! in src/store/postgres.rs). Same
-- value, same signature.
CREATE OR REPLACE FUNCTION prism_unfinished_bound() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE lanes(team_id, object_type) AS (
        (SELECT team_id, object_type FROM prism_outbox
         WHERE state IN ('pending', 'retrying') ORDER BY team_id, object_type LIMIT 1)
        UNION ALL
        SELECT n.team_id, n.object_type FROM lanes CROSS JOIN LATERAL (
            SELECT o.team_id, o.object_type FROM prism_outbox o
            WHERE o.state IN ('pending', 'retrying')
              AND (o.team_id, o.object_type) > (lanes.team_id, lanes.object_type)
            ORDER BY o.team_id, o.object_type LIMIT 1) n),
    fl AS (
        SELECT l.team_id, l.object_type, COALESCE(f.floor_id, 0) AS floor_id,
               COALESCE(f.late_txid, '0'::xid8) AS late_txid
        FROM (SELECT team_id, object_type FROM lanes
              UNION SELECT team_id, object_type FROM prism_lane_floors) l
        LEFT JOIN prism_lane_floors f
             ON f.team_id = l.team_id AND f.object_type = l.object_type)
    SELECT least(
        (SELECT min(floor_id) FROM fl),
        (SELECT min((SELECT min(o.id + 0) FROM prism_outbox o
                     WHERE o.team_id = fl.team_id AND o.object_type = fl.object_type
                       AND o.txid >= fl.late_txid AND o.id + 0 < fl.floor_id
                       AND (o.state || '') IN ('pending', 'retrying')
                       AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)))
         FROM fl),
        (SELECT min((SELECT c.id FROM prism_outbox_claims c
                     WHERE c.team_id = fl.team_id AND c.object_type = fl.object_type
                       AND c.state IN ('pending', 'retrying')
                     ORDER BY c.id LIMIT 1))
         FROM fl),
        (SELECT min(COALESCE(b.first_row_id,
                             (SELECT min(c.id) FROM prism_outbox_claims c WHERE c.batch_id = b.id)))
         FROM prism_batches b WHERE b.state = 'open'),
        (SELECT COALESCE(max(id), 0) + 1 FROM prism_outbox)));
END $$;
