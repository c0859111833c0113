"""Fleet operations: the small writers, their command consumer and the critical queries.

One module per domain (``vehicles``, ``drivers``, ``customers``, ``assignments``,
``jobs``, ``maintenance``); every writer takes an asyncpg connection to the primary,
runs in a transaction of its own (a savepoint when the caller already opened one) and
leaves an ``audit_logs`` row per change (``audit``). Bad input is answered with a
:class:`~fleet_telemetry.fleetops.errors.FleetOpsError` (exit status 2 on the command line, a
dead letter for a command). ``queries`` and ``dashboard`` read, ``db`` decides which
server serves a read and ``commands`` consumes the command topic. Input is checked by
``values`` (one value) and ``validation`` (whole records). The command line, ``fleet
vehicles|drivers|customers|assignments|jobs|maintenance|dashboard|commands``, lives in
:mod:`fleet_telemetry.cli.fleetops`; nothing here imports it.
"""
