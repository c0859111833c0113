-- 0041: alerts and geofence transitions record their outbound events themselves.
--
-- Whoever raises or resolves an alert (the rules, the offline and maintenance checks,
-- `fleet alerts resolve`, any later writer) or inserts a geofence transition gets the
-- matching row in the fleet_events outbox (0040) in the same transaction, from the
-- triggers below; no writer has to remember it. Event ids are computed here exactly as
-- fleet_telemetry.core.events.event_id computes them in Python (UUIDv5), so the same fact
-- always has the same id, whichever side records it.
--
-- Alert events exist for vehicle alerts only (entity_type = 'vehicle'): an event is keyed
-- and ordered by its vehicle, and an alert about another kind of entity has none.

-- uuid_generate_v5: RFC 4122 name-based ids, as Python's uuid.uuid5.
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";

-- The id of one fact: UUIDv5 in the events' namespace of
-- 'type|vehicle|<time as 2026-11-25T08:00:00.000000Z>|fact' (core/events.py, event_id).
CREATE FUNCTION fleet_event_id(type text, vehicle uuid, t timestamptz, fact text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT uuid_generate_v5('6f3c2b1e-9a51-4c1b-8d0e-5b7f2a4c9e10'::uuid,
                            type || '|' || vehicle::text || '|'
                            || to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                            || '|' || fact)
$$;

-- A timestamp written as text into an alert's details (resolved_reading_time, back_at),
-- or NULL when it is absent or not a timestamp.
CREATE FUNCTION fleet_detail_time(details jsonb, name text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (details ->> name)::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

-- Inserts one event into the outbox; a fact recorded before (same id) inserts nothing.
CREATE FUNCTION fleet_record_event(type text, vehicle uuid, t timestamptz, fact text, data jsonb)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO fleet_events (id, type, vehicle_id, driver_id, time, data)
    VALUES (fleet_event_id(type, vehicle, t, fact), type, vehicle, fleet_driver_at(vehicle, t), t, data)
    ON CONFLICT (id) DO NOTHING
$$;

-- An alert's event data: what a subscriber needs without reading the alerts table.
CREATE FUNCTION fleet_alert_event_data(a alerts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'alert_id', a.id, 'alert_type', a.type, 'severity', a.severity,
        'geofence_id', a.geofence_id,
        'geofence_name', (SELECT g.name FROM geofences AS g WHERE g.id = a.geofence_id),
        'raised_at', a.raised_at, 'resolved_at', a.resolved_at, 'details', a.details)
$$;

-- alert.raised on every insert; alert.resolved too when the row is inserted resolved
-- (an alert raised and resolved within one batch). The fact is the alert's row id: two
-- alerts of one type, vehicle and time are two facts (an operator resolves an offline
-- alert and the check raises it again at the same last reading), and the id of a row
-- never changes, so a replay that inserts nothing records nothing.
-- Time: the reading that raised it (raised_at for alerts raised by the clock).
CREATE FUNCTION fleet_alert_raised_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.entity_type = 'vehicle' THEN
        PERFORM fleet_record_event('alert.raised', NEW.entity_id, coalesce(NEW.reading_time, NEW.raised_at),
                                   NEW.id::text, fleet_alert_event_data(NEW));
        IF NEW.is_resolved THEN
            PERFORM fleet_record_resolved_event(NEW);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- alert.resolved, at the reading that resolved it (details resolved_reading_time, or
-- back_at for an offline alert), else when it was resolved.
CREATE FUNCTION fleet_record_resolved_event(a alerts) RETURNS void
LANGUAGE sql AS $$
    SELECT fleet_record_event(
        'alert.resolved', a.entity_id,
        coalesce(fleet_detail_time(a.details, 'resolved_reading_time'), fleet_detail_time(a.details, 'back_at'),
                 a.resolved_at, now()),
        a.id::text, fleet_alert_event_data(a))
$$;

CREATE FUNCTION fleet_alert_resolved_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.entity_type = 'vehicle' THEN
        PERFORM fleet_record_resolved_event(NEW);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER alerts_raised_event AFTER INSERT ON alerts
    FOR EACH ROW EXECUTE FUNCTION fleet_alert_raised_event();
CREATE TRIGGER alerts_resolved_event AFTER UPDATE OF is_resolved ON alerts
    FOR EACH ROW WHEN (NEW.is_resolved AND NOT OLD.is_resolved) EXECUTE FUNCTION fleet_alert_resolved_event();

-- geofence.entered / geofence.exited at the transition's time. The fact is the geofence
-- id: with the type (the kind), the vehicle and the time it is the transition's identity
-- (geofence_transitions_identity_key), so the id is derived from the fact alone.
-- A statement trigger over the rows the statement inserted (a transition table): the rules
-- insert a batch's transitions in one statement, and a fleet's geofence traffic (one
-- reading in ten crossing a fence, in the benchmark) would otherwise pay a function call
-- per row. Rows ON CONFLICT DO NOTHING skipped are not in the transition table.
CREATE FUNCTION fleet_geofence_transition_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet_events (id, type, vehicle_id, driver_id, time, data)
    SELECT fleet_event_id(k.type, n.vehicle_id, n.time, n.geofence_id::text), k.type, n.vehicle_id,
           fleet_driver_at(n.vehicle_id, n.time), n.time,
           jsonb_build_object('geofence_id', n.geofence_id, 'geofence_name', g.name,
                              'lat', n.lat, 'lon', n.lon, 'crossing', n.crossing)
    FROM new_transitions AS n
    CROSS JOIN LATERAL (SELECT CASE n.kind WHEN 'enter' THEN 'geofence.entered' ELSE 'geofence.exited' END
                        AS type) AS k
    LEFT JOIN geofences AS g ON g.id = n.geofence_id
    ON CONFLICT (id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER geofence_transitions_event AFTER INSERT ON geofence_transitions
    REFERENCING NEW TABLE AS new_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION fleet_geofence_transition_events();
