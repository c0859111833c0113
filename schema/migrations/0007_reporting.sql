-- 0007: reporting (seed 7.1 B): monthly maintenance cost per vehicle, refreshed by fleet maintain.

CREATE MATERIALIZED VIEW monthly_vehicle_stats AS
SELECT vehicle_id,
       date_trunc('month', date::timestamp)::date AS month,
       sum(cost)                       AS total_cost,
       count(*)                        AS records,
       max(date)                       AS last_service_date,
       max(odometer_km)                AS max_odometer_km
  FROM maintenance_records
 GROUP BY 1, 2;

-- REFRESH MATERIALIZED VIEW CONCURRENTLY needs a unique index; also serves one vehicle's months.
CREATE UNIQUE INDEX monthly_vehicle_stats_vehicle_month_key ON monthly_vehicle_stats (vehicle_id, month);
-- Fleet-wide cost per month for the dashboard: `WHERE month >= $1`.
CREATE INDEX monthly_vehicle_stats_month_idx ON monthly_vehicle_stats (month);
