"""Parity with Celery 5.7's Redis backend settings, on real servers.

``redis_backend_credential_provider`` in each form Celery takes (with an ACL user whose
password only the provider knows, and a password rotated while waits are blocked),
``additional_connection_errors``, the library's name in ``CLIENT LIST``, and
``result_backend_thread_safe``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import states
from celery.result import AsyncResult, ResultSet
from redis.credentials import CredentialProvider

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.keys import KeyLayout, acl_rules
from celery_perkey_backend.testing import (
    EmbeddedServer,
    LocalCluster,
    LocalSentinel,
    find_server_binary,
)

from .conftest import wait_until
from .test_tls import pki, tls_proxy  # noqa: F401 - fixtures, taken by name below

USER = "parity-user"


class SecretProvider(CredentialProvider):
    """Made with no arguments (the dotted-path and class forms): the password is the
    class's, set by the test."""

    password = ""
    calls = 0

    def get_credentials(self) -> tuple[str, str]:
        type(self).calls += 1
        return USER, type(self).password


class RotatingProvider(CredentialProvider):
    """Answers with the password it holds now; counts how often it was asked."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.calls = 0
        self.lock = threading.Lock()

    def get_credentials(self) -> tuple[str, str]:
        with self.lock:
            self.calls += 1
            return USER, self.password


class TokenServiceDown(Exception):
    """What a provider's token service raises while it is briefly away."""


class Unlisted(Exception):
    """An error nobody said means a lost connection."""


class FlakyProvider(CredentialProvider):
    """Raises ``error`` on its first call, then answers."""

    def __init__(self, password: str, error: type[Exception]) -> None:
        self.password = password
        self.error = error
        self.calls = 0

    def get_credentials(self) -> tuple[str, str]:
        self.calls += 1
        if self.calls == 1:
            raise self.error("the token service did not answer")
        return USER, self.password


def _make_user(r: redis.Redis, password: str) -> None:
    r.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{password}", "~*", "&*", "+@all")


@pytest.fixture
def secret(r: redis.Redis) -> Iterator[str]:
    """An ACL user whose password is known to the test and its providers only."""
    password = uuid.uuid4().hex
    _make_user(r, password)
    yield password
    r.acl_deluser(USER)


def _user_clients(r: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in r.client_list() if c.get("user") == USER]


def _blocked_user_clients(r: redis.Redis) -> int:
    return sum(1 for c in _user_clients(r) if "b" in c.get("flags", ""))


def _roundtrip(app: Any, task_id: str, value: Any) -> Any:
    app.backend.store_result(task_id, value, states.SUCCESS)
    return app.AsyncResult(task_id).get(timeout=10)


# -- redis_backend_credential_provider ----------------------------------------------------


@pytest.mark.parametrize("form", ["dotted path", "class", "instance", "URL argument"])
def test_each_form_of_the_credential_provider_logs_in(
    form: str, make_app: Any, r: redis.Redis, server: Any, secret: str
) -> None:
    SecretProvider.password = secret
    url = f"perkey://127.0.0.1:{server.port}/0"
    path = f"{__name__}.SecretProvider"
    if form == "URL argument":
        app = make_app(backend=f"{url}?credential_provider={path}")
    else:
        given = {"dotted path": path, "class": SecretProvider, "instance": SecretProvider()}[form]
        app = make_app(backend=url, redis_backend_credential_provider=given)
    before = SecretProvider.calls
    task_id = f"cred-{uuid.uuid4().hex}"
    assert _roundtrip(app, task_id, {"form": form}) == {"form": form}
    assert SecretProvider.calls > before
    # The backend's connections are the ACL user's: no other password was anywhere.
    assert _user_clients(r)
    assert app.backend.settings.credential_provider is not None


def test_without_the_provider_the_same_url_is_refused(
    make_app: Any, server: Any, secret: str
) -> None:
    """The URL alone cannot log in as the user: it is the provider that does."""
    from celery_perkey_backend import AccessDeniedError

    app = make_app(backend=f"perkey://{USER}@127.0.0.1:{server.port}/0")
    with pytest.raises(AccessDeniedError):
        app.backend.store_result("nope", 1, states.SUCCESS)


