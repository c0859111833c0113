-- 0006: audit trail, partitioned by month (seed 4.1).

CREATE TABLE audit_logs (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Who did it: a user id, email or a service name such as 'fleet-consumer'.
    actor       text,
    action      text NOT NULL,
    entity_type text,
    entity_id   text,
    before      jsonb,
    after       jsonb,
    -- A primary key of a partitioned table must contain the partition key.
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- "History of this vehicle/driver/job", newest first.
CREATE INDEX audit_logs_entity_idx ON audit_logs (entity_type, entity_id, created_at DESC);
-- "What did this user do", newest first.
CREATE INDEX audit_logs_actor_idx ON audit_logs (actor, created_at DESC);

-- Catch-all, so an audit write never fails for want of a partition.
CREATE TABLE audit_logs_default PARTITION OF audit_logs DEFAULT;

-- Creates the missing monthly partitions audit_logs_pYYYYMM (UTC months) covering
-- p_from..p_to inclusive and returns how many it created. Safe to call concurrently.
CREATE FUNCTION fleet_ensure_audit_partitions(p_from date, p_to date) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_month   date;
    v_created int := 0;
BEGIN
    IF p_to < p_from THEN
        RAISE EXCEPTION 'fleet_ensure_audit_partitions: p_to (%) is before p_from (%)', p_to, p_from;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('fleet_partitions'), hashtext('audit_logs'));
    FOR v_month IN
        SELECT generate_series(date_trunc('month', p_from::timestamp), p_to::timestamp,
                               interval '1 month')::date
    LOOP
        IF fleet_create_range_partition(
               'audit_logs', 'audit_logs_p' || to_char(v_month, 'YYYYMM'), 'created_at',
               v_month::timestamp AT TIME ZONE 'UTC',
               (v_month + interval '1 month') AT TIME ZONE 'UTC') THEN
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END;
$$;

-- The current month and two ahead; fleet maintain keeps creating them.
SELECT fleet_ensure_audit_partitions(
    (now() AT TIME ZONE 'UTC')::date, ((now() AT TIME ZONE 'UTC')::date + interval '2 months')::date);
