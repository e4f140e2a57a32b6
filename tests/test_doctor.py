"""`celery -A proj perkey doctor`: every rule against a real server configured to trigger
it, and once more configured so that it does not fire."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result

from celery_perkey_backend.cli import perkey
from celery_perkey_backend.doctor import RULES
from celery_perkey_backend.keys import KeyLayout, acl_rules
from celery_perkey_backend.testing import EmbeddedServer, LocalCluster, free_port

#: The rule ids monitoring keys on: renaming one breaks this test on purpose.
STABLE_IDS = [
    "eviction-policy",
    "memory-headroom",
    "maxclients",
    "server-timeout",
    "tcp-keepalive",
    "persistence",
    "cluster-health",
    "cluster-url",
    "result-expires-without-delete",
    "socket-timeout-below-block",
    "min-replicas",
    "keys-without-ttl",
]


def run(app: Any, *args: str) -> Result:
    """``celery -A app perkey …``, in this process."""
    context = CLIContext(app=app, no_color=True, workdir=None)
    return CliRunner().invoke(perkey, list(args), obj=context, catch_exceptions=False)


def check(app: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    """``doctor --json``: its exit code and its findings by rule id."""
    done = run(app, "doctor", "--json")
    assert done.exit_code in (0, 6), done.output
    report = json.loads(done.stdout)
    return done.exit_code, {f["rule"]: f for f in report["findings"]}


@pytest.fixture
def configured(make_app: Callable[..., Celery]) -> Iterator[Callable[..., Any]]:
    """Start a server with the given arguments and an app on it; stopped afterwards."""
    servers: list[EmbeddedServer] = []

    def factory(*args: str, **conf: Any) -> tuple[EmbeddedServer, Celery]:
        srv = EmbeddedServer(args=list(args)).start()
        servers.append(srv)
        return srv, make_app(backend=f"perkey://127.0.0.1:{srv.port}/0", **conf)

    yield factory
    for srv in servers:
        srv.stop()


def until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.02)


# -- the report as a whole -------------------------------------------------------------


def test_every_rule_reports_once_under_its_stable_id(configured: Any) -> None:
    _, app = configured("--appendonly", "yes")
    code, findings = check(app)
    assert [rule.id for rule in RULES] == STABLE_IDS
    assert list(findings) == STABLE_IDS
    for finding in findings.values():
        assert finding["severity"] in ("ok", "info", "unknown", "warning", "danger")
        assert finding["finding"] and finding["why"] and finding["fix"]
    # A default server with AOF on has nothing to report.
    assert {f["severity"] for f in findings.values()} == {"ok"}
    assert code == 0


def test_text_gives_finding_why_and_fix_worst_first(configured: Any) -> None:
    _, app = configured("--maxmemory", "50mb", "--maxmemory-policy", "allkeys-lru")
    done = run(app, "doctor")
    assert done.exit_code == 6
    lines = done.stdout.splitlines()
    assert lines[0].startswith("DANGER  eviction-policy: maxmemory-policy is allkeys-lru")
    assert lines[1].strip().startswith("why: Eviction deletes results")
    assert any(line.strip().startswith("fix: Set maxmemory-policy noeviction") for line in lines)
    assert "OK      memory-headroom:" in done.stdout
    assert lines[-1].startswith("danger: 1, warning: ")


def test_an_unreachable_server_is_one_masked_line(make_app: Any) -> None:
    app = make_app(backend=f"perkey://:hunter2@127.0.0.1:{free_port()}/0")
    done = run(app, "doctor")
    assert done.exit_code == 3
    assert "hunter2" not in done.output
    assert "127.0.0.1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- eviction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "conf", "severity"),
    [
        (["--maxmemory", "50mb", "--maxmemory-policy", "allkeys-lru"], {}, "danger"),
        (["--maxmemory", "50mb", "--maxmemory-policy", "allkeys-random"], {}, "danger"),
        (["--maxmemory", "50mb", "--maxmemory-policy", "volatile-ttl"], {}, "danger"),
        (
            ["--maxmemory", "50mb", "--maxmemory-policy", "volatile-lru"],
            {"result_expires": None},
            "warning",
        ),
        (["--maxmemory-policy", "allkeys-lfu"], {}, "warning"),
        (["--maxmemory", "50mb"], {}, "ok"),
    ],
)
def test_eviction_policy(
    configured: Any, args: list[str], conf: dict[str, Any], severity: str
) -> None:
    _, app = configured(*args, **conf)
    code, findings = check(app)
    assert findings["eviction-policy"]["severity"] == severity
    assert (code == 6) == (severity == "danger")


def test_the_eviction_it_warns_of_loses_acknowledged_results(configured: Any) -> None:
    srv, app = configured("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    ids = [f"evict-{i}" for i in range(3000)]
    for task_id in ids:
        app.backend.store_result(task_id, "x" * 1000, states.SUCCESS)
    assert redis.Redis(port=srv.port).info("stats")["evicted_keys"] > 0
    pending = [i for i in ids if app.AsyncResult(i).state == states.PENDING]
    assert pending, "every stored result survived"
    assert check(app)[1]["eviction-policy"]["severity"] == "danger"


# -- memory ------------------------------------------------------------------------------


def test_memory_headroom(configured: Any) -> None:
    srv, app = configured("--maxmemory", "10mb")
    raw = redis.Redis(port=srv.port)
    assert check(app)[1]["memory-headroom"]["severity"] == "ok"
    limit = 10 * 1024 * 1024

    def fill_to(share: float) -> float:
        chunk = 0
        while raw.info("memory")["used_memory"] < share * limit:
            raw.set(f"filler:{share}:{chunk}", b"x" * 50_000)
            chunk += 1
        return float(raw.info("memory")["used_memory"]) / limit

    assert fill_to(0.8) < 0.9
    _, findings = check(app)
    assert findings["memory-headroom"]["severity"] == "warning"
    fill_to(0.92)
    code, findings = check(app)
    assert findings["memory-headroom"]["severity"] == "danger"
    assert "of maxmemory 10.0 MiB" in findings["memory-headroom"]["finding"]
    assert code == 6


# -- clients -----------------------------------------------------------------------------


def test_maxclients_against_the_connections_and_blocked_waiters(configured: Any) -> None:
    srv, app = configured("--maxclients", "10")
    raw = redis.Redis(port=srv.port)
    assert check(app)[1]["maxclients"]["severity"] == "ok"
    # A real waiter, blocked on the server, and idle clients: 9 of 10 with the doctor.
    waiter = threading.Thread(target=lambda: app.AsyncResult("slow").get(timeout=30))
    waiter.start()
    until(lambda: raw.info("clients")["blocked_clients"] == 1, "the waiter blocks")
    idle = [redis.Redis(port=srv.port) for _ in range(6)]
    for client in idle:
        client.ping()
    try:
        code, findings = check(app)
    finally:
        app.backend.store_result("slow", 1, states.SUCCESS)
        waiter.join(10)
        for client in [*idle, raw]:
            client.close()
    found = findings["maxclients"]
    assert found["severity"] == "danger"
    (node,) = found["details"]["nodes"].values()
    assert node["blocked_clients"] == 1
    assert node["connected_clients"] >= 9
    assert code == 6


def test_maxclients_against_the_pool_the_app_may_open(configured: Any) -> None:
    _, app = configured("--maxclients", "20", redis_max_connections=50)
    found = check(app)[1]["maxclients"]
    assert found["severity"] == "warning"
    assert "redis_max_connections" in found["finding"]
    _, app = configured("--maxclients", "20", redis_max_connections=5)
    assert check(app)[1]["maxclients"]["severity"] == "ok"


# -- timeouts ----------------------------------------------------------------------------


def test_server_timeout(configured: Any) -> None:
    _, app = configured("--timeout", "1")
    found = check(app)[1]["server-timeout"]
    assert found["severity"] == "info"
    assert found["details"]["nodes"]
    # Why it is only "info": a wait blocked past the server's timeout still returns.
    threading.Timer(2.5, lambda: app.backend.store_result("late", 42, states.SUCCESS)).start()
    assert app.AsyncResult("late").get(timeout=10) == 42
    _, app = configured()
    assert check(app)[1]["server-timeout"]["severity"] == "ok"


def test_tcp_keepalive(configured: Any) -> None:
    _, app = configured("--tcp-keepalive", "0")
    assert check(app)[1]["tcp-keepalive"]["severity"] == "warning"
    _, app = configured("--tcp-keepalive", "60")
    assert check(app)[1]["tcp-keepalive"]["severity"] == "ok"


# -- persistence -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "severity"),
    [
        (["--appendonly", "no", "--save", ""], "warning"),
        (["--appendonly", "no", "--save", "3600", "1"], "info"),
        (["--appendonly", "yes", "--save", ""], "ok"),
    ],
)
def test_persistence(configured: Any, args: list[str], severity: str) -> None:
    _, app = configured(*args)
    code, findings = check(app)
    assert findings["persistence"]["severity"] == severity
    assert code == 0  # a warning, not an error: some deployments accept it


# -- app settings ------------------------------------------------------------------------


def test_result_expires_without_delete(configured: Any) -> None:
    _, app = configured(result_expires=None)
    assert check(app)[1]["result-expires-without-delete"]["severity"] == "warning"
    _, app = configured(result_expires=None, perkey_sweep_delete=True)
    assert check(app)[1]["result-expires-without-delete"]["severity"] == "ok"
    _, app = configured(result_expires=3600)
    assert check(app)[1]["result-expires-without-delete"]["severity"] == "ok"


@pytest.mark.parametrize(
    ("timeout", "severity"), [(0.5, "warning"), (5.0, "info"), (None, "ok"), (120.0, "ok")]
)
def test_socket_timeout_below_the_block_cap(
    configured: Any, timeout: float | None, severity: str
) -> None:
    conf = {} if timeout is None else {"redis_socket_timeout": timeout}
    _, app = configured(**conf)
    assert check(app)[1]["socket-timeout-below-block"]["severity"] == severity


def test_min_replicas(configured: Any) -> None:
    # Diskless sync without its 5 s delay: the replica is online at once.
    srv, app = configured("--repl-diskless-sync-delay", "0", perkey_min_replicas=1)
    code, findings = check(app)
    assert findings["min-replicas"]["severity"] == "danger"
    assert code == 6
    replica = EmbeddedServer(args=["--replicaof", "127.0.0.1", str(srv.port)]).start()
    try:
        raw = redis.Redis(port=srv.port)
        until(
            lambda: raw.info("replication").get("slave0", {}).get("state") == "online",
            "the replica comes online",
        )
        assert check(app)[1]["min-replicas"]["severity"] == "ok"
    finally:
        replica.stop()
    _, app = configured()
    assert check(app)[1]["min-replicas"]["severity"] == "ok"


# -- TTLs --------------------------------------------------------------------------------


def test_keys_without_ttl(configured: Any) -> None:
    _, app = configured(result_expires=None)
    app.backend.store_result("forever", 1, states.SUCCESS)
    found = check(app)[1]["keys-without-ttl"]
    assert found["severity"] == "warning"
    assert found["details"]["keys_without_ttl"] == 1
    _, app = configured()
    app.backend.store_result("mortal", 1, states.SUCCESS)
    found = check(app)[1]["keys-without-ttl"]
    assert found["severity"] == "ok"
    assert found["details"]["our_keys"] == 1


# -- least privilege ---------------------------------------------------------------------


def test_the_restricted_user_gets_unknown_instead_of_failing(
    make_app: Any, r: redis.Redis, server: Any
) -> None:
    rules = acl_rules(KeyLayout("celery-perkey:")).split()
    r.acl_setuser("doctor-acl", enabled=True, passwords=["+pw"], reset=True)
    r.execute_command("ACL", "SETUSER", "doctor-acl", *rules)
    try:
        app = make_app(backend=f"perkey://doctor-acl:pw@127.0.0.1:{server.port}/0")
        app.backend.store_result("t1", 1, states.SUCCESS)
        code, findings = check(app)
    finally:
        r.acl_deluser("doctor-acl")
    severities = {rule: f["severity"] for rule, f in findings.items()}
    # CONFIG GET is not granted: what only it shows is unknown, and says why.
    for rule in ("server-timeout", "tcp-keepalive", "persistence"):
        assert severities[rule] == "unknown", findings[rule]
        assert "no permissions" in findings[rule]["finding"]
    # INFO and the keyspace are granted: those rules read as usual.
    for rule in ("eviction-policy", "memory-headroom", "maxclients", "keys-without-ttl"):
        assert severities[rule] == "ok", findings[rule]
    assert code == 0


# -- cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=0) as local:
        yield local


@contextmanager
def paused(cluster: LocalCluster, port: int) -> Iterator[None]:
    """A primary frozen (SIGSTOP), as a hung host is; thawed and healthy afterwards."""
    process = cluster.servers[port].process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)
        cluster.wait_healthy()


def test_cluster_health(make_app: Any, cluster: LocalCluster) -> None:
    app = make_app(backend=cluster.url, broker_url="memory://", redis_socket_timeout=2)
    code, findings = check(app)
    found = findings["cluster-health"]
    assert found["severity"] == "ok"
    assert len(found["details"]["nodes"]) == 3
    assert code == 0

    # A slot no primary serves.
    owner = cluster.primary_for_slot(100)
    cluster.client(owner).execute_command("CLUSTER", "DELSLOTS", 100)
    try:
        code, findings = check(app)
    finally:
        cluster.client(owner).execute_command("CLUSTER", "ADDSLOTS", 100)
        cluster.wait_healthy()
    assert findings["cluster-health"]["severity"] == "danger"
    assert "1 slot(s) assigned to no primary" in findings["cluster-health"]["finding"]
    assert code == 6

    # A primary that stopped answering, and that the others mark failed.
    victim, witness = cluster.primaries()[1], cluster.primaries()[0]
    with paused(cluster, victim):
        until(
            lambda: (
                "cluster_state:fail" in cluster.client(witness).execute_command("CLUSTER", "INFO")
            ),
            "the others mark the paused primary failed",
        )
        code, findings = check(app)
    found = findings["cluster-health"]
    assert found["severity"] == "danger"
    assert f"127.0.0.1:{victim}: the primary does not answer" in found["finding"]
    assert "cluster_state:fail" in found["finding"]
    assert code == 6
    # The other rules still report on the primaries that answer, and say what they lack.
    assert findings["eviction-policy"]["severity"] == "unknown"
    assert f"127.0.0.1:{victim}: cannot be read" in findings["eviction-policy"]["finding"]
    assert findings["persistence"]["severity"] == "warning"
    assert findings["keys-without-ttl"]["severity"] == "unknown"
