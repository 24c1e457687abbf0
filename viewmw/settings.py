"""Configuration: the abuse limits and everything else viewmw needs, read once at start-up.

Every value is validated when the object is built, so a bad setting stops the process at start-up
with an error that names the setting (or the ``VIEWMW_*`` variable it came from), never at the
first request.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.connection import parse_url
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from starlette.config import Config, Environ

from viewmw.errors import ConfigurationError
from viewmw.shards import DEFAULT_CLUSTER_SHARDS, MAX_CLUSTER_SHARDS, ContentShards

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///viewmw.sqlite3"
"""The embedded database: only when Redis is embedded too (no ``redis_url``), as in the example."""
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# A Redis Cluster: the scheme names the nodes' protocol, "+cluster" that they form a cluster.
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
_CLUSTER_NODE = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?"
)
_QUEUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,99}")  # what Dramatiq accepts, bounded
_NAMESPACE = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9._-]+:?")
_MODULE_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_TABLE_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\.[A-Za-z_][A-Za-z0-9_]{0,62}")
# Synchronous driver names users often paste, mapped to the async driver viewmw runs on.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}
# Async drivers SQLAlchemy can run viewmw on; any other driver would fail at the first query.
_SUPPORTED_DRIVERS = ("postgresql+asyncpg", "postgresql+psycopg", "sqlite+aiosqlite")


@dataclass(frozen=True, slots=True)
class Limits:
    """The abuse rules. ``0`` or ``None`` disables a limit; ``one_view_per_day=False`` its rule.

    Attributes:
        max_views_per_session: counted views of one content by one viewer per session window.
        session_seconds: length of that window, starting at the viewer's first counted view.
        max_daily_views_per_user: counted views per viewer per calendar day, all content together.
        one_view_per_day: a viewer counts at most once per content per calendar day.
        view_cooldown_seconds: no counted view of the same content by the same viewer within this
            many seconds of the last counted one.
    """

    max_views_per_session: int | None = 3
    session_seconds: int = 24 * 3600
    max_daily_views_per_user: int | None = 100
    one_view_per_day: bool = True
    view_cooldown_seconds: int | None = 300

    def __post_init__(self) -> None:
        for name in ("max_views_per_session", "max_daily_views_per_user", "view_cooldown_seconds"):
            _check_count(name, getattr(self, name), allow_none=True)
        _check_count("session_seconds", self.session_seconds, allow_none=False)
        if self.session_seconds == 0:
            raise ConfigurationError("session_seconds", "must be greater than 0")
        if not isinstance(self.one_view_per_day, bool):
            raise ConfigurationError("one_view_per_day", "must be true or false")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything viewmw is configured with. Build it directly or with :meth:`from_env`.

    Attributes:
        limits: the abuse rules.
        timezone: IANA zone in which calendar days (daily limits, one view per day) begin.
        key_prefix: prepended to every Redis key, to share a Redis with other applications.
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL; ``None`` lets the caller pick an
            embedded stand-in (the example app uses fakeredis). A Redis Cluster is
            ``redis+cluster://host:port,host:port`` (``rediss+cluster://`` for TLS), parsed into
            :attr:`redis_cluster` (the app, the command and the worker run on it; see
            docs/keys.md, "Redis Cluster").
        database_url: SQLAlchemy URL; synchronous driver names are switched to their async driver
            (``postgresql://`` runs on asyncpg, ``sqlite://`` on aiosqlite). Empty: the embedded
            SQLite file ``viewmw.sqlite3``, but only while Redis is embedded too (no
            ``redis_url``); see :meth:`resolved_database_url`.
        secret: key for hashing anonymous viewers. ``None`` makes a random one per process, which
            suits one process but splits anonymous viewers across several: set it in production.
        redis_timeout: seconds a request waits for Redis' reply before it is answered without a
            count. A late reply is not a failure: the script still decides that view.
        redis_probe_timeout: seconds Redis has to answer a ``PING`` timed off the event loop;
            only a probe that fails opens the breaker for slowness (see docs/outages.md).
        database_timeout: seconds background work (syncs, commands, replays) may wait on the
            database.
        database_request_timeout: seconds a request may wait on the database (count reads on a
            cache miss, outbox writes during a Redis outage); then the count is left out.
        content_tables: content type -> ``"table.count_column"`` of a table of the app's own whose
            one-column primary key is the content id (``{"story": "stories.view_count"}``); the
            key's real type (integer, string, UUID) is read from the database on first use.
            Other types are counted in viewmw's generic table.
        content_tables_module: ``"package.module:name"`` of a mapping content type -> count
            column (a SQLAlchemy ``Column`` or ``"table.column"``), imported to fill
            ``content_tables``: one declaration that the app, the command and the worker all
            read. Set this or ``content_tables``, not both.
        queue_name: the Dramatiq queue of the sync actors. Empty: ``viewmw``, or
            ``viewmw-{prefix}`` with a key prefix, so apps sharing a broker never take each
            other's syncs (see :attr:`dramatiq_queue_name`).
        broker_namespace: the Redis broker's key namespace. Empty: ``dramatiq``, or
            ``dramatiq-{prefix}`` with a key prefix (see :attr:`dramatiq_namespace`).
        unique_viewers: count the distinct viewers of each content per day (a HyperLogLog per
            content per day in Redis, kept in the history by the sync; see docs/history.md).
        history_retention_days: days the per-day Redis keys (viewers, rankings, blocked counts)
            live past their day. A sync must run within it for rankings and unique viewers to
            be complete.
        cluster_shards: content shards on a Redis Cluster (read only with a ``redis+cluster://``
            URL): how many slots each content type's keys spread over (docs/keys.md). Changing
            it moves every content to another shard: it is a migration, never a restart.
    """

    limits: Limits = field(default_factory=Limits)
    timezone: str = "UTC"
    key_prefix: str = ""
    redis_url: str | None = None
    database_url: str = ""
    secret: str | None = None
    redis_timeout: float = 0.25
    redis_probe_timeout: float = 2.0
    database_timeout: float = 5.0
    database_request_timeout: float = 0.1
    content_tables: Mapping[str, str] = field(default_factory=dict)
    content_tables_module: str | None = None
    queue_name: str = ""
    broker_namespace: str = ""
    unique_viewers: bool = True
    history_retention_days: int = 8
    cluster_shards: int = DEFAULT_CLUSTER_SHARDS

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError("timezone", f"unknown time zone {self.timezone!r}") from exc
        _check_key_prefix(self.key_prefix)
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)
        if self.database_url:
            object.__setattr__(self, "database_url", _async_database_url(self.database_url))
        for name in (
            "redis_timeout",
            "redis_probe_timeout",
            "database_timeout",
            "database_request_timeout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(
                    name, f"must be a positive number of seconds, got {value!r}"
                )
        if not isinstance(self.unique_viewers, bool):
            raise ConfigurationError("unique_viewers", "must be true or false")
        _check_count("history_retention_days", self.history_retention_days, allow_none=False)
        if self.history_retention_days < 1:
            raise ConfigurationError("history_retention_days", "must be at least 1")
        _check_count("cluster_shards", self.cluster_shards, allow_none=False)
        if not 1 <= self.cluster_shards <= MAX_CLUSTER_SHARDS:
            raise ConfigurationError("cluster_shards", f"must be 1 to {MAX_CLUSTER_SHARDS}")
        if self.secret is not None and len(self.secret) < 16:
            raise ConfigurationError("secret", "must be at least 16 characters long")
        tables = _check_content_tables(self.content_tables)
        if self.content_tables_module is not None:
            declared = _check_content_tables(_import_content_tables(self.content_tables_module))
            if tables and tables != declared:
                raise ConfigurationError(
                    "content_tables",
                    "is declared twice (content_tables and content_tables_module), differently: "
                    "keep one declaration",
                )
            tables = declared
        object.__setattr__(self, "content_tables", tables)
        if self.queue_name and not _QUEUE_NAME.fullmatch(self.queue_name):
            raise ConfigurationError(
                "queue_name", "must be letters, digits, '.', '_' or '-', starting with a letter"
            )
        if self.broker_namespace and not _NAMESPACE.fullmatch(self.broker_namespace):
            raise ConfigurationError(
                "broker_namespace", "must be 1-100 letters, digits, '.', '_', ':' or '-'"
            )

    def content_shards(self) -> ContentShards:
        """The content shards of the configured Redis: :attr:`cluster_shards` of them on a
        cluster, one untagged shard (every key with its usual name) on a single Redis."""
        count = self.cluster_shards if self.redis_cluster is not None else None
        return ContentShards(self.key_prefix, count)

    @property
    def redis_cluster(self) -> RedisClusterURL | None:
        """:attr:`redis_url` taken apart when it names a Redis Cluster, else ``None``."""
        if self.redis_url is None or not RedisClusterURL.is_cluster_url(self.redis_url):
            return None
        return RedisClusterURL.parse(self.redis_url)

    def resolved_database_url(self) -> str:
        """The database to write counts to: ``database_url``, else the embedded SQLite file.

        Raises:
            ConfigurationError: no database URL is set while Redis is a real server: the
                embedded SQLite file would quietly take the views of a real deployment.
        """
        if self.database_url:
            return self.database_url
        if self.redis_url is None:
            return DEFAULT_DATABASE_URL
        raise ConfigurationError(
            "database_url",
            "is not set: set VIEWMW_DATABASE_URL (or database_url) to the database your app reads "
            "its counts from, e.g. postgresql://app@db.internal/app. The embedded SQLite file "
            "serves only with the embedded Redis (no VIEWMW_REDIS_URL).",
        )

    @property
    def dramatiq_queue_name(self) -> str:
        """``queue_name``, or one derived from the key prefix."""
        return self.queue_name or _derived_name("viewmw", self.key_prefix)

    @property
    def dramatiq_namespace(self) -> str:
        """``broker_namespace``, or one derived from the key prefix."""
        return self.broker_namespace or _derived_name("dramatiq", self.key_prefix)

    @property
    def zone(self) -> ZoneInfo:
        """The configured time zone as a :class:`zoneinfo.ZoneInfo`."""
        return ZoneInfo(self.timezone)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``VIEWMW_*`` variables (see :data:`ENVIRONMENT`); unset ones keep their defaults.

        Raises:
            ConfigurationError: naming the variable whose value is invalid.
        """
        limits = read_environment("limits", environ)
        values = read_environment("settings", environ)
        try:
            return cls(limits=Limits(**limits), **values)
        except ConfigurationError as exc:
            variable = _VARIABLE_BY_FIELD[exc.setting]
            raise ConfigurationError(variable.name, exc.reason) from None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EnvironmentVariable:
    """One ``VIEWMW_*`` variable: where it goes and how its text is read."""

    name: str
    group: str  # "limits", "settings" (both in Settings) or "worker" (viewmw.jobs.WorkerSettings)
    field: str
    parse: Callable[[str], Any]
    help: str


def read_environment(group: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The parsed values of one group's ``VIEWMW_*`` variables that are set, keyed by field.

    The library (:meth:`Settings.from_env`) and the worker (``WorkerSettings.from_env``) both read
    through here, so every variable is read the same way and listed in :data:`ENVIRONMENT`.

    Args:
        group: ``"limits"``, ``"settings"`` or ``"worker"``.
        environ: the variables to read; ``os.environ`` when ``None``.

    Raises:
        ConfigurationError: naming the variable whose text cannot be read.
    """
    config = Config(environ=Environ(dict(os.environ if environ is None else environ)))
    values: dict[str, Any] = {}
    for variable in ENVIRONMENT:
        if variable.group != group:
            continue
        raw = config.get(variable.name, default=None)
        if raw is None:
            continue
        try:
            values[variable.field] = variable.parse(raw)
        except ValueError as exc:
            raise ConfigurationError(variable.name, f"{exc} (got {raw!r})") from None
    return values


