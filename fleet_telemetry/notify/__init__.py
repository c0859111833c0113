"""``fleet notify``: the outbound events delivered to a webhook (docs/interface.md, "Webhooks").

:mod:`.signing` signs a body (and tells a receiver how to check it), :mod:`.webhook` sends
one request and sorts its outcome, :mod:`.delivery` delivers one event with retries,
repeats dropped and dead letters, and :mod:`.consumer` runs it on the events topic in the
shared Kafka loop.
"""
