-- 0032: a geofence's name is unique among the active geofences, so an operator can name
-- one (fleet geofences add|import|update refuse a name in use).

-- Before the rule holds: of the active geofences sharing a name, every one but the oldest
-- gets " #<id>" appended (renamed, never deactivated: the rules keep evaluating them).
UPDATE geofences AS g SET name = g.name || ' #' || g.id
WHERE g.is_active AND g.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM geofences AS o
              WHERE o.name = g.name AND o.is_active AND o.deleted_at IS NULL AND o.id < g.id);

-- One active geofence per name; also serves "the active geofence named X".
CREATE UNIQUE INDEX geofences_active_name_key ON geofences (name) WHERE is_active AND deleted_at IS NULL;
