-- 0043: driver behaviour: the driver on every vehicle alert, and daily driver scores
-- (schema/README.md, "Driver behaviour").

-- The driver of the vehicle's ACTIVE assignment when the alert happened (its reading time,
-- or when it was raised for the alerts of the timers), as recorded at insert; NULL: no
-- driver on duty, or not a vehicle alert.
ALTER TABLE alerts ADD COLUMN driver_id uuid REFERENCES drivers (id);

-- Fills alerts.driver_id for every writer that leaves it NULL (the rules, the timers, and
-- any writer added later), from fleet_driver_at (0040).
CREATE FUNCTION fleet_alerts_fill_driver() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.driver_id IS NULL AND NEW.entity_type = 'vehicle' THEN
        NEW.driver_id := fleet_driver_at(NEW.entity_id, coalesce(NEW.reading_time, NEW.raised_at));
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER alerts_fill_driver BEFORE INSERT ON alerts
    FOR EACH ROW EXECUTE FUNCTION fleet_alerts_fill_driver();

-- The alerts raised before this migration get the driver the trigger would have given them.
UPDATE alerts SET driver_id = fleet_driver_at(entity_id, coalesce(reading_time, raised_at))
WHERE entity_type = 'vehicle' AND driver_id IS NULL;

-- A driver's alerts, newest first (`fleet alerts list` for one driver, the driver's history).
CREATE INDEX alerts_driver_idx ON alerts (driver_id, reading_time DESC) WHERE driver_id IS NOT NULL;
-- The score of one day reads that day's behaviour alerts: `WHERE type IN (...) AND reading_time in [day, day + 1)`.
CREATE INDEX alerts_behaviour_time_idx ON alerts (reading_time)
    WHERE type IN ('harsh_braking', 'harsh_acceleration', 'overspeed');


-- One row per driver and UTC day they drove or had a behaviour alert on one of their
-- bookings (ACTIVE or COMPLETED), recomputed by `fleet maintain` for the days whose
-- telemetry, behaviour alerts or bookings changed.
CREATE TABLE driver_daily_scores (
    driver_id          uuid NOT NULL REFERENCES drivers (id),
    day                date NOT NULL,
    -- The sum of the day's driver_hourly_distance: steps between consecutive readings inside
    -- the driver's bookings, GPS jumps left out; to the metre.
    distance_km        double precision NOT NULL,
    harsh_braking      integer NOT NULL,
    harsh_acceleration integer NOT NULL,
    -- Behaviour alerts (by reading time) inside the driver's bookings; overspeed counts the
    -- global limit's alerts and the geofences' own.
    overspeed          integer NOT NULL,
    -- With the FLEET_BEHAVIOUR_PENALTY_* of the pass that computed the row.
    penalty_points     double precision NOT NULL,
    -- max(0, 100 - penalty_points per 100 km); NULL when no distance was driven.
    score              double precision,
    computed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (driver_id, day),
    CONSTRAINT driver_daily_scores_counts_check
        CHECK (distance_km >= 0 AND harsh_braking >= 0 AND harsh_acceleration >= 0 AND overspeed >= 0),
    CONSTRAINT driver_daily_scores_score_check CHECK (score BETWEEN 0 AND 100)
);

-- Every driver over a period (`fleet drivers scores` without --driver) and the
-- recompute of one day (`WHERE day = $1`); one driver's period uses the primary key.
CREATE INDEX driver_daily_scores_day_idx ON driver_daily_scores (day);


-- Each driver's distance per UTC hour and vehicle (steps ending in that hour, inside
-- the driver's bookings): a day's distance is the sum of its hours, so a pass recomputes
-- only the hours that changed. Kept while the raw readings are (the raw horizon).
CREATE TABLE driver_hourly_distance (
    hour       timestamptz NOT NULL,
    driver_id  uuid NOT NULL REFERENCES drivers (id),
    vehicle_id uuid NOT NULL,
    distance_m double precision NOT NULL,
    -- Leads with the hour: one hour's rows are replaced, one day's summed, old ones removed.
    PRIMARY KEY (hour, driver_id, vehicle_id),
    CONSTRAINT driver_hourly_distance_on_the_hour CHECK (hour = date_trunc('hour', hour, 'UTC'))
);


-- Hours whose distances, and days whose scores, must be recomputed, marked by the triggers
-- below in the transaction of the change. `fleet maintain` moves them into
-- driver_score_queue in a short transaction that first waits for the transactions that
-- already marked (LOCK ... IN EXCLUSIVE MODE, like telemetry_dirty_hours), then
-- recomputes day by day.
CREATE TABLE driver_score_dirty_hours (
    hour      timestamptz PRIMARY KEY,
    marked_at timestamptz NOT NULL DEFAULT now()
);

