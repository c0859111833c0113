-- 0004: maintenance and health (seed 2.4, 7.2), geofences, alerts.

CREATE TABLE maintenance_records (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    vehicle_id  uuid NOT NULL REFERENCES vehicles (id),
    type        text NOT NULL,
    cost        numeric(12, 2) NOT NULL DEFAULT 0,
    date        date NOT NULL,
    odometer_km double precision,
    provider    text,
    notes       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT maintenance_records_cost_not_negative CHECK (cost >= 0)
);

-- A vehicle's service history, newest first (seed: vehicle_id).
CREATE INDEX maintenance_records_vehicle_idx ON maintenance_records (vehicle_id, date DESC);
-- Cost reports over a period for the whole fleet (seed: date).
CREATE INDEX maintenance_records_date_idx ON maintenance_records (date);


CREATE TABLE maintenance_schedules (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL,
    -- Which vehicles the rule applies to: vehicles.type.
    vehicle_type    text NOT NULL,
    interval_km     double precision,
    interval_months int,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- A recurring rule needs at least one interval, and intervals move forward.
    CONSTRAINT maintenance_schedules_has_interval
        CHECK (interval_km IS NOT NULL OR interval_months IS NOT NULL),
    CONSTRAINT maintenance_schedules_interval_km_positive CHECK (interval_km IS NULL OR interval_km > 0),
    CONSTRAINT maintenance_schedules_interval_months_positive
        CHECK (interval_months IS NULL OR interval_months > 0)
);

-- Schedules that apply to a vehicle type; one rule name per type.
CREATE UNIQUE INDEX maintenance_schedules_type_name_key ON maintenance_schedules (vehicle_type, name);

CREATE TRIGGER maintenance_schedules_touch_updated_at BEFORE UPDATE ON maintenance_schedules
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


-- When each schedule is next due for each vehicle; recomputed by the writer after a service.
CREATE TABLE maintenance_triggers (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    vehicle_id        uuid NOT NULL REFERENCES vehicles (id),
    schedule_id       uuid NOT NULL REFERENCES maintenance_schedules (id),
    last_service_date date,
    last_service_km   double precision,
    next_due_date     date,
    next_due_km       double precision,
    -- false once the vehicle is retired or the schedule no longer applies.
    is_active         boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT maintenance_triggers_has_due CHECK (next_due_date IS NOT NULL OR next_due_km IS NOT NULL)
);

-- One trigger per (vehicle, schedule); also serves "everything due for vehicle X".
CREATE UNIQUE INDEX maintenance_triggers_vehicle_schedule_key
    ON maintenance_triggers (vehicle_id, schedule_id);
-- Overdue list `WHERE is_active AND next_due_date < current_date ORDER BY next_due_date`:
-- the seed's `WHERE next_due_date < NOW()` is not allowed in an index (NOW() is not IMMUTABLE).
CREATE INDEX idx_maintenance_overdue ON maintenance_triggers (next_due_date)
    WHERE is_active AND next_due_date IS NOT NULL;

CREATE TRIGGER maintenance_triggers_touch_updated_at BEFORE UPDATE ON maintenance_triggers
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


CREATE TABLE geofences (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,
    kind            text NOT NULL DEFAULT 'polygon',
    -- Polygon or MultiPolygon, for kind = 'polygon'.
    area            geometry(Geometry, 4326),
    -- Centre and radius in metres, for kind = 'circle'.
    center          geometry(Point, 4326),
    radius_m        double precision,
    -- Optional rules checked against readings inside the fence.
    speed_limit_kmh double precision,
    dwell_seconds   int,
    is_active       boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    -- One index for both kinds: the polygon itself, or the circle as a polygon (32 segments).
    -- Candidates: `shape && $point`; then the exact test ST_Covers(area, p) or
    -- ST_DWithin(center::geography, p::geography, radius_m).
    shape           geometry(Geometry, 4326) GENERATED ALWAYS AS (
        CASE WHEN kind = 'circle' THEN ST_Buffer(center::geography, radius_m)::geometry ELSE area END
    ) STORED,
    CONSTRAINT geofences_kind_check CHECK (kind IN ('polygon', 'circle')),
    CONSTRAINT geofences_polygon_has_area CHECK (
        kind <> 'polygon'
        OR (area IS NOT NULL AND GeometryType(area) IN ('POLYGON', 'MULTIPOLYGON'))
    ),
    CONSTRAINT geofences_circle_has_center_radius CHECK (
        kind <> 'circle' OR (center IS NOT NULL AND radius_m IS NOT NULL AND radius_m > 0)
    ),
    CONSTRAINT geofences_speed_limit_positive CHECK (speed_limit_kmh IS NULL OR speed_limit_kmh > 0),
    CONSTRAINT geofences_dwell_positive CHECK (dwell_seconds IS NULL OR dwell_seconds > 0)
);

-- "Which active geofences may contain this reading": `WHERE shape && $point` (both kinds).
CREATE INDEX geofences_shape_gist ON geofences USING gist (shape)
    WHERE is_active AND deleted_at IS NULL;
-- Map views over polygons: `WHERE area && ST_MakeEnvelope(...)`.
CREATE INDEX geofences_area_gist ON geofences USING gist (area);
-- Circle centres near a point in metres: `ST_DWithin(center::geography, $p::geography, $m)`.
CREATE INDEX geofences_center_geog_gist ON geofences USING gist ((center::geography));

CREATE TRIGGER geofences_touch_updated_at BEFORE UPDATE ON geofences
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


CREATE TABLE alerts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type  text NOT NULL DEFAULT 'vehicle',
    entity_id    uuid NOT NULL,
    type         text NOT NULL,
    severity     text NOT NULL,
    geofence_id  bigint REFERENCES geofences (id),
    -- Event time of the reading that raised the alert (raised_at is wall-clock time).
    reading_time timestamptz,
    raised_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    is_resolved  boolean NOT NULL DEFAULT false,
    details      jsonb NOT NULL DEFAULT '{}',
    CONSTRAINT alerts_severity_check CHECK (severity IN ('info', 'warning', 'critical'))
);

-- No alert spam by construction: at most one open alert per (entity, type, geofence);
-- raise with `INSERT ... ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved DO NOTHING`.
CREATE UNIQUE INDEX alerts_one_open ON alerts (entity_id, type, coalesce(geofence_id, 0))
    WHERE NOT is_resolved;
-- Dashboard "open alerts by severity, newest first" (seed: is_resolved, severity), small as it
-- holds open alerts only.
CREATE INDEX alerts_open_by_severity ON alerts (severity, raised_at DESC) WHERE NOT is_resolved;
-- An entity's alert history, newest first, resolved ones included.
CREATE INDEX alerts_entity_idx ON alerts (entity_id, raised_at DESC);
