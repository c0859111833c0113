-- 0050: documents kept in S3-compatible object storage (licences, registrations, insurance,
-- proofs of delivery, receipts), shipments that can be delivered, and document-expiry alerts.
--
-- The bytes live in the bucket FLEET_S3_BUCKET under object_key; this table is what makes an
-- object a document. An object is uploaded first and the row inserted after, so an
-- interrupted upload leaves an object no row refers to, which `fleet maintain` removes once
-- it is older than FLEET_DOCUMENT_ORPHAN_GRACE_HOURS.

CREATE TABLE documents (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The owner: exactly one of these five, each a real foreign key, so the reference is
    -- checked on insert and holds for as long as the row lives.
    vehicle_id            uuid REFERENCES vehicles (id),
    driver_id             uuid REFERENCES drivers (id),
    transport_job_id      uuid REFERENCES transport_jobs (id),
    shipment_id           uuid REFERENCES shipments (id),
    maintenance_record_id uuid REFERENCES maintenance_records (id),
    -- The owner as one pair, derived from the column set above (what queries and alerts use).
    owner_type            text GENERATED ALWAYS AS (
        CASE WHEN vehicle_id IS NOT NULL THEN 'vehicle'
             WHEN driver_id IS NOT NULL THEN 'driver'
             WHEN transport_job_id IS NOT NULL THEN 'transport_job'
             WHEN shipment_id IS NOT NULL THEN 'shipment'
             ELSE 'maintenance_record' END) STORED,
    owner_id              uuid GENERATED ALWAYS AS (
        coalesce(vehicle_id, driver_id, transport_job_id, shipment_id, maintenance_record_id)) STORED,
    kind                  text NOT NULL,
    object_key            text NOT NULL,
    -- Lower-case hex SHA-256 of the object's bytes, computed while they streamed.
    sha256                text NOT NULL,
    size_bytes            bigint NOT NULL,
    -- Detected from the first bytes, never taken from the client.
    content_type          text NOT NULL,
    file_name             text NOT NULL,
    uploaded_by           uuid NOT NULL REFERENCES users (id),
    created_at            timestamptz NOT NULL DEFAULT now(),
    -- A licence's, registration's or insurance's last valid day.
    expires_on            date,
    deleted_at            timestamptz,
    -- When `fleet maintain` removed the object of the deleted document (the row stays).
    object_removed_at     timestamptz,
    CONSTRAINT documents_one_owner CHECK (
        num_nonnulls(vehicle_id, driver_id, transport_job_id, shipment_id, maintenance_record_id) = 1),
    CONSTRAINT documents_kind_check CHECK (
        kind IN ('licence', 'registration', 'insurance', 'proof_of_delivery', 'receipt', 'other')),
    CONSTRAINT documents_sha256_hex CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT documents_size_not_negative CHECK (size_bytes >= 0),
    CONSTRAINT documents_file_name_check CHECK (length(file_name) BETWEEN 1 AND 255)
);

-- One object is one document, deleted or not (maintain removes an object only once its row allows).
CREATE UNIQUE INDEX documents_object_key_key ON documents (object_key);
-- The same content for the same owner and kind is stored once: the upload finds the existing
-- row, and two concurrent uploads of it cannot both insert.
CREATE UNIQUE INDEX documents_same_content ON documents (owner_id, kind, sha256) WHERE deleted_at IS NULL;
-- An owner's documents newest first (fleet documents list), and "the newest of this kind".
CREATE INDEX documents_owner_idx ON documents (owner_id, kind, created_at DESC) WHERE deleted_at IS NULL;
-- The expiry check: live documents with an expiry date, by date.
CREATE INDEX documents_expiring_idx ON documents (expires_on)
    WHERE deleted_at IS NULL AND expires_on IS NOT NULL;
-- maintain: deleted documents whose objects are still to remove once past the grace period.
CREATE INDEX documents_deleted_idx ON documents (deleted_at)
    WHERE deleted_at IS NOT NULL AND object_removed_at IS NULL;


-- A shipment is delivered when its proof of delivery is attached (or by hand).
ALTER TABLE shipments
    ADD COLUMN status text NOT NULL DEFAULT 'pending',
    ADD COLUMN delivered_at timestamptz,
    ADD CONSTRAINT shipments_status_check CHECK (status IN ('pending', 'delivered')),
    ADD CONSTRAINT shipments_delivered_at_check CHECK ((status = 'delivered') = (delivered_at IS NOT NULL));


-- Expiry alerts are one open alert per document, not per owner: an owner may have a licence
-- and an insurance expiring at once. alerts_one_open therefore leaves them out, and
-- alerts_one_open_document keys them by details->>'document_id'. The rules raise with
-- `ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved AND type <> 'document_expiring'`.
DROP INDEX alerts_one_open;
-- The rules' and timers' raises: one open alert per entity, type and geofence.
CREATE UNIQUE INDEX alerts_one_open ON alerts (entity_id, type, coalesce(geofence_id, 0))
    WHERE NOT is_resolved AND type <> 'document_expiring';
-- The expiry check's raises (fleet maintain): one open alert per document.
CREATE UNIQUE INDEX alerts_one_open_document ON alerts ((details ->> 'document_id'))
    WHERE NOT is_resolved AND type = 'document_expiring';
