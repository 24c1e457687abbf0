"""Worker settings: the broker, the schedule and the failure notification, from ``VIEWMW_*``.

Validated on import of :mod:`viewmw.jobs`, so a bad value stops ``dramatiq viewmw.jobs`` /
``periodiq viewmw.jobs`` at start-up with the variable named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from periodiq import CronSpec, cron

from viewmw.errors import ConfigurationError
from viewmw.metrics.endpoint import INSTALL_HINT
from viewmw.metrics.recording import prometheus_installed
from viewmw.settings import ENVIRONMENT, RedisClusterURL, Settings, read_environment

_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "stub")
DEFAULT_SYNC_CRON = "0 0 * * *"  # midnight
DEFAULT_CLEANUP_CRON = "30 0 * * *"  # after the sync
_SINGLE_BROKER = (
    "Dramatiq's Redis broker does not run on a Redis Cluster: set VIEWMW_BROKER_URL to a single "
    "Redis (redis://host:6379/0) or RabbitMQ (amqp://user:password@host:5672)"
)
# Whether VIEWMW_BROKER_URL was left unset (and so defaulted to the cluster) -> the message.
_CLUSTER_BROKER = {
    False: f"names a Redis Cluster, and {_SINGLE_BROKER}",
    True: f"is not set and VIEWMW_REDIS_URL names a Redis Cluster; {_SINGLE_BROKER}",
}


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the worker and the scheduler need beyond :class:`viewmw.Settings`.

    Attributes:
        broker_url: ``redis://…`` (Dramatiq's Redis broker), ``amqp://…`` (RabbitMQ) or
            ``stub://`` (in-process, for tests). Defaults to ``VIEWMW_REDIS_URL``; never a
            Redis Cluster, which Dramatiq's Redis broker does not run on: with a
            ``redis+cluster://`` ``VIEWMW_REDIS_URL``, set it to a single Redis or RabbitMQ.
        sync_cron: when the sync runs, as cron in ``VIEWMW_TIMEZONE`` (default midnight).
        cleanup_cron: when the cleanup runs (default half an hour after midnight).
        failure_hook: called once when a sync has failed all its retries: a dotted path
            ``package.module:function`` (called with a dict) or an ``http(s)://`` webhook URL
            (sent the same dict as JSON).
        retry_min_backoff_ms: first retry delay; later ones grow exponentially.
        sync_time_limit_ms: a sync running longer than this is stopped and retried.
        queue_name: the actors' queue (``VIEWMW_QUEUE_NAME``, derived from the key prefix).
        namespace: the Redis broker's key namespace (``VIEWMW_BROKER_NAMESPACE``, derived from
            the key prefix). Apps sharing one broker each get their own queue and namespace.
        metrics_port: where the worker exports viewmw's Prometheus metrics
            (``VIEWMW_METRICS_PORT``); ``None``, the default, exports none.
    """

    broker_url: str
    sync_cron: str = DEFAULT_SYNC_CRON
    cleanup_cron: str = DEFAULT_CLEANUP_CRON
    failure_hook: str | None = None
    retry_min_backoff_ms: int = 15_000
    sync_time_limit_ms: int = 30 * 60_000
    queue_name: str = "viewmw"
    namespace: str = "dramatiq"
    metrics_port: int | None = None

    @property
    def sync_schedule(self) -> CronSpec:
        """The sync's schedule as periodiq reads it."""
        return parse_cron(self.sync_cron)

    @property
    def cleanup_schedule(self) -> CronSpec:
        """The cleanup's schedule as periodiq reads it."""
        return parse_cron(self.cleanup_cron)

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> WorkerSettings:
        """Read the worker's ``VIEWMW_*`` variables (the ``"worker"`` group of
        :data:`viewmw.settings.ENVIRONMENT`): the broker, the two schedules, the failure hook,
        the retry back-off, the time limit and the metrics port.

        Raises:
            ConfigurationError: naming the variable whose value is invalid.
        """
        values = read_environment("worker", environ)
        broker_url = values.get("broker_url") or settings.redis_url
        if not broker_url:
            raise ConfigurationError(
                "VIEWMW_BROKER_URL", "is not set (nor VIEWMW_REDIS_URL): the worker needs a broker"
            )
        if RedisClusterURL.is_cluster_url(broker_url):
            unset = not values.get("broker_url")
            raise ConfigurationError("VIEWMW_BROKER_URL", _CLUSTER_BROKER[unset])
        scheme = broker_url.partition("://")[0]
        if "://" not in broker_url or scheme not in _BROKER_SCHEMES:
            raise ConfigurationError(
                "VIEWMW_BROKER_URL",
                f"must be a redis://, amqp:// or stub:// URL, got {broker_url!r}",
            )
        for name in ("sync_cron", "cleanup_cron"):
            if name in values:
                try:
                    parse_cron(values[name])
                except Exception:
                    raise ConfigurationError(
                        f"VIEWMW_{name.upper()}",
                        "is not a cron expression (minute hour day month weekday):"
                        f" {values[name]!r}",
                    ) from None
        if values.get("metrics_port") is not None and not prometheus_installed():
            raise ConfigurationError("VIEWMW_METRICS_PORT", INSTALL_HINT)
        return cls(
            **{
                **values,
                "broker_url": broker_url,
                "queue_name": settings.dramatiq_queue_name,
                "namespace": settings.dramatiq_namespace,
            }
        )


_WORKER_FIELDS = {variable.field for variable in ENVIRONMENT if variable.group == "worker"}
assert {f.name for f in fields(WorkerSettings)} >= _WORKER_FIELDS, "every variable maps to a field"


# (name, lowest, highest) of the five cron fields, in order.
_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("dom", 1, 31),
    ("month", 1, 12),
    ("dow", 0, 7),
)


def parse_cron(text: str) -> CronSpec:
    """periodiq's :class:`CronSpec` for ``text``, checked and with Sunday made reliable.

    periodiq accepts values out of range (``61 0 * * *``) and extra fields without complaint, and
    such a schedule never fires; it also never matches a Sunday written as ``0`` (``@weekly``,
    ``sun``) and finds Sundays late when written as ``7``. Both spellings are made to mean both.

    Raises:
        ValueError: ``text`` is not a five-field cron expression (or an ``@daily``-style name).
    """
    text = text.strip()
    if not text.startswith("@") and len(text.split()) != len(_CRON_FIELDS):
        raise ValueError(f"expected {len(_CRON_FIELDS)} fields, got {text!r}")
    spec = cron(text)
    for name, lowest, highest in _CRON_FIELDS:
        values = getattr(spec, name)
        if not values or values[0] < lowest or values[-1] > highest:
            raise ValueError(f"{name} must be within {lowest}-{highest}, got {text!r}")
    if 0 in spec.dow or 7 in spec.dow:
        spec = spec.replace(dow=sorted({*spec.dow, 0, 7}))
        spec.parsed_from = text
        # periodiq counts values; 0 and 7 are one day ("0 0 1 * 0-5" restricts the weekday).
        spec.is_dow_restricted = len({day % 7 for day in spec.dow}) < 7
    return spec