def test_one_provider_one_client_and_two_providers_two(make_app: Any, server: Any) -> None:
    """Backends with the same provider share a pool; different providers never do,
    even when their repr is the same."""
    first, second = RotatingProvider("a"), RotatingProvider("b")
    url = f"perkey://127.0.0.1:{server.port}/0"
    one = make_app(backend=url, redis_backend_credential_provider=first).backend
    again = make_app(backend=url, redis_backend_credential_provider=first).backend
    other = make_app(backend=url, redis_backend_credential_provider=second).backend
    assert one.client is again.client
    assert one.client is not other.client
    path = f"{__name__}.SecretProvider"
    by_path = make_app(backend=url, redis_backend_credential_provider=path).backend
    by_path_again = make_app(backend=f"{url}?credential_provider={path}").backend
    assert by_path.client is by_path_again.client


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("no_such_module.Provider", "cannot import it"),
        (f"{__name__}.NoSuchProvider", "cannot import it"),
        (f"{__name__}.TokenServiceDown", "is not a CredentialProvider"),
        (dict, "is not a CredentialProvider"),
        (42, "use a redis.credentials.CredentialProvider"),
    ],
)
def test_a_wrong_provider_fails_when_the_backend_is_built(
    value: Any, said: str, make_app: Any
) -> None:
    app = make_app(redis_backend_credential_provider=value)
    with pytest.raises(ConfigurationError) as info:
        app.backend  # noqa: B018
    message = str(info.value)
    assert "redis_backend_credential_provider" in message
    assert said in message
    shown = value.__qualname__ if isinstance(value, type) else str(value)
    assert shown in message


def test_a_wrong_provider_in_the_url_names_the_url_argument(make_app: Any, server: Any) -> None:
    url = f"perkey://127.0.0.1:{server.port}/0?credential_provider=no_such_module.P"
    with pytest.raises(ConfigurationError, match="URL argument credential_provider"):
        make_app(backend=url).backend  # noqa: B018


def test_a_password_beside_a_provider_is_refused(make_app: Any, server: Any) -> None:
    """redis-py refuses both together, Celery silently drops the password: here the one
    that would never be used is named when the backend is built."""
    provider = RotatingProvider("x")
    with pytest.raises(ConfigurationError, match="redis_password"):
        make_app(redis_backend_credential_provider=provider, redis_password="pw").backend  # noqa: B018
    with pytest.raises(ConfigurationError, match="from the URL"):
        _ = make_app(
            backend=f"perkey://u:pw@127.0.0.1:{server.port}/0",
            redis_backend_credential_provider=provider,
        ).backend


@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_blocked_waits_survive_a_password_rotation_and_reconnect_with_the_new_one(
    multiplex: bool, make_app: Any, r: redis.Redis, server: Any
) -> None:
    provider = RotatingProvider("first-password")
    _make_user(r, "first-password")
    try:
        app = make_app(
            backend=f"perkey://127.0.0.1:{server.port}/0",
            redis_backend_credential_provider=provider,
            perkey_multiplex=multiplex,
        )
        ids = [f"rot-{n}-{uuid.uuid4().hex}" for n in range(2)]
        with ThreadPoolExecutor(2) as pool:
            waits = [pool.submit(app.AsyncResult(tid).get, timeout=60) for tid in ids]
            wait_until(lambda: _blocked_user_clients(r) >= 1, "the waits are blocked")
            if not multiplex:
                wait_until(lambda: _blocked_user_clients(r) >= 2, "both waits are blocked")

            blocked = {c["id"] for c in _user_clients(r) if "b" in c["flags"]}

            # Rotate: the server takes only the new password, the provider gives it.
            r.execute_command("ACL", "SETUSER", USER, "resetpass", ">second-password")
            with provider.lock:
                provider.password = "second-password"
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port, username=USER, password="first-password").ping()

            # The connections authenticated before the rotation stay so: the first wait
            # gets its result, and the blocked connections are the same ones.
            app.backend.store_result(ids[0], "before the kill", states.SUCCESS)
            assert waits[0].result(timeout=20) == "before the kill"
            assert blocked <= {c["id"] for c in _user_clients(r)}
            assert not waits[1].done()
            asked = provider.calls

            # Every connection of the user is cut: the waits reconnect, logging in with
            # what the provider says now.
            killed = r.execute_command("CLIENT", "KILL", "USER", USER)
            assert killed >= 1
            wait_until(
                lambda: _blocked_user_clients(r) >= 1, "the remaining wait is blocked again", 30
            )
            assert provider.calls > asked
            assert not waits[1].done()
            app.backend.store_result(ids[1], "after the kill", states.SUCCESS)
            assert waits[1].result(timeout=20) == "after the kill"
    finally:
        r.acl_deluser(USER)


