"""URLs, settings, shared pools and the errors a user sees when the server is away."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.exceptions import ImproperlyConfigured

from celery_perkey_backend import BackendUnavailableError, ConfigurationError, PerkeyBackend
from celery_perkey_backend.testing import EmbeddedServer, free_port
from celery_perkey_backend.urls import mask_url, to_redis_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("perkey://h:6379/0", "redis://h:6379/0"),
        ("redis://:pw@h/3", "redis://:pw@h/3"),
        (
            "rediss://h:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=%2Ftmp%2Fca.pem",
            "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Ftmp%2Fca.pem",
        ),
        ("unix:///tmp/redis.sock?db=2", "unix:///tmp/redis.sock?db=2"),
        (None, "redis://localhost:6379/0"),
    ],
)
def test_to_redis_url(given: str | None, expected: str) -> None:
    assert to_redis_url(given) == expected


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ("amqp://:secret@h//", "unsupported scheme"),
        ("rediss://:secret@h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("redis://:secret@h/0?ssl_ca_certs=x", "perkey\\+rediss"),
    ],
)
def test_bad_urls_are_named_with_the_password_masked(bad: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint) as info:
        to_redis_url(bad)
    assert "secret" not in str(info.value)
    assert isinstance(info.value, ImproperlyConfigured)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@h:1/0", "redis://:**@h:1/0"),
        ("redis://user:s3cret@h/0", "redis://user:**@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("unix:///sock?password=s3cret&db=1", "unix:///sock?password=**&db=1"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_entry_point_loads_backend_by_url(backend_url: str) -> None:
    app = Celery("ep", backend=backend_url, set_as_current=False)
    assert isinstance(app.backend, PerkeyBackend)
    scheme_app = Celery("ep2", backend="perkey+redis://127.0.0.1:1/0", set_as_current=False)
    assert isinstance(scheme_app.backend, PerkeyBackend)


def test_password_never_shows(server: EmbeddedServer) -> None:
    app = Celery("pw", backend="perkey://:hunter2@127.0.0.1:1/0", set_as_current=False)
    assert "hunter2" not in repr(app.backend)
    assert "hunter2" not in app.backend.as_uri()
    assert "hunter2" in app.backend.as_uri(include_password=True)


def test_unreachable_server_is_a_clear_error(make_app: Any) -> None:
    port = free_port()
    app = make_app(
        backend=f"perkey://:hunter2@127.0.0.1:{port}/0",
        result_backend_transport_options={"retry_policy": {"max_retries": 1}},
        redis_socket_connect_timeout=0.5,
    )
    with pytest.raises(BackendUnavailableError) as info:
        app.AsyncResult("t1").state  # noqa: B018
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hunter2" not in str(info.value)
    with pytest.raises(BackendUnavailableError):
        app.backend.store_result("t1", 1, states.SUCCESS)
    with pytest.raises(BackendUnavailableError):
        app.AsyncResult("t1").get(timeout=1)


def test_always_retry_turns_into_celery_errors(make_app: Any) -> None:
    from celery.exceptions import BackendGetMetaError, BackendStoreError

    app = make_app(
        backend=f"perkey://127.0.0.1:{free_port()}/0",
        result_backend_always_retry=True,
        result_backend_max_retries=2,
        result_backend_base_sleep_between_retries_ms=1,
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    with pytest.raises(BackendStoreError) as info:
        app.backend.store_result("t1", 1, states.SUCCESS)
    assert info.value.task_id == "t1"
    with pytest.raises(BackendGetMetaError):
        app.backend.get_task_meta("t1")


def test_password_and_unix_socket(make_app: Any) -> None:
    with EmbeddedServer(args=["--requirepass", "s3cret"]) as srv:
        app = make_app(backend=f"perkey://:s3cret@127.0.0.1:{srv.port}/3")
        app.backend.store_result("t1", "tcp", states.SUCCESS)
        assert app.AsyncResult("t1").get(timeout=2) == "tcp"
        sock = make_app(backend=f"perkey+unix://{srv.unix_socket}?db=3&password=s3cret")
        assert sock.AsyncResult("t1").get(timeout=2) == "tcp"
        client = redis.Redis(port=srv.port, password="s3cret", db=3)
        assert client.keys() == [app.backend.layout.result("t1").encode()]
        client.close()


def test_redis_settings_reach_the_connection(make_app: Any, server: EmbeddedServer) -> None:
    app = make_app(
        redis_client_name="perkey-test-client",
        redis_socket_timeout=7,
        redis_socket_connect_timeout=3,
        redis_max_connections=5,
        redis_retry_on_timeout=True,
        redis_backend_health_check_interval=30,
    )
    app.backend.store_result("t1", 1, states.SUCCESS)
    pool = app.backend.client.connection_pool
    assert pool.max_connections == 5
    kwargs = pool.connection_kwargs
    assert kwargs["socket_timeout"] == 7.0
    assert kwargs["socket_connect_timeout"] == 3.0
    assert kwargs["health_check_interval"] == 30
    names = [c["name"] for c in redis.Redis(port=server.port).client_list()]
    assert "perkey-test-client" in names


def test_backends_of_one_process_share_a_pool(app: Any) -> None:
    import threading

    pools = []

    def grab() -> None:
        pools.append(app.backend.client.connection_pool)

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(p) for p in pools}) == 1
    assert len({id(p) for p in [*pools, app.backend.client.connection_pool]}) == 1


def test_backend_pickles(app: Any) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(app.backend))
    assert clone.url == app.backend.url


def test_passwords_stay_out_of_logs(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    app = make_app(
        backend=f"perkey://:hunter2@127.0.0.1:{free_port()}/0",
        result_backend_always_retry=True,
        result_backend_max_retries=1,
        result_backend_base_sleep_between_retries_ms=1,
        result_backend_transport_options={"retry_policy": {"max_retries": 1}},
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as info:
        app.backend.store_result("t1", 1, states.SUCCESS)
    assert caplog.records, "the retries should have been logged"
    assert "hunter2" not in caplog.text
    assert "hunter2" not in repr(info.value) + str(info.value)


def test_messages_name_the_url_as_configured(make_app: Any, server: EmbeddedServer) -> None:
    """Celery strips ``perkey+`` before handing the URL over; what we show does not."""
    served = make_app(backend=f"perkey+redis://:hunter2@127.0.0.1:{server.port}/0")
    assert repr(served.backend) == f"<PerkeyBackend: perkey+redis://:**@127.0.0.1:{server.port}/0>"
    assert served.backend.as_uri(include_password=True).startswith("perkey+redis://:hunter2@")
    port = free_port()
    away = make_app(
        backend=f"perkey+unix:///nonexistent/{port}.sock?password=hunter2",
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    with pytest.raises(BackendUnavailableError) as info:
        away.AsyncResult("t1").state  # noqa: B018
    assert "perkey+unix:///nonexistent/" in str(info.value)
    assert "hunter2" not in str(info.value)
    tcp = make_app(
        backend=f"perkey+redis://:hunter2@127.0.0.1:{port}/0",
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    with pytest.raises(BackendUnavailableError) as info:
        tcp.backend.store_result("t1", 1, states.SUCCESS)
    assert f"perkey+redis://:**@127.0.0.1:{port}/0" in str(info.value)


def test_a_misspelt_scheme_is_echoed_as_typed(make_app: Any) -> None:
    app = make_app(backend="perkey+redi://:hunter2@127.0.0.1:1/0")
    with pytest.raises(ConfigurationError) as info:
        app.backend  # noqa: B018
    message = str(info.value)
    assert "'perkey+redi://:**@127.0.0.1:1/0'" in message
    assert "unsupported scheme 'perkey+redi'" in message
    for scheme in ("perkey://", "perkey+rediss://", "perkey+cluster://", "perkey+sentinel://"):
        assert scheme in message
    assert "hunter2" not in message


def test_a_backend_built_by_hand_shows_the_perkey_form() -> None:
    app = Celery("by-hand", set_as_current=False)
    assert repr(PerkeyBackend(app=app, url="rediss://:pw@h:6380/0")) == (
        "<PerkeyBackend: perkey+rediss://:**@h:6380/0>"
    )
    assert PerkeyBackend(app=app).as_uri() == "perkey://localhost:6379/0"


def test_a_server_error_inside_a_pipeline_is_classified_by_its_code(
    make_app: Any, server: EmbeddedServer
) -> None:
    # A replica refuses the store script with READONLY, as a primary just demoted by a
    # failover does. With perkey_min_replicas the store and its WAIT go as one
    # pipeline, whose errors redis-py prefixes with "Command # 1 (…) of pipeline caused
    # error:"; the code behind that prefix still makes it a retried, passing condition,
    # not a final StoreCommandError.
    with EmbeddedServer(args=["--replicaof", "127.0.0.1", str(server.port)]) as replica:
        app = make_app(
            backend=f"perkey://127.0.0.1:{replica.port}/0",
            perkey_min_replicas=1,
            result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        )
        topology = r"changing its topology.*read only replica"
        with pytest.raises(BackendUnavailableError, match=topology):
            app.backend.store_result("t1", 1, states.SUCCESS)


def test_a_child_forked_while_a_thread_holds_the_pool_reads_all_the_same(
    make_app: Any,
) -> None:
    """A prefork worker forks its pool processes while other threads of its main process
    work (the Prometheus writer, a trimmer): a lock of the pool held at that moment
    must not be the child's, or its first command waits for it forever."""
    app = make_app()
    app.backend.store_result("t1", "read in the child", states.SUCCESS)
    pool = app.backend.client.connection_pool
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pool.freed:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: read, and say how it went by the exit code
        try:
            ok = app.AsyncResult("t1").get(timeout=10) == "read in the child"
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    release.set()
    holder.join()
    end = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child waited forever for a lock its parent held at the fork")
    assert os.waitstatus_to_exitcode(done[1]) == 0
