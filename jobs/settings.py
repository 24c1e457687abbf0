"""Worker settings: the broker, the schedule and the failure notification, from ``VIEWMW_*``.

Validated on import of :mod:`jobs`, so a bad value stops ``dramatiq jobs`` / ``periodiq jobs`` at
start-up with the variable named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from periodiq import CronSpec, cron

from viewmw.errors import ConfigurationError
from viewmw.settings import Settings

_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "stub")
DEFAULT_SYNC_CRON = "0 0 * * *"  # midnight
DEFAULT_CLEANUP_CRON = "30 0 * * *"  # after the sync


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the worker and the scheduler need beyond :class:`viewmw.Settings`.

    Attributes:
        broker_url: ``redis://…`` (Dramatiq's Redis broker), ``amqp://…`` (RabbitMQ) or
            ``stub://`` (in-process, for tests). Defaults to ``VIEWMW_REDIS_URL``.
        sync_cron: when the sync runs, as cron in ``VIEWMW_TIMEZONE`` (default midnight).
        cleanup_cron: when the cleanup runs (default half an hour after midnight).
        failure_hook: called once when a sync has failed all its retries: a dotted path
            ``package.module:function`` (called with a dict) or an ``http(s)://`` webhook URL
            (sent the same dict as JSON).
        retry_min_backoff_ms: first retry delay; later ones grow exponentially.
        sync_time_limit_ms: a sync running longer than this is stopped and retried.
    """

    broker_url: str
    sync_cron: str = DEFAULT_SYNC_CRON
    cleanup_cron: str = DEFAULT_CLEANUP_CRON
    failure_hook: str | None = None
    retry_min_backoff_ms: int = 15_000
    sync_time_limit_ms: int = 30 * 60_000

    @property
    def sync_schedule(self) -> CronSpec:
        """The sync's schedule as periodiq reads it."""
        return cron(self.sync_cron)

    @property
    def cleanup_schedule(self) -> CronSpec:
        """The cleanup's schedule as periodiq reads it."""
        return cron(self.cleanup_cron)

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> WorkerSettings:
        """Read ``VIEWMW_BROKER_URL``, ``VIEWMW_SYNC_CRON``, ``VIEWMW_CLEANUP_CRON``,
        ``VIEWMW_FAILURE_HOOK``, ``VIEWMW_RETRY_MIN_BACKOFF_MS``, ``VIEWMW_SYNC_TIME_LIMIT_MS``.

        Raises:
            ConfigurationError: naming the variable whose value is invalid.
        """
        env = os.environ if environ is None else environ
        broker_url = env.get("VIEWMW_BROKER_URL") or settings.redis_url
        if not broker_url:
            raise ConfigurationError(
                "VIEWMW_BROKER_URL", "is not set (nor VIEWMW_REDIS_URL): the worker needs a broker"
            )
        scheme = broker_url.partition("://")[0]
        if "://" not in broker_url or scheme not in _BROKER_SCHEMES:
            raise ConfigurationError(
                "VIEWMW_BROKER_URL",
                f"must be a redis://, amqp:// or stub:// URL, got {broker_url!r}",
            )
        values = {
            "broker_url": broker_url,
            "sync_cron": env.get("VIEWMW_SYNC_CRON", DEFAULT_SYNC_CRON),
            "cleanup_cron": env.get("VIEWMW_CLEANUP_CRON", DEFAULT_CLEANUP_CRON),
            "failure_hook": env.get("VIEWMW_FAILURE_HOOK") or None,
            "retry_min_backoff_ms": _positive(env, "VIEWMW_RETRY_MIN_BACKOFF_MS", 15_000),
            "sync_time_limit_ms": _positive(env, "VIEWMW_SYNC_TIME_LIMIT_MS", 30 * 60_000),
        }
        for name in ("sync_cron", "cleanup_cron"):
            try:
                cron(values[name])
            except Exception:
                raise ConfigurationError(
                    f"VIEWMW_{name.upper()}", f"is not a cron expression: {values[name]!r}"
                ) from None
        hook = values["failure_hook"]
        if hook is not None and not _valid_hook(str(hook)):
            raise ConfigurationError(
                "VIEWMW_FAILURE_HOOK", f"must be 'package.module:function' or a URL, got {hook!r}"
            )
        return cls(**values)  # type: ignore[arg-type]


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(name, f"must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(name, f"must be greater than 0, got {value}")
    return value


def _valid_hook(hook: str) -> bool:
    if hook.startswith(("http://", "https://")):
        return True
    module, sep, function = hook.partition(":")
    return bool(sep and module and function.isidentifier())
