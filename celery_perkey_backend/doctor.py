"""The doctor: checks the server and the app's settings for hazards to results.

:func:`diagnose` runs every rule and returns a :class:`Report` of findings. Each finding
has a stable rule id (for monitoring), a severity, what was found, why it matters and
the fix. It reads only what the least-privilege ACL user may read (``INFO``, the
keyspace through ``stats``); the few facts ``INFO`` does not show (the server's
``timeout``, ``tcp-keepalive``, RDB save points) come from ``CONFIG GET``, and a cluster's
health from ``CLUSTER INFO``. A rule whose facts cannot be read (a refused command, an
older server without the field, a node that does not answer) says ``unknown`` rather
than failing. Server rules run on every primary; a rule's finding is the worst of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import redis

from .errors import BackendUnavailableError, CredentialsRefusedError, PerkeyError
from .stats import collect_stats, human_bytes
from .store import ResultStore
from .sweep import HasStore, store_of
from .waiting import MAX_BLOCK, block_cap

__all__ = ["RULES", "SEVERITIES", "Finding", "Report", "diagnose"]

#: Severities, least serious first. Only ``danger`` makes the CLI exit non-zero.
SEVERITIES = ("ok", "info", "unknown", "warning", "danger")
_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}

#: Shares of a limit at which a figure is worth a warning, and dangerous.
NEAR, FULL = 0.75, 0.9

#: Slots of a Redis Cluster.
CLUSTER_SLOTS = 16384

#: A wait split into blocks shorter than this is close to polling.
SHORT_BLOCK = 1.0


class Rule(NamedTuple):
    """A rule: its stable id, why it matters, and the fix when it fires."""

    id: str
    why: str
    fix: str


RULES: tuple[Rule, ...] = (
    Rule(
        "eviction-policy",
        "Eviction deletes results that were stored and acknowledged: their tasks look "
        "PENDING forever and get() just times out. In one measurement under allkeys-lru, "
        "2,699 of 20,000 acknowledged results survived. volatile-* policies evict keys "
        "with a TTL, which every result has while result_expires is set.",
        "Set maxmemory-policy noeviction on the results' server (CONFIG SET and "
        "redis.conf) and size maxmemory for your result rate times result_expires; keep "
        "caches that need eviction on another server.",
    ),
    Rule(
        "memory-headroom",
        "At maxmemory, a noeviction server refuses every store (the task's result is "
        "lost, its waiter waits for nothing), and an evicting one deletes results.",
        "Raise maxmemory, shorten result_expires, or sweep keys without a TTL "
        "(celery -A proj perkey sweep).",
    ),
    Rule(
        "maxclients",
        "Every waiting get() holds one connection, blocked on the server. Past maxclients "
        "the server refuses new connections: waits and stores fail.",
        "Raise maxclients (and the process's file limit), or cap each process's pool with "
        "redis_max_connections below what the server has free.",
    ),
    Rule(
        "server-timeout",
        "The server closes connections idle longer than timeout. Blocked waits are exempt "
        "(measured: a get() blocked past it still returns), and redis-py reopens a pooled "
        "connection the server closed, so this costs reconnects (TLS handshakes), not "
        "results.",
        "timeout 0 in redis.conf, or a value above your longest quiet period.",
    ),
    Rule(
        "tcp-keepalive",
        "Without TCP keepalives the server never notices a client whose host vanished "
        "(power loss, a dropped network) while its connection is quiet: a dead worker's "
        "pooled connections stay open forever, a dead waiter's until the kernel gives up "
        "resending the reply to its block (about 15 minutes on Linux), all counting "
        "against maxclients.",
        "tcp-keepalive 300 (the default since Redis 3.2.1) in redis.conf.",
    ),
    Rule(
        "persistence",
        "With neither AOF nor RDB, a restart of the server loses every stored result: "
        "their tasks look PENDING again. Some deployments accept that; it is a warning.",
        "appendonly yes (with appendfsync always, acknowledged results survive a "
        "restart), or at least RDB save points.",
    ),
    Rule(
        "cluster-health",
        "A failed cluster, or slots no primary serves, refuses every store and read of "
        "the results in those slots.",
        "Bring the failed primaries back or fail over to a replica (CLUSTER FAILOVER), "
        "and assign every slot (valkey-cli --cluster fix).",
    ),
    Rule(
        "cluster-url",
        "A node of a Redis Cluster serves only its own slots and answers MOVED (or ASK) "
        "for the others. Through a plain URL, every store and wait of a result in "
        "another node's slots fails with a ConfigurationError.",
        "Use a cluster URL naming one or more of its nodes: "
        "perkey+cluster://host:port,host:port/0.",
    ),
    Rule(
        "result-expires-without-delete",
        "With result_expires None, results are stored without a TTL, and Celery beat "
        "schedules no backend_cleanup. With perkey_sweep_delete off, a sweep only gives "
        "such keys perkey_sweep_ttl, and only if one is scheduled: otherwise the "
        "keyspace only grows.",
        "Set result_expires (e.g. '1d'), or schedule the celery_perkey_backend.sweep "
        "task (README, 'Scheduling it by configuration') with perkey_sweep_delete = True.",
    ),
    Rule(
        "socket-timeout-below-block",
        f"A wait blocks in steps of at most {MAX_BLOCK:g} s and always below "
        "redis_socket_timeout. A short socket timeout splits every wait into many short "
        "blocks: more commands per waiting get(), and near polling below 1 s.",
        # block_cap keeps a fifth of the socket timeout as its margin.
        f"Set redis_socket_timeout to {MAX_BLOCK / 0.8:g} s or more (Celery's default is 120 s).",
    ),
    Rule(
        "min-replicas",
        "With perkey_min_replicas = n, a store counts only once n replicas have it; with "
        "fewer replicas online every store fails with BackendUnavailableError after "
        "perkey_min_replicas_timeout.",
        "Bring replicas up (INFO replication shows them), or lower perkey_min_replicas.",
    ),
    Rule(
        "keys-without-ttl",
        "Keys of ours without a TTL never expire: results stored with result_expires "
        "None, a TTL removed by PERSIST, a restore or a migration.",
        "celery -A proj perkey sweep gives them one (perkey_sweep_ttl); find the cause "
        "with celery -A proj perkey stats.",
    ),
)
_BY_ID = {rule.id: rule for rule in RULES}


@dataclass(frozen=True)
class Finding:
    """What one rule found.

    ``details`` holds the figures read, for monitoring: under ``"nodes"`` by server for
    the server rules.
    """

    rule: str
    severity: str
    finding: str
    why: str
    fix: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "finding": self.finding,
            "why": self.why,
            "fix": self.fix,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class Report:
    """Every rule's finding, in the order of :data:`RULES`."""

    findings: tuple[Finding, ...]

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=_RANK.__getitem__, default="ok")

    @property
    def dangerous(self) -> bool:
        return self.worst == "danger"

    def counts(self) -> dict[str, int]:
        return {name: sum(f.severity == name for f in self.findings) for name in SEVERITIES}

    def get(self, rule: str) -> Finding:
        """The finding of one rule, by its id."""
        return next(f for f in self.findings if f.rule == rule)

    def as_dict(self) -> dict[str, Any]:
        return {
            "worst": self.worst,
            "counts": self.counts(),
            "findings": [f.as_dict() for f in self.findings],
        }


