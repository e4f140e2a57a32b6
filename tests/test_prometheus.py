"""Prometheus export under a prefork `celery worker` (2 pool processes, each replaced
after one task), in both modes, and the example alert rules against what it writes."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import states

from celery_perkey_backend.prometheus import METRIC_NAMES, render
from celery_perkey_backend.testing import free_port

from .conftest import samples, value
from .processes import celery_worker, stop

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "prometheus-alerts.yml"
PREFORK = ("--pool=prefork", "--concurrency=2", "--max-tasks-per-child=1")
SWEEP = "celery_perkey_backend.sweep"


def _until(read: Callable[[], Any], what: str, seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = read()
        except OSError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Watcher:
    """Reads the metrics over and over in a thread, keeping every sweep count seen."""

    def __init__(self, read: Callable[[], str]) -> None:
        self.read = read
        self.counts: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                count = value(self.read(), "perkey_sweeps_total")
            except OSError:
                count = None
            if count is not None:
                self.counts.append(count)
            time.sleep(0.02)

    def stop(self) -> list[float]:
        """Every count seen, the last one read after the work was done."""
        self.stopped.set()
        self.thread.join(10)
        last = value(self.read(), "perkey_sweeps_total")
        return [*self.counts, *([] if last is None else [last])]


def _exercise(client: Any, r: redis.Redis, read: Callable[[], str]) -> None:
    """What both modes must show: counters that only rise, whichever process swept;
    gauges current; only our own series."""
    first = _until(lambda: (t := read()) and value(t, "perkey_keys", kind="result") is not None
                   and t, "the key metrics a worker records when it starts")  # fmt: skip
    assert value(first, "perkey_sweeps_total") == 0
    assert all(name.startswith("perkey_") for name, _ in samples(first))
    assert not re.search(r"^(process|python)_", first, re.MULTILINE)
    saved = client.GroupResult("g1", [client.AsyncResult("t1")])
    saved.save()
    watcher = Watcher(read)
    try:
        for sweeps in range(1, 5):
            summary = client.send_task(SWEEP).get(timeout=60)
            assert summary["skipped_locked"] is False
            text = read()
            assert value(text, "perkey_sweeps_total") == sweeps
            if sweeps == 2:
                assert value(text, "perkey_keys", kind="group") == 1
                saved.delete()
            if sweeps == 3:
                # Gone since the last sweep: the gauge says so, it does not linger.
                assert value(text, "perkey_keys", kind="group") == 0
    finally:
        seen = watcher.stop()
    assert seen, "the watcher read nothing"
    assert seen == sorted(seen), f"a counter went backwards: {seen}"
    assert seen[-1] == 4
    # Live figures: a waiter blocked now is counted now, not at the next sweep.
    waiter = threading.Thread(target=lambda: client.AsyncResult("w1").get(timeout=30))
    waiter.start()
    try:
        _until(
            lambda: any(
                v >= 1
                for (name, _), v in samples(read()).items()
                if name == "perkey_server_blocked_clients"
            ),
            "the blocked waiter to show",
        )
    finally:
        client.backend.store_result("w1", "done", states.SUCCESS)
        waiter.join(30)


def test_port_mode_under_a_prefork_worker(server: Any, r: redis.Redis, make_app: Any) -> None:
    port = free_port()
    worker = celery_worker(server, {"PERKEY_TEST_PROMETHEUS_PORT": str(port)}, *PREFORK)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    try:
        # Listening from the start, not from the first sweep.
        _exercise(make_app(), r, scrape)
    finally:
        stop(worker)
    assert worker.returncode == 0


def test_textfile_mode_under_a_prefork_worker(
    server: Any, r: redis.Redis, make_app: Any, tmp_path: Path
) -> None:
    target = tmp_path / "perkey.prom"
    worker = celery_worker(server, {"PERKEY_TEST_PROMETHEUS_TEXTFILE": str(target)}, *PREFORK)
    try:
        _exercise(make_app(), r, target.read_text)
    finally:
        stop(worker)
    assert worker.returncode == 0


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word in {"and", "or", "unless", "bool", "offset"}:
            continue  # a function or an operator
        if re.fullmatch(r"\d+[smhdwy]", word) or text[match.start() - 1 : match.start()].isdigit():
            continue
        names.add(word)
    return names


def test_metric_names_of_an_expression() -> None:
    assert _metric_names(
        'max without (instance) (increase(a_total{class="x"}[1d])) > 0 or b / c > 0.5'
    ) == {"a_total", "b", "c"}
    assert _metric_names("time() - max by (job) (d) > 2 * 86400") == {"d"}


def test_the_alert_rules_use_only_metrics_the_exporter_writes(
    make_app: Any, r: redis.Redis
) -> None:
    app = make_app(perkey_prometheus_port=free_port())  # exporting on: sweeps are recorded
    app.backend.store_result("t1", 1, states.SUCCESS)
    app.backend.run_sweep()
    with pytest.raises(Exception, match="unknown sweep option"):
        app.backend.run_sweep(bogus=1)
    written = {name for name, _ in samples(render(app.backend.store).decode())}
    assert written == METRIC_NAMES
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert {"PerkeyKeysWithoutTTL", "PerkeySweepFailing", "PerkeySweepNotRunning",
            "PerkeyBlockedClientsNearMaxclients", "PerkeyChordsRepaired",
            "PerkeyChordsFailed"} <= {rule["alert"] for rule in rules}  # fmt: skip
    for rule in rules:
        used = _metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= written, f"{rule['alert']} reads {used - written}, which is never written"
