"""Trips, stops, idling and the vehicles' odometer and engine hours.

:mod:`.model` and :mod:`.machine` are the pure state machine; :mod:`.store` keeps the
machine's state and its rows in PostgreSQL for the workers (:class:`.tracker.TripTracker`
is the workers' trips stage); :mod:`.recompute` runs the machine again over the raw rows
of a window that late readings touched (``fleet maintain``, ``fleet trips rebuild``).
"""
