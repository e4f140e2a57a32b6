"""The local Cluster and Sentinel launchers, checked with plain redis-py clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.sentinel import Sentinel

from celery_perkey_backend.testing.topology import HOST, LocalCluster, LocalSentinel, TopologyError


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster for the tests that leave it healthy (failover and migration do)."""
    with LocalCluster() as running:
        yield running


def cluster_client(cluster: LocalCluster) -> RedisCluster:
    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    return RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)


def keys_on(cluster: LocalCluster, primary: int, prefix: str, count: int) -> list[str]:
    """``count`` keys, all in one slot that ``primary`` owns, for per-connection WAIT."""
    tags = (f"{prefix}{i}" for i in range(10_000))
    tag = next(tag for tag in tags if cluster.primary_for_key(tag) == primary)
    return [f"{{{tag}}}:{i}" for i in range(count)]


def test_cluster_serves_every_slot_with_a_replica_per_primary(cluster: LocalCluster) -> None:
    primaries, replicas = cluster.primaries(), cluster.replicas()
    assert len(primaries) == 3 and len(replicas) == 3
    assert all(len(cluster.replicas(port)) == 1 for port in primaries)
    assert cluster.url == "perkey+cluster://" + ",".join(f"{HOST}:{p}" for p in primaries) + "/0"
    assert sorted(port for _, port in cluster.startup_nodes) == sorted(primaries + replicas)
    client = cluster_client(cluster)
    try:
        values = {f"key:{i}": str(i) for i in range(300)}
        for key, value in values.items():
            client.set(key, value)
        assert client.mget_nonatomic(list(values)) == list(values.values())
        owners = {cluster.primary_for_key(key) for key in values}
        assert owners == set(primaries)
        for key in list(values)[:30]:  # the launcher's slot map matches the cluster's
            assert cluster.client(cluster.primary_for_key(key)).get(key) == values[key]
    finally:
        client.close()


def test_manual_failover_keeps_replicated_writes(cluster: LocalCluster) -> None:
    old = cluster.primaries()[0]
    keys = keys_on(cluster, old, "fo", 50)
    client = cluster_client(cluster)
    try:
        pipe = cluster.client(old).pipeline(transaction=False)  # one connection: WAIT covers it
        for key in keys:
            pipe.set(key, key)
        pipe.execute_command("WAIT", 1, 1000)
        assert pipe.execute()[-1] == 1
        assert client.get(keys[0]) == keys[0]  # the client has the old slot map now

        new = cluster.failover(old)

        assert new != old and new in cluster.primaries()
        assert cluster.replicas(new) == [old]
        assert cluster.primary_for_key(keys[0]) == new
        assert [client.get(key) for key in keys] == keys  # follows the MOVED redirect
    finally:
        client.close()


def test_slot_migration_moves_the_keys_and_redirects_half_way(cluster: LocalCluster) -> None:
    keys = [f"{{mig}}:{i}" for i in range(10)]
    slot = key_slot(keys[0].encode())
    source = cluster.primary_for_slot(slot)
    target = next(port for port in cluster.primaries() if port != source)
    client = cluster_client(cluster)
    seen: dict[str, int] = {}

    def half_way() -> None:
        seen["source"] = cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        seen["target"] = cluster.client(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        assert [client.get(key) for key in keys] == keys  # via ASK for the moved half
        client.set("{mig}:new", "new")  # a new key goes to the target, via ASK

    try:
        for key in keys:
            client.set(key, key)
        cluster.migrate_slot(slot, target, on_half_migrated=half_way)

        assert seen == {"source": 5, "target": 5}
        assert cluster.primary_for_slot(slot) == target
        assert cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert cluster.client(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 11
        assert [client.get(key) for key in keys] == keys  # follows the MOVED redirect
        assert client.get("{mig}:new") == "new"
    finally:
        client.close()


def test_killed_primary_fails_over_by_timeout_and_stop_leaves_nothing() -> None:
    cluster = LocalCluster().start()
    servers = list(cluster.servers.values())
    try:
        victim = cluster.primaries()[1]
        (replica,) = cluster.replicas(victim)
        key = keys_on(cluster, victim, "kill", 1)[0]
        pipe = cluster.client(victim).pipeline(transaction=False)
        pipe.set(key, "kept")
        pipe.execute_command("WAIT", 1, 1000)
        assert pipe.execute() == [True, 1]

        cluster.kill(victim, wait=False)
        with pytest.raises(TopologyError, match="follows no live primary") as info:
            cluster.wait_healthy(timeout=0.3)  # not until the node timeout promotes it
        assert f"--- {replica} " in str(info.value)  # the message carries the logs
        cluster.wait_healthy()

        assert cluster.primary_for_key(key) == replica
        assert victim not in [port for _, port in cluster.startup_nodes]
        assert cluster.client(replica).get(key) == "kept"
    finally:
        cluster.stop()
    assert all(s.process is not None and s.process.poll() is not None for s in servers)
    assert not any(s.directory.exists() for s in servers)


def test_a_cluster_that_cannot_start_raises_and_cleans_up() -> None:
    cluster = LocalCluster(node_timeout_ms=-1)
    with pytest.raises(RuntimeError, match="did not start"):
        cluster.start()
    assert cluster.servers == {}


def test_sentinel_failover_promotes_the_replica() -> None:
    with LocalSentinel() as topology:
        assert topology.master_name == "mymaster"
        assert topology.sentinel_url == ";".join(
            f"sentinel://{HOST}:{port}" for _, port in topology.sentinel_nodes
        )
        old = topology.master_port()
        (replica,) = topology.replica_ports()
        sentinel = Sentinel(topology.sentinel_nodes, socket_timeout=5)
        master = sentinel.master_for("mymaster", socket_timeout=5, decode_responses=True)
        pipe = master.pipeline(transaction=False)
        pipe.set("before", "failover")
        pipe.execute_command("WAIT", 1, 1000)
        assert pipe.execute() == [True, 1]

        master.close()

        new = topology.failover()

        assert new == replica
        assert sentinel.discover_master("mymaster") == (HOST, new)
        master = sentinel.master_for("mymaster", socket_timeout=5, decode_responses=True)
        assert master.get("before") == "failover"
        master.set("after", "failover")
        assert topology.replica_ports() == [old]
        assert topology.client(old).info("replication")["role"] == "slave"
        master.close()
        for client in sentinel.sentinels:
            client.close()


def test_a_missing_binary_raises() -> None:
    with pytest.raises(FileNotFoundError):
        LocalCluster(binary="/nonexistent/valkey-server").start()
    with pytest.raises(FileNotFoundError):
        LocalSentinel(binary="/nonexistent/valkey-server").start()
