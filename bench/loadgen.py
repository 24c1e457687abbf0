"""An HTTP/1.1 load generator, run in its own process: ``python -m bench.loadgen PORT PATH …``.

Two modes, both on keep-alive connections with one request in flight per connection:

- closed loop (default): each connection sends its next request as soon as the previous answer
  is in, for ``--seconds``; this measures throughput.
- open loop (``--rate R``): requests are due at a fixed schedule, R per second, whatever the
  server does; latency is measured from the time a request was *due*, so a server that falls
  behind is charged for the queue it causes (no coordinated omission).

Why not wrk: it must be installed as a system package (root), and the fixed-rate wrk2 is not in
Debian at all. A plain ``selectors`` loop over non-blocking sockets costs a few tens of µs of CPU
per request; it reports its own CPU time, so a round where it, and not the server, was the
bottleneck shows in the results. Connection ``i`` binds to the loopback address 127.0.0.(2+i), so
the server sees several client addresses and thus more distinct anonymous viewers.

Prints one JSON object: requests answered, seconds, errors, answers without ``X-View-Count``,
this process's CPU seconds and, in open loop, every latency in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import resource
import selectors
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

USER_AGENTS = 500  # distinct browsers: the crawler check's per-agent cache sees a realistic mix
STORIES = 1000
DRAIN_SECONDS = 30.0  # how long answers still due at the end of a run are awaited
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def request_bytes(path: str, rng: random.Random) -> bytes:
    """One GET; ``/stories/`` gets a random story id, every request a random user agent."""
    if path == "/stories/":
        path = f"/stories/{rng.randint(1, STORIES)}"
    agent = f"Mozilla/5.0 (X11; Linux x86_64) bench/{rng.randint(1, USER_AGENTS)}"
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: {agent}\r\n\r\n".encode()


@dataclass
class Connection:
    """One keep-alive connection and the answer it is reading."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    due: float = 0.0  # when the request in flight was due (open loop) or sent (closed loop)


@dataclass
class Results:
    """What one run saw."""

    requests: int = 0
    errors: int = 0
    without_count: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


def connect(port: int, index: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):  # without the whole 127/8 on loopback: one address
        sock.bind((f"127.0.0.{2 + index % 250}", 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def take_answer(connection: Connection, results: Results) -> bool:
    """Consume one complete answer from the buffer, if there is one."""
    buffer = connection.buffer
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(buffer[:end])
    length = _CONTENT_LENGTH.search(head)
    if length is None:
        raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
    total = end + 4 + int(length.group(1))
    if len(buffer) < total:
        return False
    del buffer[:total]
    results.requests += 1
    if head[9:12] != b"200":
        results.errors += 1
    if b"\r\nx-view-count:" not in head.lower():
        results.without_count += 1
    return True


def run(port: int, path: str, connections: int, seconds: float, rate: float | None) -> Results:
    """Drive the server for ``seconds``, then wait for every answer still due."""
    rng = random.Random(port)
    selector = selectors.DefaultSelector()
    idle: deque[Connection] = deque()
    for index in range(connections):
        connection = Connection(connect(port, index))
        selector.register(connection.sock, selectors.EVENT_READ, connection)
        idle.append(connection)
    results = Results()
    in_flight = 0
    start = time.perf_counter()
    deadline = start + seconds
    due_count = 0  # open loop: requests whose time has come (sent or waiting for a connection)
    total_due = int(seconds * rate) if rate else 0

    def send(connection: Connection, due: float) -> None:
        nonlocal in_flight
        connection.due = due
        connection.sock.sendall(request_bytes(path, rng))
        in_flight += 1

    while True:
        now = time.perf_counter()
        if rate is None:
            if now < deadline:
                while idle:
                    send(idle.popleft(), now)
            timeout = 1.0
        else:
            # Requests are due at start + k / rate; those past due wait for a connection.
            while idle and due_count < total_due and start + due_count / rate <= now:
                send(idle.popleft(), start + due_count / rate)
                due_count += 1
            if idle and due_count < total_due:
                timeout = max(0.0, start + due_count / rate - now)
            else:  # nothing can be sent before an answer comes in
                timeout = 1.0
        finished = (now >= deadline if rate is None else due_count >= total_due) and not in_flight
        if finished:
            break
        if now > deadline + DRAIN_SECONDS:  # a server this late has failed
            raise RuntimeError(
                f"{in_flight} requests unanswered {DRAIN_SECONDS:.0f} s after the run"
            )
        for key, _ in selector.select(timeout):
            connection = key.data
            data = connection.sock.recv(262_144)
            if not data:
                raise RuntimeError("the server closed a connection")
            connection.buffer += data
            while take_answer(connection, results):
                in_flight -= 1
                if rate is not None:
                    results.latencies_ms.append((time.perf_counter() - connection.due) * 1000)
                idle.append(connection)
    results.seconds = time.perf_counter() - start
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("port", type=int)
    parser.add_argument("path", help="/stories/ gets a random story id per request")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, help="requests per second (open loop)")
    args = parser.parse_args()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    results = run(args.port, args.path, args.connections, args.seconds, args.rate)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    json.dump(
        {
            "requests": results.requests,
            "seconds": results.seconds,
            "errors": results.errors,
            "without_count": results.without_count,
            "cpu_seconds": cpu,
            "latencies_ms": results.latencies_ms,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
