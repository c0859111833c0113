-- 0005: high-volume telemetry (seed 3): daily-partitioned raw readings, rollups, partition upkeep.

-- Creates one range partition of p_parent, moving any rows of its range out of the
-- parent's DEFAULT partition first (PostgreSQL refuses the new partition otherwise).
-- Returns false if a table of that name already exists. Used by the fleet_ensure_* functions.
CREATE FUNCTION fleet_create_range_partition(
    p_parent regclass, p_partition text, p_key text, p_from timestamptz, p_to timestamptz
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_schema  text;
    v_default regclass;
    v_pending boolean := false;
    v_moved   bigint;
    v_bounds  text;
BEGIN
    SELECT n.nspname INTO v_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_parent;
    IF to_regclass(format('%I.%I', v_schema, p_partition)) IS NOT NULL THEN
        RETURN false;
    END IF;

    SELECT c.oid::regclass INTO v_default
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = p_parent AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';

    -- Same lock order as writers (parent, then partitions), taken before reading the
    -- default partition so no row of this range can slip into it until we commit.
    EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', p_parent);
    IF v_default IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_default);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I >= $1 AND %I < $2)',
                       v_default, p_key, p_key)
           INTO STRICT v_pending USING p_from, p_to;
    END IF;

    v_bounds := format('FOR VALUES FROM (%L) TO (%L)',
                       to_char(p_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"+00"'),
                       to_char(p_to AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"+00"'));

    IF NOT v_pending THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s %s', v_schema, p_partition, p_parent, v_bounds);
        RETURN true;
    END IF;

    EXECUTE format('CREATE TEMP TABLE fleet_partition_move (LIKE %s)', p_parent);
    EXECUTE format('WITH moved AS (DELETE FROM %s WHERE %I >= $1 AND %I < $2 RETURNING *)'
                   ' INSERT INTO pg_temp.fleet_partition_move SELECT * FROM moved',
                   v_default, p_key, p_key)
        USING p_from, p_to;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s %s', v_schema, p_partition, p_parent, v_bounds);
    -- OVERRIDING SYSTEM VALUE keeps identity values (audit_logs.id) as they were.
    EXECUTE format('INSERT INTO %s OVERRIDING SYSTEM VALUE SELECT * FROM pg_temp.fleet_partition_move',
                   p_parent);
    DROP TABLE pg_temp.fleet_partition_move;
    RAISE NOTICE 'moved % rows from % into %', v_moved, v_default, p_partition;
    RETURN true;
END;
$$;


-- Raw readings. Column order is a contract: the consumer COPYs these columns in this order.
-- No foreign key to vehicles: the consumer validates vehicle_id, COPY stays fast.
CREATE TABLE vehicle_telemetry (
    time          timestamptz NOT NULL,
    vehicle_id    uuid NOT NULL,
    location      geometry(Point, 4326) NOT NULL,
    speed         double precision,
    fuel_level    double precision,
    heading       double precision,
    odometer_km   double precision,
    engine_status jsonb,
    -- A reading's identity (CONTRACT.md): duplicates are dropped with ON CONFLICT DO NOTHING;
    -- its index also serves "latest readings of vehicle X" by a backward scan.
    CONSTRAINT vehicle_telemetry_vehicle_time_key UNIQUE (vehicle_id, time)
) PARTITION BY RANGE (time);

-- Time-range scans across the fleet inside a day (rollups, replays); tiny because rows
-- arrive roughly in time order.
CREATE INDEX vehicle_telemetry_time_brin ON vehicle_telemetry USING brin (time);

-- Catch-all: a reading never fails for want of a partition; fleet_ensure_telemetry_partitions
-- moves such rows out when their day's partition is created.
CREATE TABLE vehicle_telemetry_default PARTITION OF vehicle_telemetry DEFAULT;

-- Creates the missing daily partitions vehicle_telemetry_pYYYYMMDD (UTC days) for
-- p_from..p_to inclusive and returns how many it created. Safe to call concurrently.
CREATE FUNCTION fleet_ensure_telemetry_partitions(p_from date, p_to date) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_day     date;
    v_created int := 0;
BEGIN
    IF p_to < p_from THEN
        RAISE EXCEPTION 'fleet_ensure_telemetry_partitions: p_to (%) is before p_from (%)', p_to, p_from;
    END IF;
    -- Serialises concurrent callers until commit (fleet maintain on two hosts, tests).
    PERFORM pg_advisory_xact_lock(hashtext('fleet_partitions'), hashtext('vehicle_telemetry'));
    FOR v_day IN SELECT generate_series(p_from, p_to, interval '1 day')::date LOOP
        IF fleet_create_range_partition(
               'vehicle_telemetry', 'vehicle_telemetry_p' || to_char(v_day, 'YYYYMMDD'), 'time',
               v_day::timestamp AT TIME ZONE 'UTC', (v_day + 1)::timestamp AT TIME ZONE 'UTC') THEN
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END;
$$;

-- Readings up to 30 days old are accepted, plus a week ahead.
SELECT fleet_ensure_telemetry_partitions(
    (now() AT TIME ZONE 'UTC')::date - 31, (now() AT TIME ZONE 'UTC')::date + 7);


-- Hours touched by ingested batches (written by the sink); the maintainer recomputes
-- those hours' rollups and deletes the rows it handled.
CREATE TABLE telemetry_dirty_hours (
    hour      timestamptz PRIMARY KEY,
    marked_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_dirty_hours_on_the_hour CHECK (hour = date_trunc('hour', hour, 'UTC'))
);

-- 1-hour averages per vehicle, kept one year (seed 3: downsampled data).
CREATE TABLE vehicle_telemetry_hourly (
    vehicle_id    uuid NOT NULL,
    bucket        timestamptz NOT NULL,
    samples       int NOT NULL,
    avg_speed     double precision,
    min_speed     double precision,
    max_speed     double precision,
    avg_fuel      double precision,
    first_fuel    double precision,
    last_fuel     double precision,
    distance_km   double precision,
    last_location geometry(Point, 4326),
    last_time     timestamptz,
    -- One vehicle's hours in order: `WHERE vehicle_id = $1 AND bucket >= $2`; upsert target.
    PRIMARY KEY (vehicle_id, bucket)
);

-- Fleet-wide ranges and the one-year retention delete `WHERE bucket < $cutoff`.
CREATE INDEX vehicle_telemetry_hourly_bucket_idx ON vehicle_telemetry_hourly (bucket);

-- Daily averages per vehicle (bucket = day start, UTC), kept indefinitely (seed 3: archived).
CREATE TABLE vehicle_telemetry_daily (
    vehicle_id    uuid NOT NULL,
    bucket        timestamptz NOT NULL,
    samples       int NOT NULL,
    avg_speed     double precision,
    min_speed     double precision,
    max_speed     double precision,
    avg_fuel      double precision,
    first_fuel    double precision,
    last_fuel     double precision,
    distance_km   double precision,
    last_location geometry(Point, 4326),
    last_time     timestamptz,
    -- One vehicle's days in order; upsert target.
    PRIMARY KEY (vehicle_id, bucket)
);

-- Fleet-wide daily reports over a date range.
CREATE INDEX vehicle_telemetry_daily_bucket_idx ON vehicle_telemetry_daily (bucket);
