"""Prometheus metrics: seeded traffic through the middleware and a real sync, then a scrape that
must say exactly what happened; an outage; several processes; viewmw without prometheus_client.

On the real Redis and PostgreSQL. Event counters are process-wide, so each test compares two
scrapes (before and after) instead of absolute values; figures read from the servers at scrape
time are compared as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.asgi_support import RedisProcess, free_port
from tests.metrics_support import Sample, increase, key, parse, scrape
from tests.outage_support import database_counts, recover, seed_stories, user_of
from tests.support import REDIS_URL, FakeClock
from viewmw import (
    BlockReason,
    CircuitBreaker,
    ConfigurationError,
    Limits,
    Outbox,
    RedisProbe,
    ResilientTracker,
    Settings,
    Store,
    ViewSync,
    ViewTracker,
    ViewTrackingMiddleware,
    track,
)
from viewmw.assembly import connect_redis
from viewmw.metrics import MetricsEndpoint
from viewmw.metrics.prometheus import PrometheusRecorder
from viewmw.tracker import _REASONS

ROOT = Path(__file__).resolve().parent.parent
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CRAWLER = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
DEBUG = "X-View-Counted"
# Larger than any BIGINT id: the stories table cannot hold it (reason=invalid_id).
TOO_LARGE_ID = "99999999999999999999999"


def site(tracker: ViewTracker | ResilientTracker, endpoint: MetricsEndpoint) -> Starlette:
    async def story(request: Request) -> PlainTextResponse:
        return PlainTextResponse("a story")

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("oops", status_code=500)

    app = Starlette(
        routes=[
            Route("/stories/{id:int}", story),
            Route("/broken/{id:int}", broken),
            Route("/metrics", endpoint),
        ]
    )
    return ViewTrackingMiddleware(  # type: ignore[return-value]
        app,
        tracker=tracker,
        routes={"/stories/{id:int}": "story", "/broken/{id:int}": "story"},
        debug_header=DEBUG,
        viewer=user_of,
        respect_privacy_signals=True,
    )


def client_for(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://site")


async def visit(client: httpx.AsyncClient, path: str, user: str = "alice", **headers: str) -> str:
    """One page view; returns the debug header (what viewmw did with it)."""
    response = await client.get(path, headers={"user-agent": BROWSER, "x-user": user, **headers})
    assert response.text in ("a story", "oops")
    return response.headers[DEBUG]


def expected_from(debug_values: list[str]) -> Counter[Sample]:
    """What the counters must have grown by, from the debug headers the requests got."""
    expected: Counter[Sample] = Counter()
    for debug in debug_values:
        if debug == "0; reason=status":
            continue  # not a view: the app's own error page
        expected[key("viewmw_request_added_seconds_count")] += 1
        reason = debug.partition("reason=")[2]
        if reason in ("bot", "prefetch", "privacy", "invalid_id"):
            expected[key("viewmw_views_skipped_total", reason=reason)] += 1
            continue
        expected[key("viewmw_views_offered_total")] += 1
        if debug == "1":
            expected[key("viewmw_views_counted_total")] += 1
        else:
            expected[key("viewmw_views_blocked_total", reason=reason)] += 1
    return expected


async def test_a_scrape_after_traffic_and_a_sync_says_what_happened(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, clock: FakeClock
) -> None:
    settings = settings.replace(limits=Limits(max_daily_views_per_user=2))
    await seed_stories(pg_store, [1, 2, 3])
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    endpoint = MetricsEndpoint(real_redis, pg_store, settings)
    async with client_for(site(tracker, endpoint)) as client:
        before = await scrape(client)
        seen = [
            await visit(client, "/stories/1"),  # counted
            await visit(client, "/stories/1"),  # cooldown
            await visit(client, "/stories/2"),  # counted: alice's second of two today
            await visit(client, "/stories/3"),  # daily limit
            await visit(client, "/stories/1", "bob"),
            await visit(client, "/stories/2", "bob"),
            await visit(client, "/stories/3", "carol"),
            await visit(client, "/stories/3", "dave", **{"user-agent": CRAWLER}),
            await visit(client, "/stories/3", "dave", **{"sec-purpose": "prefetch"}),
            await visit(client, "/stories/3", "dave", dnt="1"),
            await visit(client, f"/stories/{TOO_LARGE_ID}", "dave"),
            await visit(client, "/broken/3", "dave"),
        ]
        clock.advance(600)  # past the cooldown: alice's next view of story 1 is her second today
        seen.append(await visit(client, "/stories/1"))
        assert seen.count("1") == 5
        assert {"0; reason=cooldown", "0; reason=daily_limit", "0; reason=bot"} <= set(seen)
        pending = await scrape(client)
        assert pending[key("viewmw_pending_contents")] == 3  # stories 1, 2 and 3

        report = await ViewSync(real_redis, pg_store, settings).run()
        after = await scrape(client)

    grown = increase(before, after)
    expected = expected_from(seen)
    expected[key("viewmw_sync_runs_total", outcome="success")] = 1
    expected[key("viewmw_sync_duration_seconds_count")] = 1
    expected[key("viewmw_sync_views_moved_total")] = 5
    assert grown == expected
    # What the database holds is what the scrape says was counted and moved.
    assert report.views == 5
    assert await database_counts(pg_store, [1, 2, 3]) == {1: 2, 2: 2, 3: 1}
    # Read from the servers at scrape time.
    ledger = await pg_store.last_batches(1)
    assert after[key("viewmw_pending_contents")] == 0
    assert after[key("viewmw_outbox_views")] == 0
    assert after[key("viewmw_outbox_oldest_view_age_seconds")] == 0
    assert after[key("viewmw_redis_up")] == after[key("viewmw_database_up")] == 1
    committed = ledger[0]["committed_at"].timestamp()
    assert after[key("viewmw_last_sync_timestamp_seconds")] == pytest.approx(committed, abs=0.01)
    assert after[key("viewmw_sync_last_success_timestamp_seconds")] >= committed - 1


async def test_concurrent_views_decided_in_shared_batches_are_each_recorded_once(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, clock: FakeClock
) -> None:
    await seed_stories(pg_store, [1])
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)
    endpoint = MetricsEndpoint(real_redis, pg_store, settings)
    async with client_for(site(tracker, endpoint)) as client:
        before = await scrape(client)
        # One viewer 60 times at once (the rules admit one), and 60 viewers once each: the
        # views of one event-loop turn travel to Redis together.
        seen = await asyncio.gather(
            *(visit(client, "/stories/1", "eve") for _ in range(60)),
            *(visit(client, "/stories/1", f"reader{n}") for n in range(60)),
        )
        after = await scrape(client)
    assert seen.count("1") == 61
    assert increase(before, after) == expected_from(list(seen))


async def test_a_view_tracked_in_the_handler_is_recorded_once(
    real_redis: aioredis.Redis, pg_store: Store, settings: Settings, clock: FakeClock
) -> None:
    await seed_stories(pg_store, [1])
    tracker = ViewTracker(real_redis, pg_store, settings, clock=clock)

    async def story(request: Request) -> PlainTextResponse:
        view = await track(request)  # decided here; the response start reuses the outcome
        again = await track(request)
        return PlainTextResponse(
            f"a story seen {view.count} times", headers={"x-same": str(view is again)}
        )

    app = ViewTrackingMiddleware(
        Starlette(routes=[Route("/stories/{id:int}", story)]),
        tracker=tracker,
        routes={"/stories/{id:int}": "story"},
        viewer=user_of,
    )
    endpoint = MetricsEndpoint(real_redis, pg_store, settings)
    before = parse((await endpoint.render()).decode())
    async with client_for(app) as client:
        response = await client.get("/stories/1", headers={"user-agent": BROWSER, "x-user": "ann"})
    assert response.text == "a story seen 1 times" and response.headers["x-view-count"] == "1"
    assert response.headers["x-same"] == "True"  # a second track() offers nothing
    after = parse((await endpoint.render()).decode())
    assert increase(before, after) == expected_from(["1"])


async def test_every_blocking_rule_has_its_label(real_redis: aioredis.Redis) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    recorder = PrometheusRecorder(registry)
    recorder.views_decided([(0, code) for code in _REASONS] + [(1, 0), (-1, 0), (0, 0)])
    samples = parse(generate_latest(registry).decode())
    for reason in BlockReason:
        assert samples[key("viewmw_views_blocked_total", reason=reason.value)] == 1
    # A replayed view decided before (-1) and a crawler view (0 without a rule) are neither
    # counted nor blocked.
    assert samples[key("viewmw_views_counted_total")] == 1


def test_a_cluster_primarys_breaker_is_exported_by_its_address() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from viewmw.metrics.recording import PRIMARY_BREAKER

    registry = CollectorRegistry()
    recorder = PrometheusRecorder(registry)
    for state in ("closed", "open", "half-open", "open"):
        recorder.breaker_changed(PRIMARY_BREAKER + "127.0.0.1:7001", state)
    recorder.breaker_changed(PRIMARY_BREAKER + "127.0.0.1:7002", "closed")
    samples = parse(generate_latest(registry).decode())
    assert samples[key("viewmw_redis_primary_breaker_state", primary="127.0.0.1:7001")] == 2
    assert samples[key("viewmw_redis_primary_breaker_state", primary="127.0.0.1:7002")] == 0
    assert samples[key("viewmw_redis_primary_breaker_opened_total", primary="127.0.0.1:7001")] == 2
    # The process's own breaker is not moved by a primary's.
    assert samples[key("viewmw_breaker_state", breaker="redis")] == 0


async def test_an_outage_shows_in_the_breaker_the_failures_and_the_outbox(
    pg_store: Store, settings: Settings, clock: FakeClock, tmp_path: Path
) -> None:
    await seed_stories(pg_store, [1])
    server = RedisProcess(free_port())
    server.start()
    redis = connect_redis(settings.replace(redis_url=server.url))
    breaker_clock = FakeClock(0.0)
    failover = ResilientTracker(
        ViewTracker(redis, pg_store, settings, clock=clock),
        Outbox(pg_store.engine),
        breaker=CircuitBreaker(failure_threshold=3, reset_seconds=5.0, clock=breaker_clock),
        probe=RedisProbe(server.url, settings.redis_probe_timeout),
    )
    # The endpoint reads the outbox's age against the tracker's clock.
    endpoint = MetricsEndpoint(redis, pg_store, settings, clock=clock, timeout_seconds=1.0)
    try:
        async with client_for(site(failover, endpoint)) as client:
            assert await visit(client, "/stories/1", "user0") == "1"
            before = await scrape(client)
            server.kill()
            seen = [await visit(client, "/stories/1", f"user{n}") for n in range(1, 6)]
            # The first call meets the dead server's connection (unknown, unless the client saw
            # it closed first); the others cannot open one, so they were never sent, and are
            # kept; the third failure opens the breaker.
            assert seen[0] in ("0; reason=unavailable", "1; queued")
            assert seen[1:] == ["1; queued"] * 4
            queued = seen.count("1; queued")
            clock.advance(30)
            outage = await scrape(client)

            server.start()  # empty: the view counted before the outage is lost with it
            await recover(failover, breaker_clock)
            await failover.drain()
            after = await scrape(client)
    finally:
        await failover.aclose()
        await redis.aclose()
        server.kill()

    grown = increase(before, outage)
    assert grown[key("viewmw_redis_errors_total")] == 3
    assert grown[key("viewmw_views_queued_total")] == queued
    assert grown[key("viewmw_breaker_opened_total", breaker="redis")] == 1
    assert grown[key("viewmw_views_offered_total")] == 5
    assert outage[key("viewmw_breaker_state", breaker="redis")] == 2
    assert outage[key("viewmw_redis_up")] == 0
    assert key("viewmw_pending_contents") not in outage  # unknown, not 0
    assert outage[key("viewmw_outbox_views")] == queued
    assert outage[key("viewmw_outbox_oldest_view_age_seconds")] == 30

    assert after[key("viewmw_breaker_state", breaker="redis")] == 0
    assert after[key("viewmw_outbox_views")] == 0
    # The queued views were replayed through the rules, and counted.
    assert increase(outage, after)[key("viewmw_views_counted_total")] == queued


async def test_a_database_down_leaves_its_figures_out(
    real_redis: aioredis.Redis, settings: Settings
) -> None:
    down = Store.from_settings(
        settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/viewmw")
    )
    try:
        endpoint = MetricsEndpoint(real_redis, down, settings, timeout_seconds=1.0)
        samples = parse((await endpoint.render()).decode())
    finally:
        await down.close()
    assert samples[key("viewmw_database_up")] == 0
    assert samples[key("viewmw_redis_up")] == 1
    assert samples[key("viewmw_pending_contents")] == 0
    for figure in ("outbox_views", "outbox_oldest_view_age_seconds", "last_sync_timestamp_seconds"):
        assert key(f"viewmw_{figure}") not in samples


COUNTING_PROCESS = """
import asyncio, sys
from viewmw import Settings, ViewTracker, ViewTrackingMiddleware
from viewmw.assembly import connect_redis

