"""The plugin's fixtures in the two layouts Celery's own documentation leads users to.

Like ``test_testing_plugin.py``, each test writes a small project and runs pytest on it
in a subprocess (pytester), the way a user's run loads the plugin:

- a session-scoped ``celery_config`` on ``perkey_url`` and ``perkey_broker_url`` (the
  form Celery documents), used by Celery's ``celery_app`` and ``celery_worker`` and by
  its ``celery_session_app`` and ``celery_session_worker``; each test starts on empty
  databases, and a session worker keeps working across the emptying;
- tasks declared with ``@app.task`` on the project's own app (``proj/celery.py``),
  pointed at the plugin's server by ``redirect_app`` and run by a real in-process worker,
  as the README's recipe does it.

Both run with pytest-celery's plugin disabled (``test_testing_plugin.py`` covers it
loaded). What ``redirect_app`` puts back on exit, and what it refuses, is checked in
this process.
"""

from __future__ import annotations

import pytest
from celery import Celery

from celery_perkey_backend.testing import redirect_app

#: Nothing listens there: an app still pointed at it fails at once instead of hanging.
PRODUCTION_BROKER = "redis://127.0.0.1:9/1"
PRODUCTION_BACKEND = "perkey://127.0.0.1:9/0"

# Besides the default queue, which Celery publishes to directly, one queue bound to an
# exchange of another name: what is routed through it needs kombu's binding in db 1.
SESSION_CONFTEST = """
import pytest
from kombu import Exchange, Queue

pytest_plugins = ["celery_perkey_backend.testing"]


@pytest.fixture(scope="session")
def celery_config(perkey_url, perkey_broker_url):
    return {
        "broker_url": perkey_broker_url,
        "result_backend": perkey_url,
        "task_queues": [
            Queue("celery"),
            Queue("math", Exchange("arithmetic"), routing_key="math"),
        ],
    }


@pytest.fixture(scope="session")
def celery_includes():
    return ["tasks"]
"""

SESSION_TASKS = """
from celery import shared_task


@shared_task
def mul(x, y):
    return x * y
"""

# The tests run in file order: the session worker starts in the third and consumes the
# default queue until the run ends, so the tests with a worker per test come first.
SESSION_TESTS = """
import redis

from tasks import mul


def keys(url):
    client = redis.Redis.from_url(url.replace("perkey://", "redis://"))
    try:
        return sorted(client.keys())
    finally:
        client.close()


def not_bindings(url):
    return [key for key in keys(url) if b"_kombu.binding." not in key]


def test_1_leaves_a_result_and_a_message(celery_app, celery_worker, perkey_url, perkey_broker_url):
    assert celery_app.tasks[mul.name].delay(6, 7).get(timeout=10) == 42
    celery_app.send_task("nobody.runs.this", queue="unconsumed")
    assert keys(perkey_url)
    assert b"unconsumed" in keys(perkey_broker_url)


def test_2_starts_on_empty_databases(perkey_url, perkey_broker_url):
    assert keys(perkey_url) == []
    assert not_bindings(perkey_broker_url) == []


def test_3_a_session_worker(celery_session_app, celery_session_worker, perkey_url):
    assert keys(perkey_url) == []
    assert celery_session_app.tasks[mul.name].delay(2, 21).get(timeout=10) == 42
    assert keys(perkey_url)


def test_4_the_session_worker_outlives_the_emptying(
    celery_session_app, celery_session_worker, perkey_url, perkey_broker_url
):
    assert keys(perkey_url) == []
    assert not_bindings(perkey_broker_url) == []
    task = celery_session_app.tasks[mul.name]
    assert task.delay(3, 14).get(timeout=10) == 42
    routed = task.apply_async((6, 7), exchange="arithmetic", routing_key="math")
    assert routed.get(timeout=10) == 42
"""

PROJ_CELERY = f"""
from celery import Celery

app = Celery("proj", broker="{PRODUCTION_BROKER}", backend="{PRODUCTION_BACKEND}")


@app.task
def add(x, y):
    return x + y
"""

# The README's recipe, as written there.
PROJ_CONFTEST = """
import pytest
from celery.contrib.testing.worker import start_worker

from celery_perkey_backend.testing import redirect_app
from proj.celery import app

pytest_plugins = ["celery_perkey_backend.testing"]


@pytest.fixture(scope="session")
def proj_worker(perkey_url, perkey_broker_url):
    with redirect_app(app, result_backend=perkey_url, broker_url=perkey_broker_url):
        with start_worker(app, perform_ping_check=False):
            yield app
"""

