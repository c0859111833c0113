"""Documents kept in S3-compatible object storage: licences, registrations, insurance,
proofs of delivery, receipts, attached to a vehicle, driver, transport job, shipment or
maintenance record.

Modules, from the bottom: ``rules`` (kinds, owners, content types and sizes, keys; pure),
``storage`` (the bucket through aiobotocore), ``actors`` (who uploads), ``expiry`` (the
``document_expiring`` alerts), ``records`` (the ``documents`` rows, audited), ``transfer``
(upload, download, presigned PUT and attach, streaming with the SHA-256), ``command``
(``document.attach`` on the command topic), ``cleanup`` (what ``fleet maintain`` removes
from the bucket).
"""