async def main(name, views):
    settings = Settings(secret="metrics-processes-0123", redis_url={redis_url!r})
    redis = connect_redis(settings)
    app = ViewTrackingMiddleware(
        lambda scope, receive, send: send_page(send),
        tracker=ViewTracker(redis, None, settings),
        routes={{"/stories/{{id:int}}": "story"}},
        viewer=lambda scope: name,
    )
    async def send_page(send):
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"page"}})
    async def receive():
        return {{"type": "http.request"}}
    async def ignore(message):
        pass
    for n in range(views):
        scope = {{"type": "http", "method": "GET", "path": f"/stories/{{n}}",
                 "headers": [(b"user-agent", {browser!r})], "query_string": b"", "root_path": ""}}
        await app(scope, receive, ignore)
    await redis.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

SCRAPING_PROCESS = """
import asyncio
import json
from viewmw import Settings, Store
from viewmw.metrics import MetricsEndpoint
from viewmw.assembly import connect_redis

async def main():
    settings = Settings(redis_url={redis_url!r}, database_url={database_url!r})
    store, redis = Store.from_settings(settings), connect_redis(settings)
    await store.create_tables()
    print((await MetricsEndpoint(redis, store, settings).render()).decode())
    await store.close()
    await redis.aclose()

asyncio.run(main())
"""


