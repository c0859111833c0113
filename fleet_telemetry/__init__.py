"""fleet-telemetry: event-driven telemetry ingestion for vehicle fleets.

Every import name of the distribution lives under this package. Floors, from the
ground up: :mod:`fleet_telemetry.core` (settings, errors, the reading type, retry,
metrics, logging; imports nothing else of the project), then the stages and domains
(:mod:`~fleet_telemetry.ingest`, :mod:`~fleet_telemetry.consumers`,
:mod:`~fleet_telemetry.replay`, :mod:`~fleet_telemetry.lifecycle`,
:mod:`~fleet_telemetry.fleetops`, :mod:`~fleet_telemetry.schema`,
:mod:`~fleet_telemetry.deploy`), and :mod:`fleet_telemetry.cli` on top, imported by
nothing. ``ingest``, ``consumers``, ``schema`` and ``deploy`` are folders at the
repository's top level, linked into this package.
"""

__version__ = "0.1.0"
