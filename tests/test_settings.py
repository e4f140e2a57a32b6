"""Settings are read once, when the backend is built, and a wrong one is named then."""

from __future__ import annotations

import datetime
import re
import sys
from typing import Any

import pytest
import redis
from celery import Celery, states

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.settings import parse_duration, parse_flag, parse_size


def _built(make_app: Any, **conf: Any) -> Any:
    app = make_app(**conf)
    return app.backend


def test_a_negative_ttl_is_refused(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"result_expires=-5 .*negative"):
        _built(make_app, result_expires=-5)


def test_a_bad_sweep_age_fails_at_start_not_at_04_00(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"perkey_sweep_max_age='banana'.*1d"):
        _built(make_app, perkey_sweep_max_age="banana")


@pytest.mark.parametrize("text", ["false", "0", "no", "False", "OFF"])
def test_booleans_from_environment_text(make_app: Any, r: redis.Redis, text: str) -> None:
    backend = _built(make_app, perkey_read_once=text)
    assert backend.settings.read_once is False
    backend.store_result("t1", 1, states.SUCCESS)
    assert backend.app.AsyncResult("t1").get(timeout=2) == 1
    # Not consumed: a second get() finds it again.
    assert backend.app.AsyncResult("t1").get(timeout=2) == 1


def test_an_unreadable_boolean_is_named(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"perkey_read_once='maybe'.*true, false"):
        _built(make_app, perkey_read_once="maybe")


def test_sizes_take_human_forms(make_app: Any, r: redis.Redis) -> None:
    backend = _built(make_app, perkey_max_result_bytes="10MB")
    assert backend.settings.max_result_bytes == 10 * 1024 * 1024
    with pytest.raises(ConfigurationError, match=r"perkey_max_result_bytes='lots'.*10MB"):
        _built(make_app, perkey_max_result_bytes="lots")


def test_result_expires_takes_the_same_durations(make_app: Any, r: redis.Redis) -> None:
    backend = _built(make_app, result_expires="1h")
    backend.store_result("t1", 1, states.SUCCESS)
    assert 3_590_000 < r.pttl(backend.layout.result("t1")) <= 3_600_000


def test_a_missing_extra_is_named_with_its_install_line(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(
        ConfigurationError, match=r"pip install 'celery-perkey-backend\[prometheus\]'"
    ):
        _built(make_app, perkey_prometheus_textfile="/tmp/perkey.prom")


def test_a_misspelt_setting_is_refused_with_a_suggestion(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'perkey_read_once'"):
        _built(make_app, perkey_read_onec=True)


class _DjangoStyleSettings:
    """What ``config_from_object('django.conf:settings', namespace='CELERY')`` reads:
    upper-case attributes, ours under the ``CELERY_`` namespace."""

    CELERY_PERKEY_READ_ONCE = "true"
    CELERY_PERKEY_SWEEP_BATCH_SIZE = 50
    CELERY_PERKEY_SWEEP_MAX_AGE = "2h"


def _namespaced(server: Any, settings: object) -> Any:
    app = Celery("namespaced", set_as_current=False)
    app.config_from_object(settings, namespace="CELERY")
    app.conf.result_backend = f"perkey://127.0.0.1:{server.port}/0"
    return app


def test_namespaced_settings_reach_the_backend(server: Any) -> None:
    settings = _namespaced(server, _DjangoStyleSettings).backend.settings
    assert settings.read_once is True
    assert settings.sweep_batch_size == 50
    assert settings.sweep_max_age_s == 7200.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("CELERY_PERKEY_READ_ONEC", "unknown setting 'CELERY_PERKEY_READ_ONEC'; did you mean "
         "'CELERY_PERKEY_READ_ONCE'"),
        # The right name without the namespace: Celery would not hand it over.
        ("PERKEY_READ_ONCE", "'PERKEY_READ_ONCE' is not read in this form; write it as "
         "'CELERY_PERKEY_READ_ONCE'"),
    ],
)  # fmt: skip
def test_a_namespaced_setting_that_celery_would_not_read_is_refused(
    server: Any, name: str, message: str
) -> None:
    settings = type("Settings", (), {name: True})
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        _namespaced(server, settings).backend  # noqa: B018


def test_an_upper_case_setting_without_a_namespace_is_refused(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="write it as 'perkey_read_once'"):
        _built(make_app, PERKEY_READ_ONCE=True)


def test_retry_policy_keys_are_checked(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_retrys"):
        _built(make_app, result_backend_transport_options={"retry_policy": {"max_retrys": 3}})


def test_units_are_in_the_field_names(make_app: Any) -> None:
    settings = _built(
        make_app,
        result_expires=datetime.timedelta(minutes=2),
        result_chord_expires="1d",
        perkey_min_replicas_timeout="250ms",
    ).settings
    assert settings.result_expires_s == 120.0
    assert settings.chord_expires_s == 86400.0
    assert settings.chord_result_expires_s == 86400.0
    assert settings.min_replicas_timeout_ms == 250


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0),
     ("500ms", 0.5), ("1.5h", 5400.0), (datetime.timedelta(hours=1), 3600.0)],
)  # fmt: skip
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize("value", ["", "soon", "-1s", True, None, "1y", float("nan")])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="x="):
        parse_duration(value, "x")


@pytest.mark.parametrize(
    ("value", "size"),
    [(100, 100), ("100", 100), ("1k", 1000), ("1kb", 1024), ("10MB", 10485760), ("1GiB", 2**30)],
)
def test_sizes(value: Any, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [True, 1, "yes", "on", "1", "TRUE"])
def test_true_flags(value: Any) -> None:
    assert parse_flag(value, "x") is True
