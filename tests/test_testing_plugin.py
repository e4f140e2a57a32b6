"""The pytest plugin users load, tried the way their own project loads it (pytester).

Each test writes a small project (tasks, a conftest with ``pytest_plugins`` and the
three-line ``celery_config`` override from the README, tests) and runs pytest on it in a
subprocess, so that entry-point plugins load exactly as in a user's run: with
pytest-celery's (whose own ``celery_worker`` needs Docker) and without it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CONFTEST = """
import pytest

pytest_plugins = ["celery_perkey_backend.testing"]


@pytest.fixture
def celery_config(perkey_url, perkey_broker_url):
    return {"broker_url": perkey_broker_url, "result_backend": perkey_url}
"""

TASKS = """
from celery import shared_task


@shared_task
def mul(x, y):
    return x * y


@shared_task
def refuse(reason):
    raise PermissionError(reason)
"""

TESTS = """
import os

import redis
import pytest
from celery.contrib.testing.worker import TestWorkController

from tasks import mul, refuse


def test_a_result_makes_the_round_trip(celery_app, celery_worker, perkey_server):
    # Celery's in-process worker, not pytest-celery's Docker one.
    assert isinstance(celery_worker, TestWorkController)
    assert type(celery_app.backend).__name__ == "PerkeyBackend"
    result = celery_app.tasks[mul.name].delay(6, 7)
    assert result.get(timeout=20) == 42
    # Stored in its own list on the plugin's server.
    key = celery_app.backend.layout.result(result.id)
    client = redis.Redis(port=perkey_server.port)
    assert client.type(key) == b"list"
    assert client.ttl(key) > 0
    client.close()


def test_pytest_celery_is_there_or_not_as_the_run_says(request):
    loaded = request.config.pluginmanager.get_plugin("celery") is not None
    assert loaded == (os.environ["EXPECT_PYTEST_CELERY"] == "installed")


def test_each_test_starts_on_empty_databases(perkey_url, perkey_broker_url):
    # The test before this one stored a result and used the broker.
    client = redis.Redis.from_url(perkey_url.replace("perkey://", "redis://"))
    assert client.dbsize() == 0
    client.close()
    # Only kombu's exchange bindings stay, for a worker that outlives a test.
    client = redis.Redis.from_url(perkey_broker_url)
    assert [key for key in client.keys() if b"_kombu.binding." not in key] == []
    client.close()


def test_tasks_defined_in_the_test(celery_app, celery_worker):
    @celery_app.task
    def add(x, y):
        return x + y

    celery_worker.reload()
    assert add.delay(2, 3).get(timeout=20) == 5


def test_a_failure_comes_back_as_its_exception(celery_app, celery_worker, depends_on_current_app):
    with pytest.raises(PermissionError, match="not today"):
        refuse.delay("not today").get(timeout=20)
"""


@pytest.mark.parametrize("pytest_celery", ["installed", "disabled"])
def test_a_users_project_tests_its_tasks_on_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pytest_celery: str
) -> None:
    monkeypatch.setenv("EXPECT_PYTEST_CELERY", pytest_celery)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(tasks=TASKS, test_tasks=TESTS)
    args = ["-p", "no:cacheprovider", "--durations=0"]
    if pytest_celery == "disabled":
        args += ["-p", "no:celery"]  # as if only Celery were installed
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=5)


def test_the_package_imports_without_pytest() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pytest"] = None  # as if pytest were not installed
        import celery_perkey_backend.testing as testing
        assert testing.EmbeddedServer and testing.running_server
        assert not hasattr(testing, "perkey_url")
        print("imported")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
