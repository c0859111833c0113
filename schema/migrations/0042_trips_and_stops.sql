-- 0042: trips and stops, the motion state of each vehicle (with its odometer and engine
-- hours), and the vehicle-hours late readings touched.
--
-- The workers' trips stage (fleet_telemetry.trips) runs every vehicle's readings, in
-- event-time order, through one state machine: moving, halted, stopped. It writes the
-- trip and stop rows it opens and closes in the same transaction as the vehicle's
-- vehicle_motion_state row, so a worker that restarts continues where the row left off.
-- `fleet maintain` recomputes from the raw rows the trips and stops of the vehicle-hours
-- in trip_dirty_hours (late readings), with the same state machine.

CREATE TABLE trips (
    -- Stable: derived from (vehicle, start time), so a recomputation of the same trip keeps it.
    id                 uuid PRIMARY KEY,
    vehicle_id         uuid NOT NULL REFERENCES vehicles (id),
    -- The driver of the ACTIVE assignment at the start (fleet_driver_at), or NULL.
    driver_id          uuid,
    start_time         timestamptz NOT NULL,
    start_location     geometry(Point, 4326) NOT NULL,
    start_geofence_id  bigint,
    -- NULL while the trip is open.
    end_time           timestamptz,
    end_location       geometry(Point, 4326),
    end_geofence_id    bigint,
    -- From the positions; segments flagged as GPS jumps are left out.
    distance_km        double precision,
    duration_s         double precision,
    max_speed_kmh      double precision,
    avg_speed_kmh      double precision,
    -- Fuel level (percent) at the start minus at the end, where fuel is reported.
    fuel_used_percent  double precision,
    idle_s             double precision NOT NULL DEFAULT 0,
    -- The vehicle's odometer_km and engine hours at the start and the end.
    start_odometer_km  double precision,
    end_odometer_km    double precision,
    start_engine_s     double precision,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trips_end_after_start CHECK (end_time IS NULL OR end_time >= start_time)
);

-- `fleet trips list` and the recomputation: a vehicle's trips in time order.
CREATE UNIQUE INDEX trips_vehicle_start_idx ON trips (vehicle_id, start_time);
-- At most one open trip per vehicle.
CREATE UNIQUE INDEX trips_one_open ON trips (vehicle_id) WHERE end_time IS NULL;

CREATE TABLE stops (
    id           uuid PRIMARY KEY,
    vehicle_id   uuid NOT NULL REFERENCES vehicles (id),
    start_time   timestamptz NOT NULL,
    -- NULL while the stop is open.
    end_time     timestamptz,
    location     geometry(Point, 4326) NOT NULL,
    geofence_id  bigint,
    duration_s   double precision,
    -- Seconds of it spent with the engine running.
    idle_s       double precision NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stops_end_after_start CHECK (end_time IS NULL OR end_time >= start_time)
);

-- `fleet stops list` and the recomputation: a vehicle's stops in time order.
CREATE UNIQUE INDEX stops_vehicle_start_idx ON stops (vehicle_id, start_time);
-- At most one open stop per vehicle.
CREATE UNIQUE INDEX stops_one_open ON stops (vehicle_id) WHERE end_time IS NULL;

-- One row per vehicle: the trips state machine as it stands after the vehicle's newest
-- processed reading (last_time), and the vehicle's accumulators. Updated under optimistic
-- concurrency: only if last_time and revision still hold what the writer read.
CREATE TABLE vehicle_motion_state (
    vehicle_id     uuid PRIMARY KEY REFERENCES vehicles (id),
    last_time      timestamptz NOT NULL,
    -- Bumped by every recomputation, so a worker holding an older copy re-reads it.
    revision       bigint NOT NULL DEFAULT 0,
    -- The device's odometer when it sends one, else the distance summed from the positions.
    odometer_km    double precision NOT NULL DEFAULT 0,
    -- Seconds with the ignition on.
    engine_s       double precision NOT NULL DEFAULT 0,
    -- The rest of the machine (open trip and stop, halt, idling), as written by fleet_telemetry.trips.
    memory         jsonb NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Vehicle-hours that readings older than the vehicle's newest processed one touched; the
-- maintainer recomputes those vehicles' trips and stops and deletes the rows it handled.
CREATE TABLE trip_dirty_hours (
    vehicle_id uuid NOT NULL,
    hour       timestamptz NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, hour),
    CONSTRAINT trip_dirty_hours_on_the_hour CHECK (hour = date_trunc('hour', hour, 'UTC'))
);

-- The active geofence containing a point (the smallest when several do), or NULL: the
-- start and end geofences of trips and the geofence of stops. Candidates by the shape
-- index, then the exact test of each kind.
CREATE FUNCTION fleet_geofence_at(lon double precision, lat double precision) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT g.id FROM geofences AS g
    WHERE g.is_active AND g.deleted_at IS NULL
      AND g.shape && ST_SetSRID(ST_MakePoint(lon, lat), 4326)
      AND CASE WHEN g.kind = 'circle'
               THEN ST_DWithin(g.center::geography, ST_SetSRID(ST_MakePoint(lon, lat), 4326)::geography, g.radius_m)
               ELSE ST_Covers(g.area, ST_SetSRID(ST_MakePoint(lon, lat), 4326)) END
    ORDER BY ST_Area(g.shape), g.id
    LIMIT 1
$$;