@pytest.mark.parametrize("over", ["unix", "tls"])
def test_the_provider_logs_in_over_a_unix_socket_and_tls(
    over: str, request: pytest.FixtureRequest, make_app: Any, r: redis.Redis, server: Any
) -> None:
    password = uuid.uuid4().hex
    _make_user(r, password)
    try:
        if over == "unix":
            url = f"perkey+unix://{server.unix_socket}?db=0"
        else:
            proxy = request.getfixturevalue("tls_proxy")
            ca = request.getfixturevalue("pki")["ca"]
            url = (
                f"perkey+rediss://127.0.0.1:{proxy.port}/0"
                f"?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={ca}"
            )
        provider = RotatingProvider(password)
        app = make_app(backend=url, redis_backend_credential_provider=provider)
        assert _roundtrip(app, f"{over}-{uuid.uuid4().hex}", over) == over
        assert provider.calls >= 1
        assert app.backend.client.acl_whoami() == USER
    finally:
        r.acl_deluser(USER)


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
def test_the_provider_logs_in_to_a_cluster_and_through_sentinels(
    topology: str, make_app: Any
) -> None:
    """Every data node has the user; only the provider knows its password. The
    Sentinels themselves are asked without it, as in Celery."""
    password = uuid.uuid4().hex
    provider = RotatingProvider(password)
    local: LocalCluster | LocalSentinel
    if topology == "cluster":
        local = LocalCluster(primaries=3, replicas_per_primary=0)
    else:
        local = LocalSentinel(sentinels=1)
    with local:
        if isinstance(local, LocalCluster):
            ports = [port for _, port in local.startup_nodes]
            nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
            url, transport = f"perkey+cluster://{nodes}/0", {}
        else:
            ports = local.data_ports
            url = f"perkey+{local.sentinel_url}/0"
            transport = {"master_name": local.master_name}
        for port in ports:  # ACL users are not replicated
            _make_user(local.client(port), password)
        app = make_app(
            backend=url,
            redis_backend_credential_provider=provider,
            result_backend_transport_options=transport,
        )
        ids = [f"{topology}-{n}-{uuid.uuid4().hex}" for n in range(6)]
        for task_id in ids:
            assert _roundtrip(app, task_id, task_id) == task_id
        assert provider.calls >= 1
        ours = [c for port in ports for c in _user_clients(local.client(port))]
        assert ours
        assert {c["lib-name"] for c in ours} == {_expected_lib_name()}


# -- additional_connection_errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "listed", [f"{__name__}.TokenServiceDown", TokenServiceDown, [TokenServiceDown, Unlisted]]
)
def test_a_listed_error_is_retried_like_a_lost_connection(
    listed: Any, make_app: Any, server: Any, secret: str
) -> None:
    provider = FlakyProvider(secret, TokenServiceDown)
    app = make_app(
        redis_backend_credential_provider=provider,
        result_backend_transport_options={"additional_connection_errors": listed},
    )
    assert _roundtrip(app, f"listed-{uuid.uuid4().hex}", 5) == 5
    assert provider.calls >= 2


@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_a_listed_error_is_retried_in_a_wait_too(
    multiplex: bool, make_app: Any, server: Any, secret: str
) -> None:
    provider = FlakyProvider(secret, TokenServiceDown)
    app = make_app(
        redis_backend_credential_provider=provider,
        result_backend_transport_options={"additional_connection_errors": [TokenServiceDown]},
        perkey_multiplex=multiplex,
    )
    task_id = f"listed-wait-{uuid.uuid4().hex}"
    writer = make_app()
    writer.backend.store_result(task_id, "waited", states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=10) == "waited"
    assert provider.calls >= 2


