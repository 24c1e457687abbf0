"""The HTTP section of docs/performance.md: throughput and CPU, latency, and the targets."""

from __future__ import annotations

from bench.http_bench import (
    BARE,
    BASELINE_VARIANTS,
    DEFERRED,
    DO_NOTHING,
    NAIVE,
    TRACKED,
    UNTRACKED,
    HttpResults,
)

# The targets: req/s of each variant against the bare app's, in the same run.
TARGETS = [
    (UNTRACKED, 0.97),
    (DO_NOTHING, 0.95),
    (TRACKED, 0.80),
    (DEFERRED, 0.90),
]
NAIVE_TARGET = 2.0  # the tracked route against the naive baseline


def verdict(ok: bool) -> str:
    """``met`` or a bold ``not met``."""
    return "met" if ok else "**not met**"


def _share(part: int, whole: int) -> str:
    return "—" if whole == 0 else f"{part / whole:.1%}"


def render_http(results: HttpResults) -> list[str]:
    """Markdown lines for the HTTP results."""
    o = results.options
    figures = results.figures
    lines = [
        "## HTTP",
        "",
        "uvicorn (one worker, plain asyncio and h11) serving one small Starlette site in several",
        "ways, each in its own process, all driven by `bench/loadgen.py` (Python, in its own",
        f"process). Rounds: {o.rounds}, each going through every variant in turn. Figures are",
        "medians over the rounds; a ratio is the median of the ratios within each round (so it",
        "need not equal the ratio of two medians). CPU per request is the app process's user +",
        "system time (`/proc/<pid>/stat`) and the Redis server's (`INFO cpu`) over a round,",
        "divided by the requests answered: it is steady where req/s moves with the machine's",
        "other load.",
        "",
        f"### Throughput and CPU ({o.connections} connections, closed loop, {o.seconds:g} s a "
        "round)",
        "",
        "| variant | req/s | vs bare app | app CPU µs/request | vs bare app "
        "| Redis CPU µs/request | answers without a count |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in figures.items():
        answered = sum(r.requests for r in f.rounds)
        missing = sum(r.without_count for r in f.rounds)
        lines.append(
            f"| {name} | {f.median('requests_per_second'):,.0f} | "
            f"{results.ratio(name, 'requests_per_second'):.2f}× | "
            f"{f.median('app_cpu_us'):.0f} | {results.ratio(name, 'app_cpu_us'):.2f}× | "
            f"{f.median('redis_cpu_us'):.1f} | "
            f"{_share(missing, answered) if f.variant.counts else '—'} |"
        )
    for name, why in results.skipped.items():
        lines.append(f"| {name} | not measured: {why} | | | | | |")
    bare = figures[BARE]
    lines += [
        "",
        f"### Latency at a fixed rate ({o.rate:g} requests/s, open loop, {o.latency_seconds:g} s "
        "a round)",
        "",
        "Latency counts from the moment a request was due, so a server that falls behind is",
        "charged for the queue it causes. Percentiles per round, medians over rounds; what a",
        "variant adds is the median of its difference to the bare app within a round.",
        "",
        "| variant | p50 ms | p99 ms | p50 added | p99 added |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, f in figures.items():
        lines.append(
            f"| {name} | {f.median_latency('p50_ms'):.2f} | {f.median_latency('p99_ms'):.2f} | "
            f"{results.added(name, 'p50_ms'):+.2f} | {results.added(name, 'p99_ms'):+.2f} |"
        )
    lines += [
        "",
        "### Targets: req/s against the bare app, app CPU per request next to it",
        "",
    ]
    for name, target in TARGETS:
        if name not in figures:
            lines.append(
                f"- {name} ≥ {target:.2f}×: not measured — {results.skipped.get(name, 'left out')}"
            )
            continue
        ratio = results.ratio(name, "requests_per_second")
        rounds = figures[name].rounds
        missing_share = sum(r.without_count for r in rounds) / sum(r.requests for r in rounds)
        lines.append(
            f"- {name} ≥ {target:.2f}×: {ratio:.2f}× — {verdict(ratio >= target)} "
            f"(app CPU per request {results.ratio(name, 'app_cpu_us'):.2f}×"
            # A fast path that answers without the count is not a fast tracked route.
            + (
                f"; {missing_share:.1%} of its answers had no count)"
                if figures[name].variant.counts and missing_share > 0.01
                else ")"
            )
        )
    if TRACKED in figures and NAIVE in figures:
        ratio = results.ratio(TRACKED, "requests_per_second", to=NAIVE)
        lines.append(
            f"- {TRACKED} ≥ {NAIVE_TARGET:g}× the naive baseline: {ratio:.2f}× — "
            f"{verdict(ratio >= NAIVE_TARGET)}"
        )
    lines += _against_baseline(results)
    busiest = max(max(r.loadgen_busy for r in f.rounds) for f in figures.values())
    lines += [
        "",
        f"The load generator spent {bare.median('loadgen_cpu_us'):.0f} µs of CPU per request "
        f"against the bare app and was at most {busiest:.0%} busy in any round"
        + (
            " — it was close to being the bottleneck; the CPU figures are unaffected."
            if busiest > 0.85
            else ": the servers, not the generator, set the pace."
        ),
        "",
    ]
    return lines


def _against_baseline(results: HttpResults) -> list[str]:
    """With ``--baseline``: each variant against the same variant of the other checkout, round
    by round (median and range of the per-round ratios)."""
    pairs = [
        (name, f"{name} (baseline)")
        for name in BASELINE_VARIANTS
        if name in results.figures and f"{name} (baseline)" in results.figures
    ]
    if not pairs:
        return []
    lines = [
        "",
        "### Against the baseline checkout (same rounds)",
        "",
        "| variant | req/s, this ÷ baseline | range over rounds | app CPU µs/request, this ÷ "
        "baseline | range over rounds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, baseline in pairs:
        cells = [name]
        for attribute in ("requests_per_second", "app_cpu_us"):
            ratios = [
                getattr(a, attribute) / getattr(b, attribute)
                for a, b in zip(
                    results.figures[name].rounds, results.figures[baseline].rounds, strict=True
                )
            ]
            cells += [
                f"{results.ratio(name, attribute, to=baseline):.2f}×",
                f"{min(ratios):.2f}–{max(ratios):.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
