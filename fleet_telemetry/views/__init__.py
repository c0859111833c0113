"""What the pipeline decided, read for an operator: no SQL, no Kafka tools needed.

- :mod:`~fleet_telemetry.views.alerts`: alerts listed, shown, resolved (audited);
- :mod:`~fleet_telemetry.views.dead_letters`: the dead-letter topic read without a consumer group;
- :mod:`~fleet_telemetry.views.vehicle_status`: one vehicle's live status, position, driver, alerts;
- :mod:`~fleet_telemetry.views.system`: the whole system on one screen (``fleet status``).

The command line (``fleet alerts|dead-letters|status``, ``fleet vehicles status``) lives
in :mod:`fleet_telemetry.cli`; nothing here imports it.
"""
