-- 0030: fleet operations: jobs tied to vehicles, idempotent commands, indexes of the
-- critical queries (seed 7.1 A and C), monthly revenue per vehicle.

-- A job is carried out under one assignment (a vehicle with its driver for a period);
-- that is what ties revenue to a vehicle. delivered_at dates the revenue.
ALTER TABLE transport_jobs
    ADD COLUMN assignment_id uuid REFERENCES vehicle_assignments (id),
    ADD COLUMN delivered_at  timestamptz;

-- "Is this assignment busy with a job": the nearest-driver search skips drivers whose
-- assignment has an open job (`WHERE assignment_id = $1 AND status IN ('assigned', 'in_transit')`).
CREATE INDEX transport_jobs_open_assignment_idx ON transport_jobs (assignment_id)
    WHERE status IN ('assigned', 'in_transit') AND deleted_at IS NULL;
-- Revenue over a period for the dashboard and the revenue view: `WHERE status = 'delivered' AND delivered_at >= $1`.
CREATE INDEX transport_jobs_delivered_idx ON transport_jobs (delivered_at)
    WHERE status = 'delivered' AND deleted_at IS NULL;

-- "Everything booked during [from, to)" across the fleet (availability of vehicles and
-- drivers): the exclusion constraints' indexes lead with vehicle_id / driver_id.
CREATE INDEX vehicle_assignments_active_period_gist ON vehicle_assignments
    USING gist (tstzrange(start_time, end_time, '[)')) WHERE status = 'ACTIVE';


-- One row per command id ever handled by the command consumer (docs/commands.md): a
-- redelivered or replayed command finds its row and is skipped. Written in the same
-- transaction as the command's effect (applied), or after its dead letter is acknowledged
-- (rejected).
CREATE TABLE processed_commands (
    command_id       uuid PRIMARY KEY,
    type             text NOT NULL,
    actor            text,
    outcome          text NOT NULL,
    -- For rejected commands: the dead-letter reason and its sentence.
    reason           text,
    detail           text,
    -- For applied commands: what the writer returned (ids of created rows).
    result           jsonb,
    source_topic     text,
    source_partition int,
    source_offset    bigint,
    processed_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT processed_commands_outcome_check CHECK (outcome IN ('applied', 'rejected'))
);

-- Pruning old idempotency entries: `DELETE ... WHERE processed_at < $cutoff`.
CREATE INDEX processed_commands_processed_at_idx ON processed_commands (processed_at);


-- Revenue per vehicle and month (UTC) from delivered jobs, per currency; with
-- monthly_vehicle_stats (costs) it makes "monthly profitability per vehicle" (seed 7.1 B).
-- Refreshed with monthly_vehicle_stats.
CREATE MATERIALIZED VIEW monthly_vehicle_revenue AS
SELECT a.vehicle_id,
       date_trunc('month', j.delivered_at AT TIME ZONE 'UTC')::date AS month,
       j.currency,
       coalesce(sum(j.agreed_price), 0)                             AS revenue,
       count(*)                                                     AS jobs
  FROM transport_jobs j
  JOIN vehicle_assignments a ON a.id = j.assignment_id
 WHERE j.status = 'delivered' AND j.deleted_at IS NULL AND j.delivered_at IS NOT NULL
 GROUP BY 1, 2, 3;

-- REFRESH MATERIALIZED VIEW CONCURRENTLY needs a unique index; also serves one vehicle's months.
CREATE UNIQUE INDEX monthly_vehicle_revenue_key ON monthly_vehicle_revenue (vehicle_id, month, currency);
-- Fleet-wide revenue per month: `WHERE month = $1`.
CREATE INDEX monthly_vehicle_revenue_month_idx ON monthly_vehicle_revenue (month);