PROJ_TESTS = f"""
import redis

from proj.celery import add, app


def test_the_app_was_used_before_the_worker_fixture():
    # The backend it builds now is cached in the app: the fixture must drop it.
    assert app.backend.as_uri() == "{PRODUCTION_BACKEND}"


def test_add(proj_worker):
    assert add.delay(2, 3).get(timeout=10) == 5


def test_add_on_an_empty_database(proj_worker, perkey_url):
    client = redis.Redis.from_url(perkey_url.replace("perkey://", "redis://"))
    assert client.dbsize() == 0
    assert add.delay(20, 22).get(timeout=10) == 42
    assert client.dbsize() > 0
    client.close()
"""


def test_a_session_scoped_celery_config_on_the_url_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SESSION_CONFTEST)
    pytester.makepyfile(tasks=SESSION_TASKS, test_session=SESSION_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:celery", timeout=120)
    result.assert_outcomes(passed=4)


def test_the_recipe_for_tasks_of_the_projects_own_app(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(PROJ_CONFTEST)
    pytester.mkpydir("proj")
    pytester.makepyfile(**{"proj/celery": PROJ_CELERY, "test_add": PROJ_TESTS})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:celery", timeout=120)
    result.assert_outcomes(passed=3)


class DjangoSettings:
    """Settings as Django's ``settings.py`` holds them, for ``namespace="CELERY"``."""

    CELERY_BROKER_URL = PRODUCTION_BROKER
    CELERY_RESULT_BACKEND = PRODUCTION_BACKEND
    CELERY_BROKER_WRITE_URL = PRODUCTION_BROKER


def production_app(configured: str) -> Celery:
    if configured == "in code":
        app = Celery(
            "other", broker=PRODUCTION_BROKER, backend=PRODUCTION_BACKEND, set_as_current=False
        )
        app.conf.broker_write_url = PRODUCTION_BROKER
    else:
        app = Celery("other", set_as_current=False)
        app.config_from_object(DjangoSettings, namespace="CELERY")
    return app


@pytest.mark.parametrize("configured", ["in code", "from Django's settings"])
def test_redirect_app_is_undone(perkey_url: str, perkey_broker_url: str, configured: str) -> None:
    app = production_app(configured)
    production = app.backend
    assert production.as_uri() == PRODUCTION_BACKEND
    with redirect_app(app, result_backend=perkey_url, broker_url=perkey_broker_url):
        assert app.backend is not production
        assert app.backend.as_uri() == perkey_url
        assert app.connection_for_write().as_uri(include_password=True) == perkey_broker_url
    assert app.conf.result_backend == PRODUCTION_BACKEND
    assert app.conf.broker_url == PRODUCTION_BROKER
    assert app.conf.broker_write_url == PRODUCTION_BROKER
    assert app.backend.as_uri() == PRODUCTION_BACKEND
    assert app.connection_for_write().as_uri(include_password=True) == PRODUCTION_BROKER


@pytest.mark.parametrize("variable", ["CELERY_RESULT_BACKEND", "CELERY_BROKER_URL"])
def test_redirect_app_refuses_what_the_environment_would_override(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "redis://127.0.0.1:9/2")
    app = Celery(
        "other", broker=PRODUCTION_BROKER, backend=PRODUCTION_BACKEND, set_as_current=False
    )
    with (
        pytest.raises(ValueError, match=f"'other'.*{variable} set in the environment"),
        redirect_app(app, result_backend="perkey://127.0.0.1:1/0", broker_url="redis://x/1"),
    ):
        pass
    assert app.conf["broker_url"] == PRODUCTION_BROKER


def test_redirect_app_refuses_an_app_whose_class_fixes_the_backend() -> None:
    class FixedApp(Celery):
        backend_cls = PRODUCTION_BACKEND

    app = FixedApp("fixed", broker=PRODUCTION_BROKER, set_as_current=False)
    with (
        pytest.raises(ValueError, match=r"'fixed'.*its class fixes the result backend"),
        redirect_app(app, result_backend="perkey://127.0.0.1:1/0"),
    ):
        pass
    assert app.backend.as_uri() == PRODUCTION_BACKEND