def _optional_int(raw: str) -> int | None:
    text = raw.strip().lower()
    # An empty value is an error, not "off": a template that expands an unset variable to ""
    # must not silently disable an abuse rule.
    if text in ("none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number, 0, or 'none'") from None


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _float(raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _str(raw: str) -> str:
    return raw.strip()


def _positive_int(raw: str) -> int:
    value = _int(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _port(raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError("must be a TCP port (1-65535)")
    return port


def _hook(raw: str) -> str | None:
    hook = raw.strip()
    if not hook:
        return None
    module, sep, function = hook.partition(":")
    if not hook.startswith(("http://", "https://")) and not (
        sep and module and function.isidentifier()
    ):
        raise ValueError("must be 'package.module:function' or an http(s):// URL")
    return hook


def _content_tables(raw: str) -> dict[str, str]:
    tables: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        content_type, sep, target = entry.partition("=")
        if not sep:
            raise ValueError(
                "must look like 'story=stories.view_count,fantasy=fantasies.view_count'"
            )
        tables[content_type.strip()] = target.strip()
    return tables


ENVIRONMENT: tuple[EnvironmentVariable, ...] = (
    EnvironmentVariable(
        "VIEWMW_MAX_VIEWS_PER_SESSION",
        "limits",
        "max_views_per_session",
        _optional_int,
        "Counted views of one content per viewer per session (0 = off).",
    ),
    EnvironmentVariable(
        "VIEWMW_SESSION_SECONDS",
        "limits",
        "session_seconds",
        _int,
        "Length of the session window in seconds.",
    ),
    EnvironmentVariable(
        "VIEWMW_MAX_DAILY_VIEWS_PER_USER",
        "limits",
        "max_daily_views_per_user",
        _optional_int,
        "Counted views per viewer per calendar day (0 = off).",
    ),
    EnvironmentVariable(
        "VIEWMW_ONE_VIEW_PER_DAY",
        "limits",
        "one_view_per_day",
        _bool,
        "Count a viewer at most once per content per calendar day.",
    ),
    EnvironmentVariable(
        "VIEWMW_VIEW_COOLDOWN_SECONDS",
        "limits",
        "view_cooldown_seconds",
        _optional_int,
        "Seconds between counted views of one content (0 = off).",
    ),
    EnvironmentVariable(
        "VIEWMW_TIMEZONE",
        "settings",
        "timezone",
        _str,
        "IANA time zone in which calendar days begin.",
    ),
    EnvironmentVariable(
        "VIEWMW_KEY_PREFIX", "settings", "key_prefix", _str, "Prefix for every Redis key."
    ),
    EnvironmentVariable(
        "VIEWMW_REDIS_URL",
        "settings",
        "redis_url",
        _optional_str,
        "Redis URL; unset means an embedded stand-in where one is offered.",
    ),
    EnvironmentVariable(
        "VIEWMW_DATABASE_URL",
        "settings",
        "database_url",
        _str,
        "SQLAlchemy database URL; unset: an embedded SQLite file, with the embedded Redis only.",
    ),
    EnvironmentVariable(
        "VIEWMW_SECRET",
        "settings",
        "secret",
        _optional_str,
        "Key for hashing anonymous viewers (at least 16 characters).",
    ),
    EnvironmentVariable(
        "VIEWMW_CONTENT_TABLES",
        "settings",
        "content_tables",
        _content_tables,
        "Content types counted in the app's own tables: 'story=stories.view_count,...'.",
    ),
    EnvironmentVariable(
        "VIEWMW_CONTENT_TABLES_MODULE",
        "settings",
        "content_tables_module",
        _optional_str,
        "'package.module:name' of the content tables mapping the app declares in code.",
    ),
    EnvironmentVariable(
        "VIEWMW_QUEUE_NAME",
        "settings",
        "queue_name",
        _str,
        "Dramatiq queue of the sync actors; unset: derived from the key prefix.",
    ),
    EnvironmentVariable(
        "VIEWMW_BROKER_NAMESPACE",
        "settings",
        "broker_namespace",
        _str,
        "Redis broker key namespace; unset: derived from the key prefix.",
    ),
    EnvironmentVariable(
        "VIEWMW_REDIS_TIMEOUT",
        "settings",
        "redis_timeout",
        _float,
        "Seconds a request waits for Redis' reply (a late reply is not a failure).",
    ),
    EnvironmentVariable(
        "VIEWMW_REDIS_PROBE_TIMEOUT",
        "settings",
        "redis_probe_timeout",
        _float,
        "Seconds Redis has to answer a health probe timed off the event loop.",
    ),
    EnvironmentVariable(
        "VIEWMW_DATABASE_TIMEOUT",
        "settings",
        "database_timeout",
        _float,
        "Seconds background work (syncs, replays, commands) may wait on the database.",
    ),
    EnvironmentVariable(
        "VIEWMW_DATABASE_REQUEST_TIMEOUT",
        "settings",
        "database_request_timeout",
        _float,
        "Seconds a request may wait on the database (cache misses, outage writes).",
    ),
    EnvironmentVariable(
        "VIEWMW_UNIQUE_VIEWERS",
        "settings",
        "unique_viewers",
        _bool,
        "Count distinct viewers per content per day (HyperLogLog, about 0.8 % error).",
    ),
    EnvironmentVariable(
        "VIEWMW_HISTORY_RETENTION_DAYS",
        "settings",
        "history_retention_days",
        _int,
        "Days the per-day Redis keys (viewers, rankings, blocked counts) live past their day.",
    ),
    EnvironmentVariable(
        "VIEWMW_CLUSTER_SHARDS",
        "settings",
        "cluster_shards",
        _int,
        "Content shards on a Redis Cluster (redis+cluster:// only); changing it is a migration.",
    ),
    # Read by the worker (viewmw.jobs) only; checked further in viewmw.jobs.settings.
    EnvironmentVariable(
        "VIEWMW_BROKER_URL",
        "worker",
        "broker_url",
        _optional_str,
        "Worker: Dramatiq broker (redis://, amqp:// or stub://); unset: VIEWMW_REDIS_URL.",
    ),
    EnvironmentVariable(
        "VIEWMW_SYNC_CRON",
        "worker",
        "sync_cron",
        _str,
        "Worker: when the sync runs, as cron in VIEWMW_TIMEZONE (default midnight).",
    ),
    EnvironmentVariable(
        "VIEWMW_CLEANUP_CRON",
        "worker",
        "cleanup_cron",
        _str,
        "Worker: when the cleanup runs, as cron (default 00:30).",
    ),
    EnvironmentVariable(
        "VIEWMW_FAILURE_HOOK",
        "worker",
        "failure_hook",
        _hook,
        "Worker: 'package.module:function' or URL told when a sync failed all retries.",
    ),
    EnvironmentVariable(
        "VIEWMW_RETRY_MIN_BACKOFF_MS",
        "worker",
        "retry_min_backoff_ms",
        _positive_int,
        "Worker: first retry delay of a failed sync, in milliseconds.",
    ),
    EnvironmentVariable(
        "VIEWMW_SYNC_TIME_LIMIT_MS",
        "worker",
        "sync_time_limit_ms",
        _positive_int,
        "Worker: a sync running longer than this is stopped and retried (milliseconds).",
    ),
    EnvironmentVariable(
        "VIEWMW_METRICS_PORT",
        "worker",
        "metrics_port",
        _port,
        "Worker: port of its Prometheus metrics server; unset: no metrics.",
    ),
)
_VARIABLE_BY_FIELD = {
    variable.field: variable for variable in ENVIRONMENT if variable.group != "worker"
}
assert {f.name for f in fields(Limits)} | {f.name for f in fields(Settings)} >= set(
    _VARIABLE_BY_FIELD
), "every variable maps to a field"


def _check_count(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(name, f"must be a whole number >= 0, got {value!r}")


def _check_key_prefix(prefix: str) -> None:
    if len(prefix) > 64 or any(ch.isspace() or ch in "*?[]{}" for ch in prefix):
        raise ConfigurationError(
            "key_prefix", "must be at most 64 characters without spaces or * ? [ ] { }"
        )


def _check_content_tables(tables: Mapping[str, str]) -> dict[str, str]:
    from viewmw.keys import validate_content_type  # keys imports errors only; no cycle at runtime

    checked: dict[str, str] = {}
    for content_type, target in dict(tables).items():
        try:
            validate_content_type(content_type)
        except ValueError as exc:
            raise ConfigurationError("content_tables", str(exc)) from None
        if not isinstance(target, str) or not _TABLE_COLUMN.fullmatch(target):
            raise ConfigurationError(
                "content_tables",
                f"{content_type!r} must map to 'table.count_column', got {target!r}",
            )
        checked[content_type] = target
    return checked


def _import_content_tables(path: str) -> Mapping[str, str]:
    """The mapping named by ``package.module:name``, as content type -> ``table.column``."""
    if not _MODULE_PATH.fullmatch(path):
        raise ConfigurationError(
            "content_tables_module", f"must look like 'package.module:name', got {path!r}"
        )
    module_name, _, name = path.partition(":")
    try:
        declared = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError("content_tables_module", f"cannot be imported: {exc}") from None
    if not isinstance(declared, Mapping):
        raise ConfigurationError(
            "content_tables_module", f"{path} must be a mapping content type -> column"
        )
    tables: dict[str, str] = {}
    for content_type, target in declared.items():
        table = getattr(getattr(target, "table", None), "name", None)
        tables[content_type] = f"{table}.{target.name}" if table else target
    return tables


def _derived_name(base: str, prefix: str) -> str:
    """``base`` alone without a prefix; ``base-app`` for ``app:``; a digest keeps any other
    prefix apart from the names the readable ones give."""
    if not prefix:
        return base
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-.")[:40]
    if _SAFE_PREFIX.fullmatch(prefix) and prefix.endswith(":"):
        return f"{base}-{slug}"
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:8]
    return f"{base}-{slug}-{digest}" if slug else f"{base}-{digest}"


def _redact(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part hidden, for error messages."""
    return re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)


@dataclass(frozen=True, slots=True)
class RedisClusterURL:
    """A ``redis+cluster://[user[:password]@]host[:port],host[:port]...`` URL taken apart.

    The nodes are where the client starts (``startup_nodes``): any one that answers tells it the
    others, so a few of the primaries are enough. A port defaults to 6379; an IPv6 address is
    written in brackets (``[::1]:7000``). A cluster has database 0 only, so the path is empty or
    ``/0``; no query options are taken.

    Attributes:
        nodes: (host, port) of each node named, in order.
        username: the ACL user, or ``None``.
        password: the password, or ``None``.
        tls: ``rediss+cluster://``: every node is reached over TLS.
    """

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @staticmethod
    def is_cluster_url(url: str) -> bool:
        """Whether ``url``'s scheme names a Redis Cluster."""
        return url.partition("://")[0].lower() in _CLUSTER_SCHEMES

    @classmethod
    def parse(cls, url: str) -> RedisClusterURL:
        """Take ``url`` apart.

        Raises:
            ConfigurationError: naming ``redis_url``, without repeating the password.
        """
        scheme, _, rest = url.partition("://")

        def refuse(reason: str) -> ConfigurationError:
            return ConfigurationError(
                "redis_url",
                f"must look like redis+cluster://host:port,host:port ({reason}),"
                f" got {_redact(url)!r}",
            )

        if scheme.lower() not in _CLUSTER_SCHEMES:
            raise refuse(f"the scheme is {scheme!r}")
        rest, query_mark, _query = rest.partition("?")
        if query_mark:
            raise refuse("no ?options are taken")
        credentials, at, rest = rest.rpartition("@")
        hosts, _, database = rest.partition("/")
        if database not in ("", "0"):
            raise refuse("a cluster has database 0 only")
        nodes = []
        for part in hosts.split(","):
            match = _CLUSTER_NODE.fullmatch(part)
            port = int(match["port"] or 6379) if match else 0
            if match is None or not 0 < port < 65536:
                raise refuse(f"{part!r} is not host:port" if part else "a node is missing")
            nodes.append((match["ipv6"] or match["host"], port))
        username = password = None
        if at:
            user, colon, secret = credentials.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        return cls(tuple(nodes), username, password, _CLUSTER_SCHEMES[scheme.lower()])


def _check_redis_url(url: str) -> None:
    if RedisClusterURL.is_cluster_url(url):
        RedisClusterURL.parse(url)
        return
    scheme, sep, rest = url.partition("://")
    problem = not sep or scheme not in _REDIS_SCHEMES or not rest
    if not problem:
        try:
            parsed = parse_url(url)  # type: ignore[no-untyped-call]  # ValueError: bad port
        except ValueError:
            problem = True
        else:
            # redis-py silently ignores a database number that is not a number.
            path = rest.partition("?")[0].partition("/")[2]
            problem = scheme != "unix" and path != "" and "db" not in parsed
    if problem:
        raise ConfigurationError(
            "redis_url", f"must look like redis://host:port/db, got {_redact(url)!r}"
        )


def _async_database_url(url: str | URL) -> str:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(
            "database_url", f"is not a database URL: {_redact(str(url))!r}"
        ) from exc
    driver = _ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    if driver not in _SUPPORTED_DRIVERS:
        raise ConfigurationError(
            "database_url",
            f"must be a PostgreSQL or SQLite URL with an async driver"
            f" ({', '.join(_SUPPORTED_DRIVERS)}), got {parsed.drivername!r}",
        )
    return parsed.set(drivername=driver).render_as_string(hide_password=False)
