"""One answer to "what kind of failure is this?", for the breaker, the error log and the CLI.

The distinction that matters on the request path: a reply that is merely *late* (our own deadline
expired, maybe because the app's event loop was busy) is an unknown outcome, not a Redis failure;
Redis *failing* is what its connection or its replies say.
"""

from __future__ import annotations

from enum import StrEnum

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
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
    if _is_cluster_refusal(exc):
        return FailureKind.REDIS
    if isinstance(exc, RedisError) and str(exc).startswith("CROSSSLOT"):
        # The same bug, as a node answers it on a lean connection (a plain error reply).
        return FailureKind.UNEXPECTED
    if isinstance(exc, ClusterCrossSlotError | RedisClusterException):
        # Keys of several slots in one call, a command the client cannot route: a bug in the
        # caller, which must surface instead of opening the breaker.
        return FailureKind.UNEXPECTED
    if isinstance(exc, RedisError | MalformedReplyError | ConnectionError):
        return FailureKind.REDIS
    if isinstance(exc, SQLAlchemyError):
        return FailureKind.DATABASE
    if isinstance(exc, OSError):
        return FailureKind.REDIS
    return FailureKind.UNEXPECTED


# What redis-py's cluster client says when no node can take a call: they are not RedisErrors,
# but they mean what a refused connection means.
_CLUSTER_REFUSALS = (
    "cannot be connected",
    "slots are not covered",
    "could not agree on a valid slots cache",
    "no targets were found",
)


def _is_cluster_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a cluster client's refusal because nodes are down or unmapped."""
    if isinstance(exc, SlotNotCoveredError):
        return True
    if type(exc) is not RedisClusterException:
        return False
    message = str(exc).lower()
    return any(refusal in message for refusal in _CLUSTER_REFUSALS)


class NotSentError(RedisConnectionError):
    """A connection to Redis could not be opened (or was closed by its owner): the call that
    needed it was never sent."""


class NotSentTimeoutError(RedisTimeoutError):
    """Opening a connection to Redis timed out: the call that needed it was never sent."""


class NodeDownError(NotSentError):
    """A primary of a Redis Cluster cannot take calls now, and ran none of this one: its last
    calls could not reach it and its back-off has not ended (the call was not sent), or it
    refused the call before running any of it because of its own state (loading its data, busy
    with a script, cut off from the cluster). See :class:`viewmw.node_connections.NodeConnections`.
    """


# Error replies Redis gives before it runs any of a script: the node is loading its data, busy
# with another script, a replica that lost its primary or cannot write, the cluster is down, the
# slot is elsewhere or moving, the script is not loaded. A replica refuses at the script's first
# write, before which it changed nothing. (Not OOM or NOPERM: Redis can raise those from a
# command inside a script that has already written.)
_REFUSED_BEFORE_RUNNING = (
    BusyLoadingError,
    ReadOnlyError,
    MasterDownError,
    ClusterDownError,
    MovedError,
    AskError,
    TryAgainError,
    NoScriptError,
)
_REFUSAL_CODES = tuple(
    f"{code} "
    for code in (
        "LOADING",
        "BUSY",
        "READONLY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "NOSCRIPT",
    )
)


def never_ran(exc: BaseException) -> bool:
    """Whether ``exc`` proves that Redis ran none of the call: it was never sent, or Redis
    refused it up front. A view whose call never ran can be kept elsewhere and offered again
    without being counted twice; any other failure leaves its outcome unknown."""
    if isinstance(exc, (NotSentError, NotSentTimeoutError, *_REFUSED_BEFORE_RUNNING)):
        return True
    # The lean connections pass error replies on as plain ResponseErrors, code included.
    if type(exc) is ResponseError:
        return str(exc).startswith(_REFUSAL_CODES)
    if isinstance(exc, MaxConnectionsError):  # redis-py's pool had no connection to give
        return True
    # redis-py opens a connection before it writes a command to it, and words its failure so
    # (one address or several); a blocking pool that had none to give says so too.
    if type(exc) is RedisConnectionError:
        text = str(exc)
        return text == "No connection available." or (
            text.startswith("Error ") and " connecting to " in text
        )
    return type(exc) is RedisTimeoutError and str(exc) == "Timeout connecting to server"
