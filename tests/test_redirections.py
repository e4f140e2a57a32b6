"""A plain URL that points at one node of a Redis Cluster is a configuration error.

The node answers MOVED (or ASK, while a slot migrates) for keys it does not serve. On
a ``perkey://`` URL that is no outage to retry: it fails at once, naming the URL and the
cluster URL to use. On a ``perkey+cluster://`` URL a redirection stays what it is there,
a slot that moves, and is retried. The doctor reports the mismatch too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import states
from redis.crc import key_slot

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.testing import LocalCluster

from .conftest import run_cli


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as local:
        yield local


def _plain_app(make_app: Any, cluster: LocalCluster, **conf: Any) -> tuple[Any, int]:
    """An app whose plain URL names one primary of the cluster, and that primary."""
    port = cluster.primaries()[0]
    return make_app(backend=f"perkey://127.0.0.1:{port}/0", broker_url="memory://", **conf), port


def _task_elsewhere(app: Any, cluster: LocalCluster, port: int) -> str:
    """A task id whose result key another primary than ``port`` serves."""
    for i in range(1000):
        task_id = f"elsewhere-{i}"
        if cluster.primary_for_key(app.backend.layout.result(task_id)) != port:
            return task_id
    raise AssertionError("every key landed on one primary")


def _assert_names_the_fix(error: BaseException, port: int, kind: str) -> None:
    text = str(error)
    assert f"perkey://127.0.0.1:{port}/0" in text
    assert kind in text
    assert "perkey+cluster://" in text


@pytest.mark.timeout(60)
def test_a_store_through_a_plain_url_fails_at_once(
    make_app: Any, cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    app, port = _plain_app(make_app, cluster)
    task_id = _task_elsewhere(app, cluster, port)
    with (
        caplog.at_level(logging.WARNING, logger="celery_perkey_backend"),
        pytest.raises(ConfigurationError) as caught,
    ):
        app.backend.store_result(task_id, 1, states.SUCCESS)
    _assert_names_the_fix(caught.value, port, "MOVED")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_a_wait_through_a_plain_url_fails_at_once(
    make_app: Any, cluster: LocalCluster, multiplex: bool
) -> None:
    """Not a TimeoutError after the whole timeout, nor an outage."""
    app, port = _plain_app(make_app, cluster, perkey_multiplex=multiplex)
    task_id = _task_elsewhere(app, cluster, port)
    with pytest.raises(ConfigurationError) as caught:
        app.AsyncResult(task_id).get(timeout=30)
    _assert_names_the_fix(caught.value, port, "MOVED")


@pytest.mark.timeout(60)
def test_an_ask_through_a_plain_url_fails_at_once(
    make_app: Any, cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot migrating away from the node: a key it no longer holds is an ASK."""
    app, port = _plain_app(make_app, cluster)
    task_id = next(
        f"here-{i}"
        for i in range(1000)
        if cluster.primary_for_key(app.backend.layout.result(f"here-{i}")) == port
    )
    slot = key_slot(app.backend.layout.result(task_id).encode())
    source = cluster.client(port)
    target = next(p for p in cluster.primaries() if p != port)
    target_id = cluster.client(target).execute_command("CLUSTER", "MYID")
    if isinstance(target_id, bytes):
        target_id = target_id.decode()
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="celery_perkey_backend"),
            pytest.raises(ConfigurationError) as caught,
        ):
            app.AsyncResult(task_id).state  # noqa: B018 - the read is the point
    finally:
        source.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    _assert_names_the_fix(caught.value, port, "ASK")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.timeout(60)
def test_a_cluster_url_still_follows_redirections(make_app: Any, cluster: LocalCluster) -> None:
    """The same keys through the cluster URL: stored and read back."""
    app = make_app(backend=cluster.url, broker_url="memory://")
    plain, port = _plain_app(make_app, cluster)
    task_id = _task_elsewhere(plain, cluster, port)
    app.backend.store_result(task_id, 7, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=10) == 7
    app.AsyncResult(task_id).forget()


def test_the_doctor_names_a_plain_url_to_a_cluster_node(
    make_app: Any, cluster: LocalCluster
) -> None:
    app, _ = _plain_app(make_app, cluster)
    report = json.loads(run_cli(app, "doctor", "--json").stdout)
    (finding,) = [f for f in report["findings"] if f["rule"] == "cluster-url"]
    assert finding["severity"] == "danger"
    assert "perkey+cluster://" in finding["fix"]


def test_the_doctor_is_content_with_a_cluster_url(make_app: Any, cluster: LocalCluster) -> None:
    app = make_app(backend=cluster.url, broker_url="memory://")
    report = json.loads(run_cli(app, "doctor", "--json").stdout)
    (finding,) = [f for f in report["findings"] if f["rule"] == "cluster-url"]
    assert finding["severity"] == "ok"


def test_the_doctor_is_content_with_a_plain_url_to_a_plain_server(app: Any) -> None:
    report = json.loads(run_cli(app, "doctor", "--json").stdout)
    (finding,) = [f for f in report["findings"] if f["rule"] == "cluster-url"]
    assert finding["severity"] == "ok"
    assert isinstance(app.backend.client, redis.Redis)
