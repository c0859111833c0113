"""The rules stage: geofences and alert rules over each stored batch.

In the order a batch meets them:

- :mod:`.engine`: :class:`RuleEngine`, the stage a worker runs after the sink;
- :mod:`.store`: the vehicles' rule states, cached and in PostgreSQL (optimistic concurrency);
- :mod:`.evaluate`: every rule over a batch, pure; the rules themselves in :mod:`.checks`,
  their data in :mod:`.model`;
- :mod:`.transitions`: each vehicle's side of each geofence (dwell, crossings), pure;
- :mod:`.index`, :mod:`.geometry`, :mod:`.wkb`: the geofences in memory, pure;
- :mod:`.alert_rows`, :mod:`.outcome`: a batch's transitions and alerts as rows;
- :mod:`.geo_sets`: the Redis ``geofence:{id}`` sets;
- :mod:`.timers`: the geofence refresh, the offline and maintenance checks;
- :mod:`.geofences`: adding, listing and removing geofences (``fleet geofences``).
"""

from __future__ import annotations

from fleet_telemetry.consumers.rules.engine import RuleEngine

__all__ = ["RuleEngine"]
