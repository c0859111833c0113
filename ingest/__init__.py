"""Edge side of the fleet telemetry pipeline and the contract every stage shares.

``ingest.settings`` is the one place configuration is read; ``ingest.reading`` is the
telemetry reading as every stage sees it once it has been decoded.
"""