-- The hours whose raw readings are kept and rolled up already are scored by the next pass.
INSERT INTO driver_score_dirty_hours (hour)
SELECT DISTINCT h.bucket
  FROM vehicle_telemetry_hourly AS h, telemetry_lifecycle AS l
 WHERE h.bucket >= l.raw_horizon
ON CONFLICT (hour) DO NOTHING;

-- Hours claimed and not yet recomputed; a crash between the claim and the recompute loses nothing.
CREATE TABLE driver_score_queue (
    hour      timestamptz PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- A behaviour alert marks its hour (its day's counts change).
CREATE FUNCTION fleet_mark_score_hour_of_alert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO driver_score_dirty_hours (hour) VALUES (date_trunc('hour', NEW.reading_time, 'UTC'))
    ON CONFLICT (hour) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER alerts_mark_score_hour AFTER INSERT ON alerts
    FOR EACH ROW
    WHEN (NEW.type IN ('harsh_braking', 'harsh_acceleration', 'overspeed') AND NEW.reading_time IS NOT NULL)
    EXECUTE FUNCTION fleet_mark_score_hour_of_alert();

-- Telemetry hours queued for the rollups mark themselves and the next hour, whose first
-- step may start in them: whatever queued them (the sink's dirty hours, a backfill, rows
-- moved out of a default partition), the raw rows changed.
CREATE FUNCTION fleet_mark_score_hours_of_telemetry() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO driver_score_dirty_hours (hour)
    SELECT DISTINCT h FROM queued_hours AS q, LATERAL (VALUES (q.hour), (q.hour + interval '1 hour')) AS v(h)
    ON CONFLICT (hour) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER telemetry_rollup_queue_mark_score_hours AFTER INSERT ON telemetry_rollup_queue
    REFERENCING NEW TABLE AS queued_hours
    FOR EACH STATEMENT EXECUTE FUNCTION fleet_mark_score_hours_of_telemetry();

-- A booking made, moved, ended or cancelled marks the past hours whose attribution it
-- changes. The scores count ACTIVE and COMPLETED bookings alike (a COMPLETED one was driven,
-- a CANCELLED one never was): the whole period of the old and of the new row when the
-- vehicle, the driver or whether it counts changed, else only the hours between the old
-- and the new start and between the old and the new end.
CREATE FUNCTION fleet_mark_score_hours_of_assignment() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_span tstzrange;
    new_span tstzrange;
    spans    tstzrange[];
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status <> 'CANCELLED' THEN
        old_span := tstzrange(OLD.start_time, OLD.end_time, '[)');
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status <> 'CANCELLED' THEN
        new_span := tstzrange(NEW.start_time, NEW.end_time, '[)');
    END IF;
    IF old_span IS NOT NULL AND new_span IS NOT NULL
       AND (OLD.vehicle_id, OLD.driver_id) = (NEW.vehicle_id, NEW.driver_id) THEN
        IF OLD.start_time = NEW.start_time AND OLD.end_time IS NOT DISTINCT FROM NEW.end_time THEN
            RETURN NULL;
        END IF;
        spans := ARRAY[
            tstzrange(least(OLD.start_time, NEW.start_time), greatest(OLD.start_time, NEW.start_time), '[]'),
            tstzrange(least(coalesce(OLD.end_time, 'infinity'), coalesce(NEW.end_time, 'infinity')),
                      greatest(coalesce(OLD.end_time, 'infinity'), coalesce(NEW.end_time, 'infinity')), '[]')];
        IF OLD.start_time = NEW.start_time THEN
            spans := spans[2:2];
        ELSIF OLD.end_time IS NOT DISTINCT FROM NEW.end_time THEN
            spans := spans[1:1];
        END IF;
    ELSE
        spans := array_remove(ARRAY[old_span, new_span], NULL);
    END IF;
    INSERT INTO driver_score_dirty_hours (hour)
    SELECT DISTINCT h
      FROM unnest(spans) AS s(span)
     CROSS JOIN LATERAL generate_series(
            date_trunc('hour', lower(s.span), 'UTC'),
            date_trunc('hour', least(coalesce(upper(s.span), now()), now()), 'UTC'),
            interval '1 hour') AS h
     WHERE lower(s.span) <= now()
    ON CONFLICT (hour) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER vehicle_assignments_mark_score_hours AFTER INSERT OR UPDATE OR DELETE ON vehicle_assignments
    FOR EACH ROW EXECUTE FUNCTION fleet_mark_score_hours_of_assignment();