class Verdict(NamedTuple):
    """A rule's verdict on one server, or on the app; ``fix`` overrides the rule's."""

    severity: str
    finding: str
    details: Mapping[str, Any] = {}
    fix: str | None = None


class Unreadable(Exception):
    """A fact a rule needs cannot be read; the rule's verdict is ``unknown``."""


class Server:
    """One primary, as the rules read it: each INFO section and config fetched once.

    A server that could not be reached is not asked again: every later read raises
    the same error at once, instead of waiting out another socket timeout.
    """

    def __init__(self, store: ResultStore, node: redis.Redis) -> None:
        self.store = store
        self.node = node
        self.name = store.node_name(node)
        self._cache: dict[tuple[str, str], Any] = {}
        self.lost: BackendUnavailableError | None = None

    def _read(self, kind: str, name: str, fetch: Callable[[], Any]) -> Any:
        if self.lost is not None:
            raise self.lost
        if (kind, name) not in self._cache:
            try:
                self._cache[kind, name] = fetch()
            except BackendUnavailableError as exc:
                self.lost = exc
                raise
        return self._cache[kind, name]

    def info(self, section: str) -> dict[str, Any]:
        found: dict[str, Any] = self._read(
            "info", section, lambda: self.store.server_info(self.node, section)
        )
        return found

    def field(self, section: str, name: str) -> Any:
        """One field of an INFO section; :class:`Unreadable` if the server lacks it."""
        info = self.info(section)
        if name not in info:
            raise Unreadable(f"INFO {section} has no {name} on this server")
        return info[name]

    def config(self, name: str) -> str:
        """A config parameter by CONFIG GET; :class:`Unreadable` if absent."""
        value: str | None = self._read(
            "config", name, lambda: self.store.server_config(self.node, name)
        )
        if value is None:
            raise Unreadable(f"the server has no config parameter {name!r}")
        return value

    def cluster(self) -> dict[str, str]:
        found: dict[str, str] = self._read(
            "cluster", "info", lambda: self.store.cluster_info(self.node)
        )
        return found


