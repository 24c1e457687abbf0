"""viewmw's benchmark suite: ``nox -s bench`` (see docs/performance.md)."""