def test_an_unlisted_error_is_not_retried_and_leaves_no_half_open_connection(
    make_app: Any, server: Any, secret: str
) -> None:
    provider = FlakyProvider(secret, Unlisted)
    app = make_app(
        redis_backend_credential_provider=provider,
        result_backend_transport_options={"additional_connection_errors": [TokenServiceDown]},
    )
    with pytest.raises(Unlisted):
        app.backend.store_result("unlisted", 1, states.SUCCESS)
    assert provider.calls == 1
    # The connection the provider failed is not taken for a ready one next time: that
    # would run as the server's default user.
    assert app.backend.client.acl_whoami() == USER
    assert _roundtrip(app, "unlisted", 1) == 1


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("no_such_module.Error", "cannot import it"),
        (f"{__name__}.SecretProvider", "not an exception class"),
        ([ValueError, 3], "not an exception class"),
        (3, "use an exception class"),
    ],
)
def test_a_wrong_additional_connection_error_fails_when_the_backend_is_built(
    value: Any, said: str, make_app: Any
) -> None:
    app = make_app(result_backend_transport_options={"additional_connection_errors": value})
    with pytest.raises(ConfigurationError, match="additional_connection_errors") as info:
        app.backend  # noqa: B018
    assert said in str(info.value)


def test_the_readme_says_what_becomes_of_each_celery_redis_backend_setting() -> None:
    from pathlib import Path

    from celery.app.defaults import NAMESPACES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names = {f"redis_{key}" for key in NAMESPACES["redis"]}
    names |= {f"result_{key}" for key in NAMESPACES["result"]}
    # Read by Celery's Redis backend without a default in celery.app.defaults.
    names |= {
        "redis_backend_credential_provider",
        "redis_backend_health_check_interval",
        "redis_client_name",
        "result_backend_thread_safe",
        "result_accept_content",
    }
    missing = sorted(name for name in names if f"`{name}`" not in section)
    assert missing == []
    for option in ("additional_connection_errors", "min_other_sentinels", "retry_policy"):
        assert f"`{option}`" in section


def test_host_port_and_db_settings_are_refused_not_ignored(make_app: Any) -> None:
    for name in ("redis_host", "redis_port", "redis_db"):
        app = make_app(**{name: 7})
        with pytest.raises(ConfigurationError, match=f"{name}=7 is not read.*URL"):
            app.backend  # noqa: B018


# -- the library's name -------------------------------------------------------------------


def _expected_lib_name() -> str:
    import importlib.metadata

    celery = importlib.metadata.version("celery")
    ours = importlib.metadata.version("celery-perkey-backend")
    return f"redis-py(celery_v{celery};celery-perkey-backend_v{ours})"


@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_client_list_names_the_library(
    multiplex: bool, make_app: Any, r: redis.Redis, server: Any
) -> None:
    name = f"parity-{uuid.uuid4().hex[:8]}"
    app = make_app(redis_client_name=name, perkey_multiplex=multiplex)
    task_id = f"name-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as pool:
        wait = pool.submit(app.AsyncResult(task_id).get, timeout=30)
        wait_until(
            lambda: any("b" in c["flags"] for c in r.client_list() if c["name"] == name),
            "the wait is blocked",
        )
        app.backend.store_result(task_id, 1, states.SUCCESS)
        assert wait.result(timeout=20) == 1
    ours = [c for c in r.client_list() if c["name"] == name]
    assert ours
    for client in ours:
        assert client["lib-name"] == _expected_lib_name()
        assert client["lib-ver"] == redis.__version__


@pytest.fixture(scope="module")
def redis70() -> Iterator[EmbeddedServer]:
    """Redis 7.0 (the system's): it has no CLIENT SETINFO for an ACL user lacking it."""
    with EmbeddedServer(find_server_binary("system")).start() as server:
        yield server