def _unknown(exc: Exception) -> Verdict:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Verdict("unknown", f"cannot be read: {reason}")


def _guarded(check: Callable[[], Verdict]) -> Verdict:
    try:
        return check()
    except (Unreadable, PerkeyError, ValueError) as exc:  # ValueError: a figure in an odd form
        return _unknown(exc)


def _share(used: int, limit: int) -> str:
    return f"{used / limit:.0%}"


# -- server rules (each runs on every primary) -----------------------------------------


def _eviction(server: Server, expires: bool) -> Verdict:
    policy = str(server.field("memory", "maxmemory_policy"))
    limit = int(server.field("memory", "maxmemory"))
    details = {"maxmemory_policy": policy, "maxmemory": limit}
    if policy == "noeviction":
        return Verdict("ok", "maxmemory-policy is noeviction: results are never evicted", details)
    if not policy.startswith(("allkeys-", "volatile-")):
        return Verdict("unknown", f"maxmemory-policy {policy!r} is not one this check knows")
    if policy.startswith("volatile-") and not expires:
        return Verdict(
            "warning",
            f"maxmemory-policy is {policy}: results have no TTL (result_expires None), "
            "but progress streams and chord keys do, and can be evicted",
            details,
        )
    what = "every key" if policy.startswith("allkeys-") else "keys with a TTL, results among them"
    if not limit:
        return Verdict(
            "warning",
            f"maxmemory-policy is {policy}, which evicts {what}; no maxmemory is set, so "
            "nothing is evicted until one is",
            details,
        )
    return Verdict(
        "danger",
        f"maxmemory-policy is {policy} with maxmemory {human_bytes(limit)}: the server "
        f"evicts {what}",
        details,
    )


def _memory(server: Server) -> Verdict:
    used = int(server.field("memory", "used_memory"))
    limit = int(server.field("memory", "maxmemory"))
    details = {"used_memory": used, "maxmemory": limit}
    if not limit:
        return Verdict("ok", f"no maxmemory set; used_memory {human_bytes(used)}", details)
    text = (
        f"used_memory {human_bytes(used)} is {_share(used, limit)} of maxmemory "
        f"{human_bytes(limit)}"
    )
    if used >= FULL * limit:
        return Verdict("danger", text, details)
    if used >= NEAR * limit:
        return Verdict("warning", text, details)
    return Verdict("ok", text, details)


