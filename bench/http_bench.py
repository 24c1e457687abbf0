"""HTTP throughput, CPU per request and latency: uvicorn serving the same site several ways.

Every variant gets its own uvicorn process (one worker), all started once and kept running; the
measurements then go round the variants in turn (A B C … A B C …), so slow drifts in the
machine's other load touch every variant alike. Per round and variant:

- throughput: bench/loadgen.py in closed loop; the app's CPU time (``/proc/<pid>/stat`` utime +
  stime) and Redis' (``INFO cpu`` used_cpu_user + used_cpu_sys) before and after, divided by the
  requests answered. CPU per request is steady where req/s moves with the machine's load.
- latency: bench/loadgen.py in open loop at a fixed moderate rate; p50 and p99 per round, and
  the median over rounds: a burst of the machine's other load spoils the p99 of the round it
  falls in, not the figure (pooling every round's latencies would let one burst set the p99).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
SETTLE_SECONDS = 0.3  # work a server does after its last answer (queued sends) is part of the round
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_LIMIT_SECONDS = 60.0
WARMUP_WITHOUT_COUNT = 0.01  # share of answers without a count that ends a warm-up


@dataclass(frozen=True)
class Variant:
    """One way of serving the site: the app factory and the path requested."""

    name: str
    factory: str
    path: str
    counts: bool  # answers carry X-View-Count
    tree: Path = ROOT  # the checkout whose viewmw and bench.http_apps the server imports


BARE = "bare app"
UNTRACKED = "untracked route"
TRACKED = "tracked route"
DEFERRED = "tracked route, deferred mode"
DO_NOTHING = "viewmw, do-nothing tracker"
INCR = "one INCR per request"
NAIVE = "naive baseline"
VARIANTS = [
    Variant(BARE, "bench.http_apps:bare", "/stories/", counts=False),
    Variant(UNTRACKED, "bench.http_apps:tracked", "/about", counts=False),
    Variant(TRACKED, "bench.http_apps:tracked", "/stories/", counts=True),
    Variant(DEFERRED, "bench.http_apps:tracked_deferred", "/stories/", counts=True),
    Variant(DO_NOTHING, "bench.http_apps:do_nothing", "/stories/", counts=True),
    Variant(INCR, "bench.http_apps:incr_counter", "/stories/", counts=True),
    Variant(NAIVE, "bench.http_apps:naive", "/stories/", counts=True),
]


@dataclass(frozen=True)
class HttpOptions:
    """How long and how hard to drive each variant."""

    rounds: int = 5
    seconds: float = 4.0
    # Long enough for the tracked route's count cache to hold every story's database count.
    warmup_seconds: float = 3.0
    connections: int = 32
    # Another checkout (``git worktree add``) whose request path is measured in the same rounds.
    baseline: Path | None = None
    rate: float = 300.0
    latency_seconds: float = 3.0


BASELINE_VARIANTS = (UNTRACKED, TRACKED, DEFERRED, DO_NOTHING)
"""What ``--baseline`` measures a second time, from another checkout (the code before a change)."""


def baseline_variants(tree: Path) -> list[Variant]:
    """:data:`BASELINE_VARIANTS` served from the checkout at ``tree``, named "… (baseline)"."""
    return [
        Variant(f"{v.name} (baseline)", v.factory, v.path, v.counts, tree=tree.resolve())
        for v in VARIANTS
        if v.name in BASELINE_VARIANTS
    ]


QUICK = HttpOptions(rounds=1, seconds=1.0, warmup_seconds=1.0, latency_seconds=1.0)


@dataclass(frozen=True)
class Round:
    """One closed-loop round of one variant."""

    requests: int
    requests_per_second: float
    app_cpu_us: float  # per request
    redis_cpu_us: float  # per request
    loadgen_busy: float  # the load generator's CPU time / wall time
    loadgen_cpu_us: float  # per request
    without_count: int


@dataclass(frozen=True)
class Latency:
    """Latency percentiles of one open-loop round, in milliseconds."""

    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, latencies_ms: list[float]) -> Latency:
        ordered = sorted(latencies_ms)

        def percentile(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

        return cls(percentile(50), percentile(99))


@dataclass
class VariantFigures:
    """Everything measured for one variant, round by round in order."""

    variant: Variant
    rounds: list[Round] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        """Median over rounds of a throughput figure (a :class:`Round` attribute)."""
        return float(statistics.median(getattr(r, attribute) for r in self.rounds))

    def median_latency(self, attribute: str) -> float:
        """Median over rounds of a :class:`Latency` attribute."""
        return float(statistics.median(getattr(r, attribute) for r in self.latency))


@dataclass
class HttpResults:
    """The figures of every variant measured, and the variants left out (with why)."""

    options: HttpOptions
    figures: dict[str, VariantFigures]
    skipped: dict[str, str]

    def ratio(self, name: str, attribute: str, to: str = BARE) -> float:
        """Median over rounds of ``name``'s figure over ``to``'s in the same round."""
        pairs = zip(self.figures[name].rounds, self.figures[to].rounds, strict=True)
        return float(
            statistics.median(getattr(a, attribute) / getattr(b, attribute) for a, b in pairs)
        )

    def added(self, name: str, attribute: str) -> float:
        """Median over rounds of ``name``'s latency minus the bare app's in the same round."""
        pairs = zip(self.figures[name].latency, self.figures[BARE].latency, strict=True)
        return float(
            statistics.median(getattr(a, attribute) - getattr(b, attribute) for a, b in pairs)
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, server: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn on port {port} exited with {server.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"uvicorn did not start on port {port}")


@contextmanager
def _uvicorn(
    factory: str, port: int, env: dict[str, str], tree: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    # `python -m` puts the working directory first on sys.path: the tree's viewmw is imported.
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", factory, "--factory", "--port", str(port)),
            *("--workers", "1", "--no-access-log", "--log-level", "warning"),
        ],
        cwd=tree,
        env={**os.environ, **env},
    )
    try:
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _load(port: int, path: str, seconds: float, connections: int, rate: float | None) -> dict:  # type: ignore[type-arg]
    command = [sys.executable, "-m", "bench.loadgen", str(port), path]
    command += ["--seconds", str(seconds), "--connections", str(connections)]
    if rate is not None:
        command += ["--rate", str(rate)]
    out = subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    result: dict = json.loads(out)  # type: ignore[type-arg]
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} of {result['requests']} answers were not 200 OK")
    return result


def _throughput(
    server: subprocess.Popen[bytes], port: int, path: str, client: redis.Redis, o: HttpOptions
) -> Round:
    app_before, redis_before = _process_cpu(server.pid), _redis_cpu(client)
    result = _load(port, path, o.seconds, o.connections, None)
    time.sleep(SETTLE_SECONDS)
    app = _process_cpu(server.pid) - app_before
    redis_cpu = _redis_cpu(client) - redis_before
    n = result["requests"]
    return Round(
        requests=n,
        requests_per_second=n / result["seconds"],
        app_cpu_us=app / n * 1e6,
        redis_cpu_us=redis_cpu / n * 1e6,
        loadgen_busy=result["cpu_seconds"] / result["seconds"],
        loadgen_cpu_us=result["cpu_seconds"] / n * 1e6,
        without_count=result["without_count"],
    )


def _warm_up(port: int, v: Variant, o: HttpOptions) -> None:
    """Imports, caches, pools, scripts loaded into Redis; for a counting variant, until its count
    cache holds (nearly) every story's database count, or :data:`WARMUP_LIMIT_SECONDS`: the
    first reads of 1 000 stories' counts on a busy machine outlast a short warm-up, and the
    rounds would measure them instead of the request path."""
    deadline = time.monotonic() + WARMUP_LIMIT_SECONDS
    while True:
        result = _load(port, v.path, o.warmup_seconds, o.connections, None)
        settled = result["without_count"] <= WARMUP_WITHOUT_COUNT * result["requests"]
        if not v.counts or settled or time.monotonic() > deadline:
            return


def run_http_bench(
    redis_host: str, redis_port: int, env: dict[str, str], options: HttpOptions
) -> HttpResults:
    """Start every variant's server, then measure them round after round."""
    variants = list(VARIANTS)
    if options.baseline is not None:
        variants += baseline_variants(options.baseline)
    client = redis.Redis(host=redis_host, port=redis_port)
    ports = {v.name: _free_port() for v in variants}
    with ExitStack() as stack:
        servers: dict[str, subprocess.Popen[bytes]] = {}
        for db, v in enumerate(variants):
            # One at a time: tracked apps create their tables at start-up. Each variant its own
            # Redis database, so none finds another's cooldowns.
            redis_url = f"redis://{redis_host}:{redis_port}/{db}"
            servers[v.name] = stack.enter_context(
                _uvicorn(v.factory, ports[v.name], {**env, "VIEWMW_REDIS_URL": redis_url}, v.tree)
            )
            _wait_for(ports[v.name], servers[v.name], time.monotonic() + 60)
            _warm_up(ports[v.name], v, options)
        figures = {v.name: VariantFigures(v) for v in variants}
        for number in range(options.rounds):
            print(f"HTTP bench: round {number + 1} of {options.rounds}", file=sys.stderr)
            for v in variants:
                figures[v.name].rounds.append(
                    _throughput(servers[v.name], ports[v.name], v.path, client, options)
                )
            for v in variants:
                o = options
                result = _load(ports[v.name], v.path, o.latency_seconds, o.connections, o.rate)
                figures[v.name].latency.append(Latency.of(result["latencies_ms"]))
    client.close()
    return HttpResults(options, figures, {})
