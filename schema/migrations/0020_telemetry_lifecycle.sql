-- 0020: what fleet maintain needs for incremental rollups, late data and retention
-- (schema/README.md, "Lifecycle: partitions, rollups, retention").

-- Mergeable rollups: with these, two aggregates of one bucket combine exactly (a day from
-- its hours, a folded backfill into an existing hour). Averages are over the readings
-- that carry the value, so each needs its own count; first/last fuel need their times;
-- the distance across two adjacent buckets needs the first point of the later one.
ALTER TABLE vehicle_telemetry_hourly
    ADD COLUMN speed_samples   int NOT NULL DEFAULT 0,
    ADD COLUMN fuel_samples    int NOT NULL DEFAULT 0,
    ADD COLUMN first_fuel_time timestamptz,
    ADD COLUMN last_fuel_time  timestamptz,
    ADD COLUMN first_location  geometry(Point, 4326),
    ADD COLUMN first_time      timestamptz;

ALTER TABLE vehicle_telemetry_daily
    ADD COLUMN speed_samples   int NOT NULL DEFAULT 0,
    ADD COLUMN fuel_samples    int NOT NULL DEFAULT 0,
    ADD COLUMN first_fuel_time timestamptz,
    ADD COLUMN last_fuel_time  timestamptz,
    ADD COLUMN first_location  geometry(Point, 4326),
    ADD COLUMN first_time      timestamptz;


-- Hours taken out of telemetry_dirty_hours and not yet recomputed. The maintainer moves
-- dirty hours here in a short transaction that waits for in-flight sink transactions,
-- then recomputes and deletes them day by day; a crash in between loses nothing. An hour
-- may be queued twice (no unique key, so a claim never waits for a running recompute).
CREATE TABLE telemetry_rollup_queue (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hour      timestamptz NOT NULL,
    -- When the hour was marked dirty: the rollup lag is measured from it.
    queued_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_rollup_queue_on_the_hour CHECK (hour = date_trunc('hour', hour, 'UTC'))
);

-- The recompute takes one UTC day's hours at a time: `WHERE hour >= $day AND hour < $day + 24h`.
CREATE INDEX telemetry_rollup_queue_hour_idx ON telemetry_rollup_queue (hour);


-- Identities of readings merged into the rollups without a raw row (backfills older than
-- the raw retention): folding the same reading again is a no-op.
CREATE TABLE telemetry_folded_readings (
    vehicle_id uuid NOT NULL,
    time       timestamptz NOT NULL,
    folded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, time)
);

-- Pruning with the daily retention, when one is configured: `WHERE time < $cutoff`.
CREATE INDEX telemetry_folded_readings_time_idx ON telemetry_folded_readings (time);


-- Where the kept data begins, as one row. Raw readings before raw_horizon were dropped
-- (their hours are final in the rollups); hourly rollups before hourly_horizon were
-- removed (their days are final in vehicle_telemetry_daily). Both only move forward.
CREATE TABLE telemetry_lifecycle (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    raw_horizon    timestamptz NOT NULL DEFAULT '-infinity',
    hourly_horizon timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO telemetry_lifecycle DEFAULT VALUES;


-- When each periodic task of fleet maintain last succeeded ('pass', 'monthly_vehicle_stats').
CREATE TABLE maintenance_runs (
    task            text PRIMARY KEY,
    last_success_at timestamptz
);