def _clients(server: Server, pool_limit: int | None) -> Verdict:
    connected = int(server.field("clients", "connected_clients"))
    blocked = int(server.field("clients", "blocked_clients"))
    try:
        limit = int(server.field("clients", "maxclients"))
    except Unreadable:  # servers before maxclients was in INFO
        limit = int(server.config("maxclients"))
    details = {
        "maxclients": limit,
        "connected_clients": connected,
        "blocked_clients": blocked,
        "redis_max_connections": pool_limit,
    }
    share = _share(connected, limit)
    text = f"{connected} of maxclients {limit} connected ({share}), {blocked} blocked (waiting)"
    if connected >= FULL * limit:
        return Verdict("danger", text, details)
    if connected >= NEAR * limit:
        return Verdict("warning", text, details)
    free = limit - connected
    if pool_limit is not None and pool_limit > free:
        return Verdict(
            "warning",
            f"{text}; redis_max_connections lets one process of this app open "
            f"{pool_limit}, more than the {free} the server has free",
            details,
        )
    return Verdict("ok", text, details)


def _timeout(server: Server) -> Verdict:
    seconds = int(server.config("timeout"))
    details = {"timeout": seconds}
    if seconds:
        return Verdict(
            "info", f"the server closes connections idle for {seconds} s (timeout)", details
        )
    return Verdict("ok", "timeout is 0: idle connections stay open", details)


def _keepalive(server: Server) -> Verdict:
    seconds = int(server.config("tcp-keepalive"))
    details = {"tcp_keepalive": seconds}
    if not seconds:
        return Verdict("warning", "tcp-keepalive is 0: dead peers are never detected", details)
    return Verdict("ok", f"tcp-keepalive is {seconds} s", details)


def _persistence(server: Server) -> Verdict:
    if int(server.field("persistence", "aof_enabled")):
        return Verdict("ok", "AOF is on", {"aof_enabled": 1})
    try:
        save = server.config("save")
    except (Unreadable, PerkeyError) as exc:
        return _snapshots_seen(server, exc)
    details = {"aof_enabled": 0, "save": save}
    if save.strip():
        return Verdict(
            "info",
            f"AOF is off, RDB snapshots only (save {save}): a restart loses the results "
            "stored since the last snapshot",
            details,
        )
    return Verdict("warning", "neither AOF nor RDB: a restart loses every result", details)


def _snapshots_seen(server: Server, exc: Exception) -> Verdict:
    """Without the save points: RDB snapshots the server took, if INFO counts them."""
    snapshots = int(server.info("persistence").get("rdb_saves", 0))
    if snapshots:
        return Verdict(
            "info",
            f"AOF is off; the server took {snapshots} RDB snapshot(s) since it started: a "
            "restart loses the results stored since the last one",
            {"aof_enabled": 0, "rdb_saves": snapshots},
        )
    return Verdict(
        "unknown",
        "AOF is off; whether RDB snapshots are configured cannot be read: "
        + str(exc).splitlines()[0],
        {"aof_enabled": 0},
        "Run the doctor as a user that may run CONFIG GET, or check 'save' in redis.conf; "
        "and consider appendonly yes.",
    )


def _replicas(server: Server, wanted: int) -> Verdict:
    replication = server.info("replication")
    links = [v for k, v in replication.items() if k.startswith("slave") and isinstance(v, dict)]
    if links:
        online = sum(link.get("state") == "online" for link in links)
    else:
        online = int(server.field("replication", "connected_slaves"))
    details = {"replicas_online": online, "perkey_min_replicas": wanted}
    text = f"{online} replica(s) online; perkey_min_replicas is {wanted}"
    if online < wanted:
        return Verdict("danger", text + ": every store fails", details)
    return Verdict("ok", text, details)


# -- rules across servers, on the app, on the keyspace ---------------------------------


