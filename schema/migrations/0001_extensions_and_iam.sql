-- 0001: extensions, shared trigger function, identity and access (seed 2.1).

-- PostGIS: geometry(Point/Polygon/LineString, 4326) for readings, routes, geofences.
CREATE EXTENSION IF NOT EXISTS postgis;
-- btree_gist: lets a GiST exclusion constraint combine "uuid WITH =" and "range WITH &&".
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Keeps updated_at honest on every UPDATE, whoever writes the row.
CREATE FUNCTION fleet_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TABLE roles (
    id          smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    -- Array of "resource:action" strings ("*" = everything); test with `permissions ? 'vehicles:write'`.
    permissions jsonb NOT NULL DEFAULT '[]',
    CONSTRAINT roles_permissions_is_array CHECK (jsonb_typeof(permissions) = 'array')
);

INSERT INTO roles (name, description, permissions) VALUES
    ('admin', 'Everything, including users and roles', '["*"]'),
    ('fleet_manager', 'Vehicles, drivers, maintenance, geofences and reports',
     '["vehicles:read", "vehicles:write", "drivers:read", "drivers:write",
       "assignments:read", "assignments:write", "maintenance:read", "maintenance:write",
       "geofences:read", "geofences:write", "alerts:read", "alerts:resolve",
       "telemetry:read", "reports:read"]'),
    ('dispatcher', 'Jobs, routes, shipments and assignments',
     '["vehicles:read", "drivers:read", "assignments:read", "assignments:write",
       "customers:read", "customers:write", "jobs:read", "jobs:write",
       "alerts:read", "alerts:resolve", "telemetry:read"]'),
    ('driver', 'Own assignments and jobs',
     '["assignments:read_own", "jobs:read_own", "vehicles:read"]'),
    ('viewer', 'Read-only access to everything but users',
     '["vehicles:read", "drivers:read", "assignments:read", "customers:read", "jobs:read",
       "maintenance:read", "geofences:read", "alerts:read", "telemetry:read", "reports:read"]');

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL,
    password_hash text NOT NULL,
    -- users.role names a predefined role (seed: simplified RBAC); renaming a role follows.
    role          text NOT NULL DEFAULT 'viewer' REFERENCES roles (name) ON UPDATE CASCADE,
    is_active     boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);

-- Login lookup `WHERE lower(email) = lower($1) AND deleted_at IS NULL`; one live account per address.
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE deleted_at IS NULL;

CREATE TRIGGER users_touch_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION fleet_touch_updated_at();