def run_process(code: str, *args: str, directory: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


async def test_processes_sharing_a_multiprocess_directory_are_scraped_as_one(
    real_redis: aioredis.Redis, tmp_path: Path
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    counting = COUNTING_PROCESS.format(redis_url=REDIS_URL, browser=BROWSER.encode())
    # Two web processes count at the same time, each its own viewer on its own stories.
    processes = [
        run_process(counting, "user:a", "7", directory=directory),
        run_process(counting, "user:b", "5", directory=directory),
    ]
    for process in processes:
        await asyncio.to_thread(finished, process)
    scraping = SCRAPING_PROCESS.format(
        redis_url=REDIS_URL, database_url=f"sqlite+aiosqlite:///{tmp_path}/viewmw.sqlite3"
    )
    samples = parse(await asyncio.to_thread(finished, run_process(scraping, directory=directory)))
    assert samples[key("viewmw_views_offered_total")] == 12
    assert samples[key("viewmw_views_counted_total")] == 12
    assert samples[key("viewmw_request_added_seconds_count")] == 12
    assert samples[key("viewmw_pending_contents")] == 7  # stories 0-6, from this Redis
    assert samples[key("viewmw_breaker_state", breaker="redis")] == 0


def test_without_prometheus_client_viewmw_counts_and_the_endpoint_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import viewmw.metrics.recording as recording

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.setattr(recording, "_recorder", None)
    recorder = recording.recorder()
    assert type(recorder) is recording.Recorder and not recorder.enabled
    recorder.request_handled(b"1", 0.001)  # a no-op
    with pytest.raises(ConfigurationError) as raised:
        MetricsEndpoint(None, None, Settings())  # type: ignore[arg-type]
    assert str(raised.value) == (
        "MetricsEndpoint needs prometheus_client, which is not installed: "
        "pip install 'viewmw[metrics]'"
    )


def test_viewmw_imports_without_prometheus_client_and_does_not_import_it_early() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import viewmw, viewmw.metrics, viewmw.middleware\n"
        "from viewmw.metrics import recorder\n"
        "print(type(recorder()).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWMW_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Recorder"
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, viewmw; print('prometheus_client' in sys.modules)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert lazy.stdout.strip() == "False"


def test_time_is_a_real_clock_for_the_endpoint_by_default() -> None:
    endpoint = MetricsEndpoint(None, None, Settings())  # type: ignore[arg-type]
    assert abs(endpoint.clock() - time.time()) < 60


def exported_names() -> set[str]:
    """Every metric name a scrape can show, as written in queries (counters with ``_total``)."""
    from prometheus_client import CollectorRegistry

    from viewmw.metrics.prometheus import scraped_families

    registry = CollectorRegistry()
    PrometheusRecorder(registry)
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    }
    figures = scraped_families(
        redis_up=True,
        database_up=True,
        pending_contents=0,
        outbox_views=0,
        outbox_oldest_age=0.0,
        last_sync_timestamp=0.0,
    )
    return names | {family.name for family in figures}


def test_the_docs_list_every_metric_and_nothing_else() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(viewmw_\w+)`(?:, `(viewmw_\w+)`)?", page, re.M))
    names = {name for pair in documented for name in pair if name}
    assert names == exported_names()


def test_the_grafana_dashboard_queries_only_metrics_viewmw_exports() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "viewmw-dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expression in expressions
        for name in re.findall(r"viewmw_\w+", expression)
    }
    exported = exported_names()
    assert used <= exported, used - exported
    # Every metric has a panel, so the dashboard shows all of them.
    assert exported - used <= {
        "viewmw_sync_last_success_timestamp_seconds",
        "viewmw_breaker_opened_total",
        "viewmw_redis_primary_breaker_opened_total",
    }


def test_request_tallies_reach_the_histogram_as_observe_would_put_them() -> None:
    """The request path tallies buckets itself and adds them in bulk: the scrape must show what
    one observe() per request shows, bound values included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from viewmw.metrics.prometheus import REQUEST_BUCKETS

    seconds = [0.0, *REQUEST_BUCKETS, *(b * 1.5 for b in REQUEST_BUCKETS), 0.0004, 7.0]
    registry, reference = CollectorRegistry(), CollectorRegistry()
    recorder = PrometheusRecorder(registry)
    observed = Histogram(
        "viewmw_request_added_seconds", "x", buckets=REQUEST_BUCKETS, registry=reference
    )
    for value in seconds:
        recorder.request_handled(b"1", value)
        observed.observe(value)
    recorder.request_handled(b"0; reason=bot", 0.0)
    observed.observe(0.0)
    samples = parse(generate_latest(registry).decode())
    expected = parse(generate_latest(reference).decode())
    for sample, value in expected.items():
        if sample[0].endswith(("_bucket", "_count", "_sum")):
            assert samples[sample] == pytest.approx(value), sample
    assert samples[key("viewmw_views_offered_total")] == len(seconds)
    assert samples[key("viewmw_views_skipped_total", reason="bot")] == 1


def test_request_tallies_flush_on_a_timer_in_every_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a scrape, the tallies still reach the metrics (another process's scrape reads
    them from the multi-process files): on a timer, re-armed in a new event loop when the one it
    was set in closed first (a worker running one loop per message)."""
    from prometheus_client import CollectorRegistry

    import viewmw.metrics.prometheus as prometheus

    recorder = PrometheusRecorder(CollectorRegistry())

    async def record(turns: int) -> None:
        recorder.request_handled(b"1", 0.001)
        for _ in range(turns):
            await asyncio.sleep(0)

    def offered() -> float:
        return recorder._offered._value.get()  # type: ignore[attr-defined]  # no scrape

    monkeypatch.setattr(prometheus, "FLUSH_SECONDS", 3600.0)
    asyncio.run(record(0))  # its loop closes long before its timer is due
    assert offered() == 0
    monkeypatch.setattr(prometheus, "FLUSH_SECONDS", 0.0)
    asyncio.run(record(2))
    assert offered() == 2