def _cluster(store: ResultStore, servers: list[Server]) -> Verdict:
    if not store.is_cluster:
        return Verdict("ok", "not a cluster", {"cluster": False})
    verdicts: dict[str, Verdict] = {}
    for server in servers:
        try:
            info = server.cluster()
        except BackendUnavailableError as exc:
            verdicts[server.name] = Verdict(
                "danger", "the primary does not answer: " + str(exc).splitlines()[0]
            )
            continue
        except PerkeyError as exc:
            verdicts[server.name] = _unknown(exc)
            continue
        state = info.get("cluster_state", "?")
        assigned = int(info.get("cluster_slots_assigned", -1))
        failing = int(info.get("cluster_slots_fail", 0)) + int(info.get("cluster_slots_pfail", 0))
        details = {
            "cluster_state": state,
            "cluster_slots_assigned": assigned,
            "cluster_slots_fail": int(info.get("cluster_slots_fail", 0)),
            "cluster_slots_pfail": int(info.get("cluster_slots_pfail", 0)),
        }
        if state != "ok" or 0 <= assigned < CLUSTER_SLOTS:
            parts = [f"cluster_state:{state}"]
            if 0 <= assigned < CLUSTER_SLOTS:
                parts.append(f"{CLUSTER_SLOTS - assigned} slot(s) assigned to no primary")
            if failing:
                parts.append(f"{failing} slot(s) on primaries seen failing")
            verdicts[server.name] = Verdict("danger", ", ".join(parts), details)
        elif failing:
            text = f"{failing} slot(s) on a primary suspected down (pfail/fail)"
            verdicts[server.name] = Verdict("warning", text, details)
        else:
            verdicts[server.name] = Verdict("ok", "cluster_state:ok, all slots served", details)
    return _combine(verdicts)


def _cluster_url(server: Server, cluster_url: bool) -> Verdict:
    enabled = int(server.field("cluster", "cluster_enabled"))
    details = {"cluster_enabled": enabled}
    if enabled and not cluster_url:
        text = "the server is a node of a Redis Cluster, and the URL is not a cluster URL"
        return Verdict("danger", text, details)
    if enabled:
        return Verdict("ok", "a cluster, through a cluster URL", details)
    return Verdict("ok", "not a cluster node", details)


def _expires(store: ResultStore) -> Verdict:
    settings = store.settings
    details = {
        "result_expires": settings.result_expires_s,
        "perkey_sweep_delete": settings.sweep_delete,
    }
    if settings.result_expires_s is not None:
        return Verdict("ok", f"results expire after {settings.result_expires_s:g} s", details)
    if settings.sweep_delete:
        return Verdict(
            "ok",
            "result_expires is None; perkey_sweep_delete is on, so a sweep (once "
            "scheduled) unlinks results past perkey_sweep_max_age",
            details,
        )
    return Verdict("warning", "result_expires is None and perkey_sweep_delete is off", details)


def _socket_timeout(store: ResultStore) -> Verdict:
    timeout = store.settings.socket_timeout_s
    cap = block_cap(timeout)
    details = {"redis_socket_timeout": timeout, "block_s": cap}
    if cap >= MAX_BLOCK:
        shown = "None" if timeout is None else f"{timeout:g} s"
        return Verdict(
            "ok", f"redis_socket_timeout {shown}: waits block {cap:g} s at a time", details
        )
    text = (
        f"redis_socket_timeout {timeout:g} s splits waits into blocks of {cap:g} s "
        f"instead of {MAX_BLOCK:g} s"
    )
    if cap < SHORT_BLOCK:
        return Verdict("warning", f"{text}: {1 / cap:.0f} commands a second per waiter", details)
    return Verdict("info", f"{text}: {MAX_BLOCK / cap:.1f}x the commands per wait", details)


def _no_ttl(store: ResultStore, sample_limit: int) -> Verdict:
    stats = collect_stats(store, sample_limit=sample_limit, memory_samples=0)
    details = {
        "keys_without_ttl": stats.no_ttl,
        "oldest_without_ttl_s": stats.oldest_no_ttl_age,
        "our_keys": stats.our_keys,
        "sampled": stats.sampled,
    }
    estimate = " (estimated from a sample)" if stats.sampled else ""
    if stats.no_ttl:
        age = stats.oldest_no_ttl_age
        oldest = f", the oldest written {age:.0f} s ago" if age is not None else ""
        return Verdict(
            "warning",
            f"{stats.no_ttl} of {stats.our_keys} keys of ours have no TTL{estimate}{oldest}",
            details,
        )
    return Verdict("ok", f"all {stats.our_keys} keys of ours have a TTL{estimate}", details)


