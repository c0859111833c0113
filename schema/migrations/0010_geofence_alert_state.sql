-- 0010: what the rule evaluator of the consumer workers remembers between batches, and
-- the geofence transitions it confirmed (schema/README.md, "Geofences and alerts").

-- One row per vehicle the rules have seen: written once per batch by the worker that owns
-- the vehicle's partition, read back by a restarted or rebalanced worker.
CREATE TABLE vehicle_rule_state (
    vehicle_id  uuid PRIMARY KEY REFERENCES vehicles (id) ON DELETE CASCADE,
    -- Event time of the newest evaluated reading: older readings fire nothing (late data),
    -- and writers update the row only if it still holds the value they read (no lost update).
    last_time   timestamptz NOT NULL,
    -- Last accepted position (an implausible GPS jump does not move it).
    lat         double precision,
    lon         double precision,
    odometer_km double precision,
    -- The rules' memory: overspeed episode, fuel at rest, trouble codes, open alerts.
    memory      jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vehicle_rule_state_memory_is_object CHECK (jsonb_typeof(memory) = 'object')
);

-- The offline timer: `WHERE last_time < now() - $silence`.
CREATE INDEX vehicle_rule_state_last_time_idx ON vehicle_rule_state (last_time);


-- A vehicle's side of each geofence it is inside of or about to cross; no row = outside.
CREATE TABLE vehicle_geofence_state (
    vehicle_id     uuid NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    geofence_id    bigint NOT NULL REFERENCES geofences (id) ON DELETE CASCADE,
    inside         boolean NOT NULL,
    -- Event time the confirmed side began (the enter, or the exit).
    since          timestamptz NOT NULL,
    -- First reading on the other side, not yet held for the minimum dwell.
    pending_since  timestamptz,
    pending_lat    double precision,
    pending_lon    double precision,
    -- Start of an episode above the geofence's speed limit, and whether it was raised.
    speeding_since timestamptz,
    speeding_max   double precision,
    speeding_open  boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- Serves the worker's load `WHERE vehicle_id = ANY($1)`.
    PRIMARY KEY (vehicle_id, geofence_id)
);

-- "Which vehicles are inside geofence X" and the clean-up when a geofence is removed.
CREATE INDEX vehicle_geofence_state_geofence_idx ON vehicle_geofence_state (geofence_id) WHERE inside;


-- Confirmed enters and exits, in event time.
CREATE TABLE geofence_transitions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle_id  uuid NOT NULL,
    geofence_id bigint NOT NULL REFERENCES geofences (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    -- Event time: the first reading on the new side, or the interpolated crossing time.
    time        timestamptz NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    -- true when two readings on either side jumped across the fence (segment crossing).
    crossing    boolean NOT NULL DEFAULT false,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT geofence_transitions_kind_check CHECK (kind IN ('enter', 'exit'))
);

-- A transition is recorded once whatever replays: `ON CONFLICT DO NOTHING`; also serves a
-- vehicle's visits to one fence in time order.
CREATE UNIQUE INDEX geofence_transitions_identity_key
    ON geofence_transitions (vehicle_id, geofence_id, time, kind);
-- A geofence's traffic, newest first.
CREATE INDEX geofence_transitions_geofence_idx ON geofence_transitions (geofence_id, time DESC);
-- A vehicle's transitions across all fences, newest first.
CREATE INDEX geofence_transitions_vehicle_idx ON geofence_transitions (vehicle_id, time DESC);
