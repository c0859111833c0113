-- 0031: the order of the "available drivers" list (seed 7.1 A).

-- Available drivers by name: `WHERE deleted_at IS NULL AND status = 'active' ORDER BY name, id LIMIT n`,
-- walked in order while each driver is probed in vehicle_assignments_no_driver_overlap; stops at n.
CREATE INDEX drivers_available_order_idx ON drivers (name, id) WHERE deleted_at IS NULL AND status = 'active';