def _combine(verdicts: Mapping[str, Verdict]) -> Verdict:
    """One verdict from each server's: the worst, naming the servers when several."""
    worst = max((v.severity for v in verdicts.values()), key=_RANK.__getitem__)
    chosen = [(name, v) for name, v in verdicts.items() if v.severity == worst]
    texts = {v.finding for _, v in chosen}
    if len(verdicts) == 1:
        text = chosen[0][1].finding
    elif len(texts) == 1 and len(chosen) == len(verdicts):
        text = f"{texts.pop()} (on each of {len(verdicts)} primaries)"
    else:
        text = "; ".join(f"{name}: {v.finding}" for name, v in chosen)
    fix = next((v.fix for _, v in chosen if v.fix), None)
    details = {"nodes": {name: dict(v.details) for name, v in verdicts.items()}}
    return Verdict(worst, text, details, fix)


def _finding(rule_id: str, verdict: Verdict) -> Finding:
    rule = _BY_ID[rule_id]
    fix = verdict.fix or rule.fix
    if verdict.severity == "unknown" and verdict.fix is None:
        fix = (
            "Make it readable (a user that may run the command named, such as CONFIG GET "
            "or CLUSTER INFO; a primary that answers), or check it by hand. " + rule.fix
        )
    return Finding(rule_id, verdict.severity, verdict.finding, rule.why, fix, verdict.details)


def diagnose(target: ResultStore | HasStore, sample_limit: int = 100_000) -> Report:
    """Check the server (every primary) and the store's settings; a finding per rule.

    Parameters
    ----------
    sample_limit:
        Keys examined at most by the ``keys-without-ttl`` rule (see ``stats``).

    Raises
    ------
    BackendUnavailableError
        If no server can be reached at all.
    CredentialsRefusedError
        If a server refuses the password or user (or wants one), or the TLS handshake.
    """
    store = store_of(target)
    settings = store.settings
    servers = [Server(store, node) for node in store.primaries()]
    lost = []
    for server in servers:
        try:
            server.info("server")
        except BackendUnavailableError as exc:
            lost.append(exc)
        except CredentialsRefusedError:
            raise  # not let in at all (password, TLS): no rule could read anything
        except PerkeyError:
            pass  # a command refused (NOPERM): the rules will say what they cannot read
    if len(lost) == len(servers):
        raise lost[0]
    pool = settings.connection_options.get("max_connections")
    expires = settings.result_expires_s is not None
    wanted = settings.min_replicas

    def on_each(check: Callable[[Server], Verdict]) -> Verdict:
        return _combine({s.name: _guarded(partial(check, s)) for s in servers})

    verdicts = {
        "eviction-policy": on_each(partial(_eviction, expires=expires)),
        "memory-headroom": on_each(_memory),
        "maxclients": on_each(partial(_clients, pool_limit=pool)),
        "server-timeout": on_each(_timeout),
        "tcp-keepalive": on_each(_keepalive),
        "persistence": on_each(_persistence),
        "cluster-health": _guarded(partial(_cluster, store, servers)),
        "cluster-url": on_each(partial(_cluster_url, cluster_url=store.is_cluster)),
        "result-expires-without-delete": _expires(store),
        "socket-timeout-below-block": _socket_timeout(store),
        "min-replicas": on_each(partial(_replicas, wanted=wanted))
        if wanted
        else Verdict("ok", "perkey_min_replicas is 0: stores do not wait for replicas"),
        "keys-without-ttl": _unknown(lost[0])
        if lost
        else _guarded(partial(_no_ttl, store, sample_limit)),
    }
    return Report(tuple(_finding(rule.id, verdicts[rule.id]) for rule in RULES))
