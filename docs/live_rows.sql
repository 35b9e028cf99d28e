-- The live features of a features table: per image its newest extracted record, unless a
-- deleted or removed record came after it, or a removal that no restoration lifted.
-- OUT is the table (extract's --output); docs/tables.md explains the statuses.
WITH records AS (SELECT * FROM delta_scan('OUT')),
newest AS (
    SELECT image_id,
           max(run) FILTER (WHERE status = 'extracted') AS extracted,
           coalesce(max(run) FILTER (WHERE status IN ('deleted', 'removed')), '') AS ended,
           coalesce(max(run) FILTER (WHERE status = 'removed'), '') AS removed,
           coalesce(max(run) FILTER (WHERE status = 'restored'), '') AS restored
    FROM records GROUP BY image_id
)
SELECT r.* FROM records r JOIN newest n ON r.image_id = n.image_id AND r.run = n.extracted
WHERE r.status = 'extracted' AND n.extracted > n.ended AND n.removed <= n.restored
