-- 0040: the outbound event stream's outbox, and the driver of a vehicle at a moment.
--
-- Every fact the pipeline publishes to FLEET_EVENTS_TOPIC (alert raised or resolved,
-- geofence entered or exited, trip or stop started or ended) is first inserted here in
-- the same transaction as the rows it describes, then published and marked. A worker
-- that dies between the commit and the publish leaves the row unpublished; the next
-- publisher sends it. The id is derived from the fact (fleet_telemetry.core.events), so a
-- replay or a recomputation of the same fact inserts nothing new and publishes no new id.

CREATE TABLE fleet_events (
    id           uuid PRIMARY KEY,
    type         text NOT NULL,
    vehicle_id   uuid NOT NULL,
    driver_id    uuid,
    -- Event time: the reading time the fact happened at.
    time         timestamptz NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set once the broker acknowledged the event; NULL: still to publish.
    published_at timestamptz,
    CONSTRAINT fleet_events_type_check CHECK (type IN (
        'alert.raised', 'alert.resolved', 'geofence.entered', 'geofence.exited',
        'trip.started', 'trip.ended', 'stop.started', 'stop.ended'))
);

-- The publisher's queue: small, as it holds unpublished events only.
CREATE INDEX fleet_events_unpublished_idx ON fleet_events (created_at) WHERE published_at IS NULL;
-- A vehicle's events in time order.
CREATE INDEX fleet_events_vehicle_idx ON fleet_events (vehicle_id, time);

-- The driver of the vehicle's assignment covering moment t ([start, end)), or NULL: an
-- ACTIVE one, or one COMPLETED since (`fleet assignments end` completes a booking, and a
-- fact recorded later for a moment inside it, a late reading or a lagging consumer's,
-- still belongs to its driver); CANCELLED bookings never happened. Served by
-- vehicle_assignments_vehicle_idx; STABLE so one statement calls it freely.
CREATE FUNCTION fleet_driver_at(vehicle uuid, t timestamptz) RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT a.driver_id FROM vehicle_assignments AS a
    WHERE a.vehicle_id = vehicle AND a.status IN ('ACTIVE', 'COMPLETED')
      AND a.start_time <= t AND (a.end_time IS NULL OR a.end_time > t)
    ORDER BY a.start_time DESC
    LIMIT 1
$$;