def test_the_handshake_works_on_a_server_without_setinfo(
    make_app: Any, redis70: EmbeddedServer
) -> None:
    """Redis 7.0 has no CLIENT SETINFO: the name is not taken, the login stands."""
    admin = redis.Redis(port=redis70.port)
    try:
        assert admin.info("server")["redis_version"].startswith("7.0")
        admin.flushall()
        rules = acl_rules(KeyLayout("celery-perkey:"), "7.0.15").split()
        admin.execute_command("ACL", "SETUSER", "old-server", "reset", "on", ">pw", *rules)
        app = make_app(
            backend=f"perkey://old-server:pw@127.0.0.1:{redis70.port}/0",
            redis_client_name="on-7.0",
        )
        assert _roundtrip(app, "old-server", 3) == 3
        ours = [c for c in admin.client_list() if c["name"] == "on-7.0"]
        assert ours
        assert all("lib-name" not in c for c in ours)
    finally:
        admin.close()


def test_the_handshake_works_for_a_user_refused_setinfo(
    make_app: Any, r: redis.Redis, server: Any
) -> None:
    """On a server that knows SETINFO, an ACL user denied it still logs in and works;
    the server logs the refusal."""
    r.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", ">pw", "~*", "&*", "+@all", "-client|setinfo"
    )
    r.execute_command("ACL", "LOG", "RESET")
    try:
        app = make_app(backend=f"perkey://{USER}:pw@127.0.0.1:{server.port}/0")
        assert _roundtrip(app, "refused-setinfo", 4) == 4
        refused = {e["object"] for e in r.acl_log() if e.get("username") == USER}
        assert refused == {"client|setinfo"}
        assert all(c["lib-name"] == "" for c in _user_clients(r))
    finally:
        r.acl_deluser(USER)


# -- result_backend_thread_safe -----------------------------------------------------------


@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_one_backend_shared_by_threads(multiplex: bool, make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_backend_thread_safe=True, perkey_multiplex=multiplex)
    threads = 8
    per_thread = 5
    start = threading.Barrier(threads)
    seen_backends: list[Any] = []
    seen_prefetches: list[Any] = []
    errors: list[BaseException] = []
    writer = make_app()
    # Built once before the threads: Celery builds a thread-safe app's backend on first
    # use without a lock, so threads racing to that first use may each build one.
    shared = app.backend

    def work(n: int) -> list[Any]:
        backend = app.backend
        seen_backends.append(backend)
        ids = [f"ts-{n}-{k}-{uuid.uuid4().hex}" for k in range(per_thread)]
        results = ResultSet([AsyncResult(tid, app=app) for tid in ids])
        for result in results.results:
            result.then(lambda *_: None)  # registers it for this thread's join prefetch
        seen_prefetches.append(backend.prefetch.pending)
        assert set(ids) <= set(backend.prefetch.pending.keys())
        start.wait(timeout=30)
        # Another thread's results are not this one's to prefetch.
        others = set(backend.prefetch.pending.keys()) - set(ids)
        assert not any(tid.startswith("ts-") for tid in others), others
        # One wait blocks here; stores come from a second backend, in another thread.
        stores = threading.Thread(
            target=lambda: [
                writer.backend.store_result(tid, f"{tid}!", states.SUCCESS) for tid in ids
            ]
        )
        stores.start()
        try:
            first = AsyncResult(ids[0], app=app).get(timeout=30)
            rest = results.join(timeout=30)
            native = results.join_native(timeout=30)
        finally:
            stores.join(30)
        # And stores through the shared backend, concurrently with the others' waits.
        mine = f"own-{n}-{uuid.uuid4().hex}"
        backend.store_result(mine, n, states.SUCCESS)
        return [first, rest, native, AsyncResult(mine, app=app).get(timeout=30)]

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, n) for n in range(threads)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=90))
            except BaseException as exc:
                errors.append(exc)
    assert errors == []
    assert all(backend is shared for backend in seen_backends)
    assert len(seen_backends) == threads
    assert len({id(p) for p in seen_prefetches}) == threads
    for n, (first, rest, native, own) in enumerate(outcomes):
        assert first.startswith(f"ts-{n}-")
        assert all(value.startswith(f"ts-{n}-") for value in rest)
        assert rest == native
        assert own == n
