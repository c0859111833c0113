-- 0003: operations and logistics (seed 2.3): customers, jobs, routes, shipments.

CREATE TABLE customers (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL,
    -- Free-form contact details: {"email": ..., "phone": ..., "person": ...}.
    contact_info    jsonb NOT NULL DEFAULT '{}',
    billing_address text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);

-- Customer search and sorted lists by name among live customers.
CREATE INDEX customers_name_idx ON customers (name) WHERE deleted_at IS NULL;

CREATE TRIGGER customers_touch_updated_at BEFORE UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


-- Not partitioned by created_at (see schema/README.md, Decisions).
CREATE TABLE transport_jobs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id  uuid NOT NULL REFERENCES customers (id),
    status       text NOT NULL DEFAULT 'pending',
    agreed_price numeric(12, 2),
    currency     text NOT NULL DEFAULT 'EUR',
    pickup_at    timestamptz,
    deliver_by   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz,
    CONSTRAINT transport_jobs_price_not_negative CHECK (agreed_price IS NULL OR agreed_price >= 0),
    CONSTRAINT transport_jobs_window_order
        CHECK (pickup_at IS NULL OR deliver_by IS NULL OR deliver_by > pickup_at)
);

-- A customer's jobs, newest first.
CREATE INDEX transport_jobs_customer_idx ON transport_jobs (customer_id, created_at DESC);
-- Dispatch board: open jobs by status (`WHERE status = 'pending' ORDER BY created_at`).
CREATE INDEX transport_jobs_status_idx ON transport_jobs (status, created_at) WHERE deleted_at IS NULL;

CREATE TRIGGER transport_jobs_touch_updated_at BEFORE UPDATE ON transport_jobs
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


CREATE TABLE routes (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id      uuid NOT NULL REFERENCES transport_jobs (id) ON DELETE CASCADE,
    origin      geometry(Point, 4326) NOT NULL,
    destination geometry(Point, 4326) NOT NULL,
    -- The planned path through the stops, origin to destination.
    waypoints   geometry(LineString, 4326),
    distance_km double precision,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT routes_distance_not_negative CHECK (distance_km IS NULL OR distance_km >= 0)
);

-- The route(s) of one job (seed: index on job_id).
CREATE INDEX routes_job_idx ON routes (job_id);

CREATE TRIGGER routes_touch_updated_at BEFORE UPDATE ON routes
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();


CREATE TABLE shipments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id      uuid NOT NULL REFERENCES transport_jobs (id) ON DELETE CASCADE,
    type        text NOT NULL DEFAULT 'general',
    weight_kg   numeric(12, 2),
    -- {"length_cm": ..., "width_cm": ..., "height_cm": ...}
    dimensions  jsonb NOT NULL DEFAULT '{}',
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT shipments_weight_not_negative CHECK (weight_kg IS NULL OR weight_kg >= 0)
);

-- The cargo of one job (seed: index on job_id).
CREATE INDEX shipments_job_idx ON shipments (job_id);

CREATE TRIGGER shipments_touch_updated_at BEFORE UPDATE ON shipments
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();
