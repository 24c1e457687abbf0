"""Redis outages: the breaker, the durable outbox, the replayer and the failover tracker.

- :mod:`~viewmw.outage.breaker`: decides whether a call may go to Redis (or the database).
- :mod:`~viewmw.outage.probe`: tells a slow Redis from a busy event loop, timed off the loop.
- :mod:`~viewmw.outage.outbox`: views offered while Redis is unreachable, kept in the database.
- :mod:`~viewmw.outage.replayer`: feeds those views through the recording script, exactly once.
- :mod:`~viewmw.outage.failover`: :class:`ResilientTracker`, the tracker the middleware uses.

Nothing is imported here, so that the tracker can use the breaker without an import cycle.
"""
