-- 0051: users and roles in use: every write of the fleet-operations writers is checked
-- against the role of an active user (README, "Users, roles and authenticated commands").

-- The permissions the writers check, one per kind of write (fleet_telemetry/fleetops/access.py):
-- vehicles:write, drivers:write, customers:write, assignments:write, jobs:write,
-- maintenance:write, alerts:resolve, geofences:write, documents:write, shipments:deliver,
-- users:write.
INSERT INTO roles (name, description, permissions) VALUES
    ('mechanic', 'Service records and schedules; reads vehicles and their documents',
     '["vehicles:read", "maintenance:read", "maintenance:write", "documents:read", "documents:write"]')
ON CONFLICT (name) DO NOTHING;

UPDATE roles SET permissions = permissions || '["documents:read", "documents:write"]'
 WHERE name = 'fleet_manager' AND NOT permissions ? 'documents:write';
UPDATE roles SET permissions = permissions || '["documents:read"]'
 WHERE name IN ('dispatcher', 'viewer') AND NOT permissions ? 'documents:read';
-- A proof of delivery attached to a shipment marks it delivered: the dispatcher and the
-- driver (from the phone, through a presigned PUT and document.attach) may.
UPDATE roles SET permissions = permissions || '["shipments:deliver"]'
 WHERE name IN ('dispatcher', 'driver') AND NOT permissions ? 'shipments:deliver';

-- A user is linked to their driver profile by drivers.user_id (0002; one live driver per user):
-- a driver's tokens are revoked under the driver's session key (docs/interface.md, "Redis keys").
