"""A real local Redis Cluster for the tests: three primaries on loopback ports, no replicas.

Started with the machine's own ``redis-server`` and ``redis-cli`` (``redis-cli --cluster create``),
as an operator would, in a temporary directory of its own; stopped and removed by
:func:`local_cluster`'s exit (the ``redis_cluster`` fixture in tests/conftest.py keeps one per run).
A missing binary fails with how to install it: the cluster tests never pass by skipping.

:meth:`LocalCluster.kill` and :meth:`LocalCluster.restart` stop one primary with ``SIGKILL`` and
bring it back on the same ports with the same node configuration file, so it rejoins with its node
id and its slots. What it still holds then is what its persistence kept: nothing by default
(``--save '' --appendonly no``); start the cluster with ``persistent=True`` (an append-only file
written at every command) for tests that need the data back.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.asgi_support import free_port

HOW_TO_INSTALL = (
    "the Redis Cluster tests need `redis-server` and `redis-cli` (Redis 7 or newer) on PATH; "
    "missing: {missing}. Install them with `apt-get install redis-server` (Debian, Ubuntu), "
    "`brew install redis` (macOS) or your distribution's Redis package."
)
# Seconds for a server to answer, and for the cluster to agree on its slots.
START_TIMEOUT = 30.0
# Seconds before the other primaries take a silent one for failed. Short enough that a test can
# watch it happen, long enough that a busy CI machine does not make a primary look dead.
NODE_TIMEOUT_MS = 5000


class ClusterError(RuntimeError):
    """The local cluster did not start, or did not come back after a restart."""


@dataclass
class LocalNode:
    """One primary: its client port, its cluster bus port and its running process."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        """The node configuration Redis keeps: its node id, its slots, the other nodes."""
        return self.directory / "nodes.conf"


@dataclass
class LocalCluster:
    """A running local cluster; build it with :func:`local_cluster`."""

    directory: Path
    persistent: bool = False
    nodes: list[LocalNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL of every primary, as ``VIEWMW_REDIS_URL`` takes it."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def client(self, node: LocalNode) -> redis.Redis:
        """A plain (non-cluster) client of one node, for checks such as ``DBSIZE``."""
        return redis.Redis(port=node.port, socket_timeout=5)

    def node_for_slot(self, slot: int) -> LocalNode:
        """The primary serving ``slot`` (``CLUSTER SHARDS`` of any node that answers)."""
        for node in self.nodes:
            if node.process is None:
                continue
            for line in self._slot_lines(node):
                start, end, port = line
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == port)
        raise ClusterError(f"no node serves slot {slot}")

    def _slot_lines(self, node: LocalNode) -> list[tuple[int, int, int]]:
        with self.client(node) as client:
            reply = client.execute_command("CLUSTER SLOTS")
        return [(int(start), int(end), int(owner[1])) for start, end, owner, *_ in reply]

    def _command(self, node: LocalNode) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(node.port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-port", str(node.bus_port),
            "--cluster-config-file", str(node.config_file),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--dir", str(node.directory),
            "--logfile", str(node.directory / "redis.log"),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
        ]  # fmt: skip

    def _spawn(self, node: LocalNode) -> None:
        node.process = subprocess.Popen(
            self._command(node), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait(lambda: _answers(node), f"redis-server on port {node.port} to answer", node)

    def kill(self, node: LocalNode) -> None:
        """Stop one primary with ``SIGKILL``, as a crash would: no shutdown, no save."""
        if node.process is None:
            return
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)
        node.process = None

    def restart(self, node: LocalNode) -> None:
        """Start a killed primary again on its ports with its node configuration, and wait
        until every node reports the cluster healthy with all slots served."""
        if node.process is not None:
            raise ClusterError(f"node {node.address} is running; kill it first")
        self._spawn(node)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Wait until every node says ``cluster_state:ok`` with all 16384 slots assigned."""
        for node in self.nodes:
            _wait(lambda node=node: _healthy(node, len(self.nodes)), "cluster_state:ok", node)

    def stop(self) -> None:
        """Stop every node (``SIGKILL``: the data is thrown away) and remove the directory."""
        try:
            for node in self.nodes:
                self.kill(node)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _answers(node: LocalNode) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(7) == b"+PONG\r\n"
    except OSError:
        return False


