"""Time-series lifecycle: partitions ahead, default-partition moves, rollups, retention.

- :mod:`~fleet_telemetry.lifecycle.policy`: the rules, pure (retentions, schedules, names);
- :mod:`~fleet_telemetry.lifecycle.locks`: the pass lock, the per-day rollup lock, short lock waits;
- :mod:`~fleet_telemetry.lifecycle.rollups`: incremental hourly and daily rollups, folds;
- :mod:`~fleet_telemetry.lifecycle.partitions`, :mod:`~fleet_telemetry.lifecycle.retention`,
  :mod:`~fleet_telemetry.lifecycle.stats`: the steps of a pass, over a
  :class:`~fleet_telemetry.lifecycle.context.PassContext`;
- :mod:`~fleet_telemetry.lifecycle.report`: what a pass did, as lines, JSON, log fields, metrics;
- :mod:`~fleet_telemetry.lifecycle.run`: one pass in order, and the passes of ``--every``.
"""
