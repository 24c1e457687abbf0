"""One answer to "what kind of failure is this?", for the breaker, the error log and the CLI.

The distinction that matters on the request path: a reply that is merely *late* (our own deadline
expired, maybe because the app's event loop was busy) is an unknown outcome, not a Redis failure;
Redis *failing* is what its connection or its replies say.
"""

from __future__ import annotations

from enum import StrEnum

from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import SQLAlchemyError

from viewmw.errors import InvalidKeyError, MalformedReplyError


class FailureKind(StrEnum):
    """Kinds of failure, as logged (``record.viewmw_error``) and classified."""

    LATE = "timeout"
    """Our deadline expired before the reply came: the outcome is unknown, nobody failed."""
    REDIS = "redis"
    """Redis refused, reset, closed, timed out on its socket, or answered something that does not
    parse: it counts against the breaker."""
    DATABASE = "database"
    INVALID_KEY = "invalid_key"
    UNEXPECTED = "unexpected"


def classify(exc: BaseException) -> FailureKind:
    """The kind of failure ``exc`` is."""
    if isinstance(exc, InvalidKeyError):
        return FailureKind.INVALID_KEY
    if isinstance(exc, RedisTimeoutError):
        # redis-py's socket timeout is a backstop far above the request deadline: Redis stalled.
        return FailureKind.REDIS
    if isinstance(exc, TimeoutError):
        return FailureKind.LATE
    # A cluster client's own refusals (no node serves a slot, the cluster cannot be mapped) are
    # not RedisErrors in redis-py, but they say the same thing: Redis cannot take the call.
    if isinstance(exc, RedisError | RedisClusterException | MalformedReplyError | ConnectionError):
        return FailureKind.REDIS
    if isinstance(exc, SQLAlchemyError):
        return FailureKind.DATABASE
    if isinstance(exc, OSError):
        return FailureKind.REDIS
    return FailureKind.UNEXPECTED
