"""Settings and Limits: defaults, validation at construction, ``from_env()``, and the docs page."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from viewmw import ConfigurationError, Limits, Settings
from viewmw.settings import ENVIRONMENT, RedisClusterURL

CONFIGURATION_MD = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_defaults_are_the_documented_rules() -> None:
    settings = Settings()
    assert settings.limits == Limits(
        max_views_per_session=3,
        session_seconds=86400,
        max_daily_views_per_user=100,
        one_view_per_day=True,
        view_cooldown_seconds=300,
    )
    assert (settings.timezone, settings.key_prefix, settings.redis_url, settings.secret) == (
        "UTC",
        "",
        None,
        None,
    )
    assert settings.database_url == ""  # unset: the embedded SQLite file, with embedded Redis
    assert settings.resolved_database_url() == "sqlite+aiosqlite:///viewmw.sqlite3"
    assert (settings.dramatiq_queue_name, settings.dramatiq_namespace) == ("viewmw", "dramatiq")
    assert (settings.redis_timeout, settings.database_timeout) == (0.25, 5.0)


# Construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_views_per_session", -1),
        ("max_views_per_session", 2.5),
        ("max_views_per_session", True),
        ("max_views_per_session", "3"),
        ("max_daily_views_per_user", -100),
        ("max_daily_views_per_user", 1e3),
        ("view_cooldown_seconds", -300),
        ("view_cooldown_seconds", 0.5),
        ("view_cooldown_seconds", "300"),
        ("session_seconds", 0),
        ("session_seconds", -1),
        ("session_seconds", None),
        ("session_seconds", 3600.0),
        ("one_view_per_day", 1),
        ("one_view_per_day", "false"),
        ("one_view_per_day", None),
    ],
)
def test_limits_refuse_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as error:
        Limits(**{field: value})
    assert error.value.setting == field
    assert str(error.value).startswith(field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timezone", "Mars/Olympus_Mons"),
        ("timezone", "utc"),
        ("timezone", ""),
        ("timezone", "../../etc/passwd"),
        ("timezone", "UTC "),
        ("key_prefix", "my app:"),
        ("key_prefix", "app*"),
        ("key_prefix", "{app}"),
        ("key_prefix", "a" * 65),
        ("redis_url", "localhost:6379"),
        ("redis_url", "http://localhost:6379"),
        ("redis_url", "redis://"),
        ("redis_url", "redis:/localhost"),
        ("redis_url", "redis://localhost:port/0"),
        ("redis_url", "redis://localhost:99999/0"),
        ("redis_url", "redis://localhost:6379/zero"),
        ("redis_url", "redis://localhost:6379/0?db=x"),
        ("database_url", "mysql://app@db/app"),
        ("database_url", "oracle://app@db/app"),
        ("database_url", "postgresql+pg8000://app@db/app"),
        ("database_url", "sqlite+pysqlcipher:///x.db"),
        ("database_url", "not a url"),
        ("database_url", "   "),
        ("database_url", "postgresql://app@db:port/app"),
        ("secret", "short"),
        ("secret", "x" * 15),
        ("secret", ""),
        ("redis_timeout", 0),
        ("redis_timeout", -0.25),
        ("redis_timeout", math.nan),
        ("redis_timeout", True),
        ("redis_timeout", "0.25"),
        ("database_timeout", 0.0),
        ("database_timeout", -5),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings(**{field: value})
    assert error.value.setting == field
    assert str(error.value).startswith(field)


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("redis_url", "redis://:hunter2hunter2@redis.internal:port/0"),
        ("redis_url", "redis://app:hunter2hunter2@redis.internal/zero"),
        ("database_url", "mysql://app:hunter2hunter2@db/app"),
        ("database_url", "postgresql://app:hunter2hunter2@db:port/app"),
    ],
)
def test_errors_do_not_repeat_passwords(field: str, url: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings(**{field: url})
    assert "hunter2" not in str(error.value)


def test_errors_do_not_repeat_the_secret() -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings(secret="tiny-s3cret")
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "redis://localhost:6379",
        "redis://localhost:6379/",
        "redis://:password@localhost:6379/2",
        "redis://user:password@localhost/15",
        "redis://localhost?db=3",
        "rediss://cache.example.com:6380/0",
        "unix:///var/run/redis/redis.sock",
        "unix:///var/run/redis/redis.sock?db=2",
    ],
)
def test_good_redis_urls_are_accepted_unchanged(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("postgresql://app@db/app", "postgresql+asyncpg://app@db/app"),
        ("postgres://app@db/app", "postgresql+asyncpg://app@db/app"),
        ("postgresql+psycopg2://app:pw@db:5433/app", "postgresql+asyncpg://app:pw@db:5433/app"),
        ("postgresql+asyncpg://app@db/app", "postgresql+asyncpg://app@db/app"),
        ("postgresql+psycopg://app@db/app", "postgresql+psycopg://app@db/app"),
        ("sqlite:///counts.db", "sqlite+aiosqlite:///counts.db"),
        ("sqlite+pysqlite:///counts.db", "sqlite+aiosqlite:///counts.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_database_urls_run_on_an_async_driver(url: str, stored: str) -> None:
    assert Settings(database_url=url).database_url == stored


def test_good_values_are_accepted() -> None:
    settings = Settings(
        limits=Limits(
            max_views_per_session=0,
            session_seconds=1,
            max_daily_views_per_user=None,
            one_view_per_day=False,
            view_cooldown_seconds=None,
        ),
        timezone="Asia/Tokyo",
        key_prefix="app1:",
        secret="s" * 16,
        redis_timeout=1,
        database_timeout=0.001,
    )
    assert settings.zone.key == "Asia/Tokyo"
    assert settings.limits.max_views_per_session == 0


def test_replace_validates_again() -> None:
    settings = Settings(secret="s" * 16)
    assert settings.replace(timezone="Europe/Berlin").timezone == "Europe/Berlin"
    assert settings.replace(timezone="Europe/Berlin").secret == "s" * 16
    with pytest.raises(ConfigurationError, match=r"^timezone"):
        settings.replace(timezone="Europe/Nowhere")


# from_env --------------------------------------------------------------------------------------

BAD_ENVIRONMENT = [
    ("VIEWMW_MAX_VIEWS_PER_SESSION", "-1"),
    ("VIEWMW_MAX_VIEWS_PER_SESSION", "three"),
    ("VIEWMW_MAX_VIEWS_PER_SESSION", "2.5"),
    ("VIEWMW_MAX_VIEWS_PER_SESSION", ""),  # empty is not "off"
    ("VIEWMW_SESSION_SECONDS", "0"),
    ("VIEWMW_SESSION_SECONDS", "-60"),
    ("VIEWMW_SESSION_SECONDS", "none"),
    ("VIEWMW_SESSION_SECONDS", "24h"),
    ("VIEWMW_MAX_DAILY_VIEWS_PER_USER", "-100"),
    ("VIEWMW_MAX_DAILY_VIEWS_PER_USER", "lots"),
    ("VIEWMW_MAX_DAILY_VIEWS_PER_USER", "  "),
    ("VIEWMW_ONE_VIEW_PER_DAY", "maybe"),
    ("VIEWMW_ONE_VIEW_PER_DAY", "2"),
    ("VIEWMW_ONE_VIEW_PER_DAY", ""),
    ("VIEWMW_VIEW_COOLDOWN_SECONDS", "-300"),
    ("VIEWMW_VIEW_COOLDOWN_SECONDS", "5m"),
    ("VIEWMW_TIMEZONE", "Mars/Olympus_Mons"),
    ("VIEWMW_TIMEZONE", ""),
    ("VIEWMW_KEY_PREFIX", "app*"),
    ("VIEWMW_REDIS_URL", "localhost:6379"),
    ("VIEWMW_REDIS_URL", "redis://localhost:port/0"),
    ("VIEWMW_DATABASE_URL", "mysql://app@db/app"),
    ("VIEWMW_DATABASE_URL", "nonsense"),
    ("VIEWMW_SECRET", "too-short"),
    ("VIEWMW_CONTENT_TABLES", "story"),
    ("VIEWMW_CONTENT_TABLES", "Story=stories.view_count"),
    ("VIEWMW_CONTENT_TABLES", "story=stories"),
    ("VIEWMW_REDIS_TIMEOUT", "0"),
    ("VIEWMW_REDIS_TIMEOUT", "-1"),
    ("VIEWMW_REDIS_TIMEOUT", "fast"),
    ("VIEWMW_REDIS_TIMEOUT", "nan"),
    ("VIEWMW_REDIS_PROBE_TIMEOUT", "0"),
    ("VIEWMW_DATABASE_REQUEST_TIMEOUT", "-0.1"),
    ("VIEWMW_DATABASE_TIMEOUT", "0"),
    ("VIEWMW_DATABASE_TIMEOUT", "-5"),
    ("VIEWMW_CONTENT_TABLES_MODULE", "tests.no_such_module:tables"),
    ("VIEWMW_CONTENT_TABLES_MODULE", "tests.conftest"),
    ("VIEWMW_CONTENT_TABLES_MODULE", "tests.conftest:no_such_name"),
    ("VIEWMW_CONTENT_TABLES_MODULE", "tests.conftest:stories"),  # a table, not a mapping
    ("VIEWMW_QUEUE_NAME", "1queue"),
    ("VIEWMW_QUEUE_NAME", "my queue"),
    ("VIEWMW_BROKER_NAMESPACE", "name space"),
    ("VIEWMW_BROKER_NAMESPACE", "a*"),
    ("VIEWMW_UNIQUE_VIEWERS", "sometimes"),
    ("VIEWMW_HISTORY_RETENTION_DAYS", "0"),
    ("VIEWMW_HISTORY_RETENTION_DAYS", "a week"),
    ("VIEWMW_CLUSTER_SHARDS", "0"),
    ("VIEWMW_CLUSTER_SHARDS", "16385"),
    ("VIEWMW_CLUSTER_SHARDS", "many"),
]


@pytest.mark.parametrize(("variable", "raw"), BAD_ENVIRONMENT)
def test_from_env_refuses_bad_values_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env({variable: raw})
    assert error.value.setting == variable
    assert str(error.value).startswith(variable + " ")


def test_every_variable_has_a_bad_value_above() -> None:
    # The worker's variables are refused by WorkerSettings (tests/jobs/test_schedule.py).
    library = {variable.name for variable in ENVIRONMENT if variable.group != "worker"}
    assert library == {name for name, _ in BAD_ENVIRONMENT}


def test_from_env_with_nothing_set_is_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"PATH": "/bin", "VIEWMW_UNKNOWN": "x", "viewmw_timezone": "x"}) == (
        Settings()
    )


def test_from_env_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "VIEWMW_MAX_VIEWS_PER_SESSION": " 5 ",
            "VIEWMW_SESSION_SECONDS": "3600",
            "VIEWMW_MAX_DAILY_VIEWS_PER_USER": "250",
            "VIEWMW_ONE_VIEW_PER_DAY": "false",
            "VIEWMW_VIEW_COOLDOWN_SECONDS": "60",
            "VIEWMW_TIMEZONE": "America/New_York",
            "VIEWMW_KEY_PREFIX": "app1:",
            "VIEWMW_REDIS_URL": "redis://:pw@cache:6380/2",
            "VIEWMW_DATABASE_URL": "postgresql://app@db/app",
            "VIEWMW_SECRET": "0123456789abcdef",
            "VIEWMW_CONTENT_TABLES": "story=stories.view_count, fantasy=fantasies.view_count",
            "VIEWMW_REDIS_TIMEOUT": "0.5",
            "VIEWMW_DATABASE_TIMEOUT": "2",
        }
    )
    assert settings == Settings(
        limits=Limits(
            max_views_per_session=5,
            session_seconds=3600,
            max_daily_views_per_user=250,
            one_view_per_day=False,
            view_cooldown_seconds=60,
        ),
        timezone="America/New_York",
        key_prefix="app1:",
        redis_url="redis://:pw@cache:6380/2",
        database_url="postgresql+asyncpg://app@db/app",
        secret="0123456789abcdef",
        content_tables={"story": "stories.view_count", "fantasy": "fantasies.view_count"},
        redis_timeout=0.5,
        database_timeout=2.0,
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0", 0), ("none", None), ("None", None), ("NONE", None), ("off", None), (" 0 ", 0)],
)
def test_from_env_0_none_or_off_disables_a_limit(raw: str, value: int | None) -> None:
    limits = Settings.from_env(
        {
            "VIEWMW_MAX_VIEWS_PER_SESSION": raw,
            "VIEWMW_MAX_DAILY_VIEWS_PER_USER": raw,
            "VIEWMW_VIEW_COOLDOWN_SECONDS": raw,
        }
    ).limits
    assert limits.max_views_per_session == limits.max_daily_views_per_user == value
    assert limits.view_cooldown_seconds == value
    # 0 and None are both "off" to the tracker, which sends 0 to the script for either.
    assert not limits.max_views_per_session


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (" false ", False),
    ],
)
def test_from_env_reads_booleans(raw: str, value: bool) -> None:
    assert Settings.from_env({"VIEWMW_ONE_VIEW_PER_DAY": raw}).limits.one_view_per_day is value


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIEWMW_TIMEZONE", "Asia/Tokyo")
    monkeypatch.setenv("VIEWMW_MAX_DAILY_VIEWS_PER_USER", "7")
    settings = Settings.from_env()
    assert settings.timezone == "Asia/Tokyo"
    assert settings.limits.max_daily_views_per_user == 7


# The docs page ---------------------------------------------------------------------------------


def documented_variables() -> dict[str, list[str]]:
    """Rows of the tables in docs/configuration.md whose first cell is a ``VIEWMW_*`` name."""
    rows: dict[str, list[str]] = {}
    for line in CONFIGURATION_MD.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and re.fullmatch(r"`VIEWMW_[A-Z_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _default_of(field: str) -> Any:
    settings = Settings()
    return getattr(settings.limits if hasattr(settings.limits, field) else settings, field)


def test_configuration_docs_list_every_variable_with_its_default() -> None:
    rows = documented_variables()
    # The worker's rows are checked against WorkerSettings in tests/jobs/test_schedule.py.
    for variable in (v for v in ENVIRONMENT if v.group != "worker"):
        assert variable.name in rows, f"{variable.name} is missing from docs/configuration.md"
        setting, default = rows[variable.name][0], rows[variable.name][1]
        assert setting.strip("`").split(".")[-1] == variable.field, variable.name
        # The default, read as that variable's value would be, gives the real default.
        text = "" if default == "(unset)" else default.strip("`")
        assert variable.parse(text) == _default_of(variable.field), (variable.name, default)
    assert set(rows) == {variable.name for variable in ENVIRONMENT}, "documented but not read"


def test_configuration_docs_mention_every_field() -> None:
    text = CONFIGURATION_MD.read_text(encoding="utf-8")
    for field in [*Limits.__dataclass_fields__, *Settings.__dataclass_fields__]:
        assert f"`{field}`" in text or f"`limits.{field}`" in text, field
    # No variable is mentioned anywhere that viewmw does not read.
    assert set(re.findall(r"VIEWMW_[A-Z_]+", text)) <= {v.name for v in ENVIRONMENT}


# Where counts go, where the database is, which queue ----------------------------------------------


def test_content_tables_can_be_declared_once_in_code_and_named_by_path() -> None:
    settings = Settings.from_env({"VIEWMW_CONTENT_TABLES_MODULE": "tests.conftest:CONTENT_TABLES"})
    assert settings.content_tables == {
        "story": "stories.view_count",
        "fantasy": "fantasies.view_count",
    }
    # Declaring the same thing twice is harmless (and replace() keeps working); differently is not.
    assert settings.replace(timezone="Asia/Tokyo").content_tables == settings.content_tables
    with pytest.raises(ConfigurationError, match="declared twice"):
        settings.replace(content_tables={"story": "tales.view_count"})


def test_without_a_database_url_only_the_embedded_redis_gets_the_sqlite_file() -> None:
    assert Settings().resolved_database_url() == "sqlite+aiosqlite:///viewmw.sqlite3"
    real = Settings(redis_url="redis://cache:6379/0")
    with pytest.raises(ConfigurationError) as error:
        real.resolved_database_url()
    assert "set VIEWMW_DATABASE_URL" in str(error.value)
    # replace() does not carry a default over: the URL stays unset until it is given.
    assert Settings().replace(redis_url="redis://cache:6379/0").database_url == ""
    given = real.replace(database_url="postgresql://app@db/app")
    assert given.resolved_database_url() == "postgresql+asyncpg://app@db/app"


@pytest.mark.parametrize(
    ("prefix", "queue", "namespace"),
    [
        ("", "viewmw", "dramatiq"),
        ("app1:", "viewmw-app1", "dramatiq-app1"),
        ("shop.eu:", "viewmw-shop.eu", "dramatiq-shop.eu"),
    ],
)
def test_queue_and_namespace_follow_the_key_prefix(prefix: str, queue: str, namespace: str) -> None:
    settings = Settings(key_prefix=prefix)
    assert (settings.dramatiq_queue_name, settings.dramatiq_namespace) == (queue, namespace)


def test_other_prefixes_get_distinct_valid_queue_names() -> None:
    prefixes = ["app1", "app1:", "app1::", "app/1:", "app-1:", ":", "é:", "a" * 64]
    names = [Settings(key_prefix=prefix).dramatiq_queue_name for prefix in prefixes]
    assert len(set(names)) == len(names), names
    for name in names:
        Settings(queue_name=name)  # a name Dramatiq accepts (the same rule)


def test_queue_and_namespace_can_be_set() -> None:
    settings = Settings.from_env(
        {
            "VIEWMW_KEY_PREFIX": "app1:",
            "VIEWMW_QUEUE_NAME": "counts",
            "VIEWMW_BROKER_NAMESPACE": "shared-dramatiq",
        }
    )
    assert (settings.dramatiq_queue_name, settings.dramatiq_namespace) == (
        "counts",
        "shared-dramatiq",
    )


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            RedisClusterURL((("10.0.0.1", 7000), ("10.0.0.2", 7001))),
        ),
        ("redis+cluster://cache", RedisClusterURL((("cache", 6379),))),
        ("redis+cluster://cache:7000/0", RedisClusterURL((("cache", 7000),))),
        (
            "rediss+cluster://app:p%40ss@[::1]:7000,cache.example.com",
            RedisClusterURL((("::1", 7000), ("cache.example.com", 6379)), "app", "p@ss", True),
        ),
        ("redis+cluster://:secret@cache:7000", RedisClusterURL((("cache", 7000),), None, "secret")),
    ],
)
def test_a_cluster_url_names_its_nodes_and_credentials(url: str, parsed: RedisClusterURL) -> None:
    settings = Settings(redis_url=url)
    assert settings.redis_url == url
    assert settings.redis_cluster == parsed


def test_a_single_redis_url_is_no_cluster() -> None:
    assert Settings(redis_url="redis://cache:6379/0").redis_cluster is None
    assert Settings().redis_cluster is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://", "a node is missing"),
        ("redis+cluster://a:7000,,b:7001", "a node is missing"),
        ("redis+cluster://a:7000,", "a node is missing"),
        ("redis+cluster://a:port", "'a:port' is not host:port"),
        ("redis+cluster://a:99999", "'a:99999' is not host:port"),
        ("redis+cluster://a:0", "'a:0' is not host:port"),
        ("redis+cluster://a b:7000", "'a b:7000' is not host:port"),
        ("redis+cluster://[zz]:7000", "'[zz]:7000' is not host:port"),
        ("redis+cluster://a:7000/3", "a cluster has database 0 only"),
        ("redis+cluster://a:7000?ssl=true", "no ?options are taken"),
        ("redis+cluster://:hunter2hunter2@a:port", "'a:port' is not host:port"),
    ],
)
def test_bad_cluster_urls_are_refused_saying_why(url: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        Settings(redis_url=url)
    assert error.value.setting == "redis_url"
    assert "redis+cluster://host:port,host:port" in error.value.reason
    assert reason in error.value.reason
    assert "hunter2" not in str(error.value)


def test_a_cluster_url_comes_from_the_environment() -> None:
    settings = Settings.from_env({"VIEWMW_REDIS_URL": "redis+cluster://a:7000,b:7001"})
    assert settings.redis_cluster == RedisClusterURL((("a", 7000), ("b", 7001)))

    with pytest.raises(ConfigurationError) as error:
        Settings.from_env({"VIEWMW_REDIS_URL": "redis+cluster://a:7000/1"})
    assert error.value.setting == "VIEWMW_REDIS_URL"


def test_the_content_shards_follow_the_redis_url() -> None:
    # A single Redis: one shard whose keys keep their usual names, whatever cluster_shards says.
    single = Settings(redis_url="redis://cache:6379/0", cluster_shards=64).content_shards()
    assert (single.count, single.of("story", "7").pending("story", "7")) == (None, "story:views:7")
    # A cluster: 128 shards by default, or as many as configured.
    cluster = Settings.from_env(
        {"VIEWMW_REDIS_URL": "redis+cluster://a:7000", "VIEWMW_KEY_PREFIX": "app:"}
    ).content_shards()
    assert cluster.count == 128
    assert cluster.of("story", "42").pending("story", "42") == "app:story:views:{c:37}:42"
    configured = Settings.from_env(
        {"VIEWMW_REDIS_URL": "redis+cluster://a:7000", "VIEWMW_CLUSTER_SHARDS": "16"}
    ).content_shards()
    assert configured.count == 16