def _healthy(node: LocalNode, primaries: int) -> bool:
    try:
        with redis.Redis(port=node.port, socket_timeout=2) as client:
            info = client.execute_command("CLUSTER INFO")
    except (redis.RedisError, OSError):
        return False
    if isinstance(info, dict):  # redis-py parses the reply on some versions
        fields = {key: str(value) for key, value in info.items()}
    else:
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return (
        fields.get("cluster_state") == "ok"
        and fields.get("cluster_slots_ok") == "16384"
        and fields.get("cluster_known_nodes") == str(primaries)
    )


def _wait(ready: Callable[[], bool], what: str, node: LocalNode) -> None:
    """Poll ``ready()`` until it is true; fail with the node's log if its process died or the
    time ran out. Polling a server starting in another process has no clock to inject."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if node.process is not None and node.process.poll() is not None:
            raise ClusterError(f"redis-server on port {node.port} exited: {_log_tail(node)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"waited {START_TIMEOUT:.0f} s for {what}: {_log_tail(node)}")
        time.sleep(0.05)


def _log_tail(node: LocalNode) -> str:
    stderr = b""
    if node.process is not None and node.process.stderr is not None and node.process.poll():
        stderr = node.process.stderr.read()
    try:
        log = (node.directory / "redis.log").read_text(errors="replace")
    except OSError:
        log = ""
    return (stderr.decode(errors="replace") + log)[-2000:] or "(no log)"


def missing_binaries() -> list[str]:
    """The binaries the local cluster needs that are not on PATH."""
    return [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return list(ports)


@contextmanager
def local_cluster(primaries: int = 3, *, persistent: bool = False) -> Iterator[LocalCluster]:
    """Start a cluster of ``primaries`` primaries (no replicas) and stop it on exit.

    Raises:
        ClusterError: a binary is missing (with how to install it), or the cluster did not start.
    """
    missing = missing_binaries()
    if missing:
        raise ClusterError(HOW_TO_INSTALL.format(missing=", ".join(missing)))
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="viewmw-tests-cluster-")), persistent)
    try:
        ports = _free_ports(2 * primaries)
        for n in range(primaries):
            directory = cluster.directory / f"node-{n}"
            directory.mkdir()
            node = LocalNode(ports[2 * n], ports[2 * n + 1], directory)
            cluster.nodes.append(node)
            cluster._spawn(node)
        create = [
            shutil.which("redis-cli") or "redis-cli",
            "--cluster", "create",
            *(node.address for node in cluster.nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        created = subprocess.run(create, capture_output=True, timeout=START_TIMEOUT)
        if created.returncode != 0:
            output = (created.stdout + created.stderr).decode(errors="replace")
            raise ClusterError(f"redis-cli --cluster create failed: {output[-2000:]}")
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def local_server() -> Iterator[str]:
    """One ``redis-server`` of the cluster's build (not a cluster), without persistence, on a
    free port; yields its URL. Where two servers must be of one build (``DUMP``/``RESTORE``
    between them), this is the single Redis beside :func:`local_cluster`.

    Raises:
        ClusterError: ``redis-server`` is missing (with how to install it), or did not start.
    """
    missing = missing_binaries()
    if missing:
        raise ClusterError(HOW_TO_INSTALL.format(missing=", ".join(missing)))
    directory = Path(tempfile.mkdtemp(prefix="viewmw-tests-redis-"))
    node = LocalNode(free_port(), 0, directory)
    command = [
        shutil.which("redis-server") or "redis-server",
        "--port", str(node.port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    node.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _answers(node), f"redis-server on port {node.port} to answer", node)
        yield f"redis://127.0.0.1:{node.port}/0"
    finally:
        node.process.kill()
        node.process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
