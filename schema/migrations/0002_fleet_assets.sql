-- 0002: fleet assets (seed 2.2 and 7.2): vehicles, drivers, who drives what, where each vehicle is.

CREATE TABLE vehicles (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    vin           text NOT NULL,
    license_plate text NOT NULL,
    make          text,
    model         text,
    year          int,
    type          text NOT NULL DEFAULT 'truck',
    status        text NOT NULL DEFAULT 'active',
    specs         jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    CONSTRAINT vehicles_year_plausible CHECK (year IS NULL OR year BETWEEN 1900 AND 2100),
    -- GIN containment queries (`specs @> '{"fuel": "diesel"}'`) only make sense on an object.
    CONSTRAINT vehicles_specs_is_object CHECK (jsonb_typeof(specs) = 'object')
);

-- One live vehicle per VIN, and look-up by VIN; a soft-deleted vehicle frees its VIN.
CREATE UNIQUE INDEX vehicles_vin_key ON vehicles (vin) WHERE deleted_at IS NULL;
-- One live vehicle per licence plate, and look-up by plate (seed: license_plate).
CREATE UNIQUE INDEX vehicles_license_plate_key ON vehicles (license_plate) WHERE deleted_at IS NULL;
-- The most common list filter: `WHERE status = $1 AND type = $2` (seed 7.2 idx_vehicles_status_type).
CREATE INDEX idx_vehicles_status_type ON vehicles (status, type);
-- `specs @> '{"fuel": "diesel"}'` and key tests `specs ? 'refrigerated'` (seed 7.2 idx_vehicles_specs).
-- fastupdate off: vehicles are written rarely, and a long pending list makes the planner skip the index.
CREATE INDEX idx_vehicles_specs ON vehicles USING gin (specs) WITH (fastupdate = off);

CREATE TRIGGER vehicles_touch_updated_at BEFORE UPDATE ON vehicles
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


CREATE TABLE drivers (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Optional login of the driver (role 'driver'); drivers without an account are allowed.
    user_id        uuid REFERENCES users (id),
    name           text,
    license_number text,
    status         text NOT NULL DEFAULT 'active',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);

-- Look-up by licence number; one live driver per licence.
CREATE UNIQUE INDEX drivers_license_number_key ON drivers (license_number) WHERE deleted_at IS NULL;
-- One live driver profile per user account.
CREATE UNIQUE INDEX drivers_user_id_key ON drivers (user_id) WHERE deleted_at IS NULL;
-- Driver lists filtered by status (`WHERE status = 'active' AND deleted_at IS NULL`).
CREATE INDEX drivers_status_idx ON drivers (status) WHERE deleted_at IS NULL;

CREATE TRIGGER drivers_touch_updated_at BEFORE UPDATE ON drivers
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


-- Not partitioned (see schema/README.md, Decisions): the no-overlap rules below must hold
-- across the whole table, which a partitioned table cannot enforce.
CREATE TABLE vehicle_assignments (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    vehicle_id uuid NOT NULL REFERENCES vehicles (id),
    driver_id  uuid NOT NULL REFERENCES drivers (id),
    start_time timestamptz NOT NULL,
    end_time   timestamptz,
    status     text NOT NULL DEFAULT 'ACTIVE',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vehicle_assignments_status_check
        CHECK (status IN ('ACTIVE', 'COMPLETED', 'CANCELLED')),
    -- An empty or reversed range would overlap nothing and silently dodge the rules below.
    CONSTRAINT vehicle_assignments_time_order CHECK (end_time IS NULL OR end_time > start_time),
    -- A vehicle is never double-booked: ACTIVE bookings, [start, end) so back-to-back is fine,
    -- a NULL end_time is open-ended. Its GiST index also serves "current driver of vehicle X".
    CONSTRAINT vehicle_assignments_no_vehicle_overlap EXCLUDE USING gist (
        vehicle_id WITH =,
        tstzrange(start_time, end_time, '[)') WITH &&
    ) WHERE (status = 'ACTIVE'),
    -- The same rule for drivers: nobody drives two vehicles at once.
    CONSTRAINT vehicle_assignments_no_driver_overlap EXCLUDE USING gist (
        driver_id WITH =,
        tstzrange(start_time, end_time, '[)') WITH &&
    ) WHERE (status = 'ACTIVE')
);

-- A vehicle's booking history, newest first (all statuses).
CREATE INDEX vehicle_assignments_vehicle_idx ON vehicle_assignments (vehicle_id, start_time DESC);
-- A driver's booking history, newest first (all statuses).
CREATE INDEX vehicle_assignments_driver_idx ON vehicle_assignments (driver_id, start_time DESC);
-- Planning boards: `WHERE status = $1 AND start_time BETWEEN $2 AND $3`.
CREATE INDEX vehicle_assignments_status_start_idx ON vehicle_assignments (status, start_time);

CREATE TRIGGER vehicle_assignments_touch_updated_at BEFORE UPDATE ON vehicle_assignments
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


-- Last known position per vehicle, upserted by the telemetry consumer (newer time wins).
-- Replaces the seed's drivers.current_location: join ACTIVE assignments to find drivers.
CREATE TABLE vehicle_positions (
    vehicle_id uuid PRIMARY KEY REFERENCES vehicles (id) ON DELETE CASCADE,
    time       timestamptz NOT NULL,
    location   geometry(Point, 4326) NOT NULL,
    speed      double precision,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Bounding-box and KNN search in degrees: `ORDER BY location <-> $point LIMIT n`.
CREATE INDEX vehicle_positions_location_gist ON vehicle_positions USING gist (location);
-- "Within 50 km of warehouse A": `ST_DWithin(location::geography, $point::geography, 50000)`.
CREATE INDEX vehicle_positions_location_geog_gist
    ON vehicle_positions USING gist ((location::geography));
