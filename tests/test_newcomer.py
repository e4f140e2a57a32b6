"""Small things a newcomer meets first: a wrong URL, the CLI's exit codes, a missing or
wrong password, a TLS URL to a plain server, a dry run's partial list, sizes in the
doctor's findings, and where the Prometheus listener binds."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, states

from celery_perkey_backend import ConfigurationError, CredentialsRefusedError, PerkeyError, cli
from celery_perkey_backend.prometheus import serve
from celery_perkey_backend.settings import Settings
from celery_perkey_backend.sweep import PLAN_LIMIT
from celery_perkey_backend.testing import EmbeddedServer, free_port

from .conftest import run_cli, value
from .processes import celery_worker, stop

README = Path(__file__).resolve().parent.parent / "README.md"

NO_RETRIES = {"retry_policy": {"max_retries": 0}}

# -- a wrong URL fails when the backend is built -----------------------------------------

SECRET = "sekNw1"

#: Every URL form, with a port or a database that is not a number; what the error says.
BAD_URLS = [
    (f"perkey://:{SECRET}@127.0.0.1:63x9/0", "the port"),
    (f"perkey://:{SECRET}@127.0.0.1:6379/abc", "the database 'abc' is not a number"),
    (f"perkey://:{SECRET}@127.0.0.1:6379/0/1", "the database '0/1' is not a number"),
    (f"perkey://:{SECRET}@127.0.0.1:6379?db=one", "db='one' is not a number"),
    (f"perkey+redis://127.0.0.1:6379/x?password={SECRET}", "the database 'x' is not a number"),
    (f"perkey+rediss://:{SECRET}@127.0.0.1:port/0", "the port"),
    (f"perkey+rediss://:{SECRET}@127.0.0.1:6380/tls", "the database 'tls' is not a number"),
    (f"perkey+unix:///tmp/redis.sock?db=zero&password={SECRET}", "db='zero' is not a number"),
    ("perkey+cluster://127.0.0.1:7000,127.0.0.1:70o1/0", "the port"),
    ("perkey+cluster://127.0.0.1:7000,127.0.0.1:7001/first", "the database 'first'"),
    (
        f"perkey+sentinel://:{SECRET}@127.0.0.1:26379;sentinel://:{SECRET}@127.0.0.1:2637x/0",
        "the port",
    ),
    ("perkey+sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/db1", "the database 'db1'"),
]


@pytest.mark.parametrize(("url", "complaint"), BAD_URLS, ids=[url for url, _ in BAD_URLS])
def test_a_port_or_database_that_is_no_number_fails_as_the_backend_is_built(
    url: str, complaint: str
) -> None:
    app = Celery("newcomer", set_as_current=False)
    app.conf.result_backend = url
    app.conf.result_backend_transport_options = {"master_name": "mymaster"}
    with pytest.raises(ConfigurationError) as refused:
        app.backend  # noqa: B018
    message = str(refused.value)
    assert complaint in message
    assert "result_backend 'perkey" in message  # the URL as written, masked
    assert SECRET not in message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/abc", "redis://127.0.0.1:63x9/0"])
def test_celerys_own_redis_backend_refuses_them_too(url: str) -> None:
    app = Celery("parity", set_as_current=False)
    app.conf.result_backend = url
    with pytest.raises(ValueError):
        app.backend  # noqa: B018


def test_a_numeric_database_of_every_form_is_taken() -> None:
    for url in (
        "perkey://127.0.0.1:6379/3",
        "perkey://127.0.0.1:6379/",
        "perkey://127.0.0.1:6379",
        "perkey+unix:///tmp/redis.sock?db=2",
        "perkey+cluster://127.0.0.1:7000,127.0.0.1:7001/0",
        "perkey+sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/4",
    ):
        Settings.from_conf({}, url.removeprefix("perkey+"))


# -- the CLI's exit codes: configuration errors apart from outages -------------------------


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_wrong_url_exits_8_and_an_outage_3(make_app: Any) -> None:
    wrong = run_cli(make_app(backend=f"perkey://:{SECRET}@127.0.0.1:6379/abc"), "stats")
    assert wrong.exit_code == cli.EXIT_CONFIGURATION == 8
    assert "the database 'abc' is not a number" in one_line(wrong.stderr)
    assert SECRET not in wrong.output
    down = make_app(
        backend=f"perkey://127.0.0.1:{free_port()}/0",
        result_backend_transport_options=NO_RETRIES,
    )
    outage = run_cli(down, "stats")
    assert outage.exit_code == cli.EXIT_UNAVAILABLE == 3
    assert "is unavailable" in one_line(outage.stderr)


def test_a_wrong_setting_exits_8(make_app: Any) -> None:
    done = run_cli(make_app(perkey_read_once="perhaps"), "sweep", "--dry-run")
    assert done.exit_code == 8
    assert "perkey_read_once='perhaps' is not valid" in one_line(done.stderr)


def test_a_missing_extra_exits_8(make_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # prometheus_client not installed: importing it fails, as it would.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    printed = run_cli(make_app(), "metrics")
    assert printed.exit_code == 8
    assert "pip install 'celery-perkey-backend[prometheus]'" in one_line(printed.stderr)
    exporting = run_cli(make_app(perkey_prometheus_port=free_port()), "stats")
    assert exporting.exit_code == 8
    assert "prometheus_client is not installed" in one_line(exporting.stderr)


def test_the_readme_has_one_table_of_every_exit_code() -> None:
    text = README.read_text()
    section = text[text.index("### The CLI") : text.index("### The doctor")]
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", section, re.MULTILINE))
    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert codes <= {int(code) for code in rows}
    assert set(rows) == {str(code) for code in range(9)}
    assert "configuration" in rows["8"]
    assert "outage" in rows["3"]


# -- a password the server wants, or refuses ----------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Any:
    with EmbeddedServer(args=["--requirepass", "right-secret"]) as srv:
        yield srv


@pytest.mark.parametrize("query", ["", "?protocol=2"], ids=["HELLO", "RESP2"])
def test_no_password_given_gets_our_own_words(make_app: Any, guarded: Any, query: str) -> None:
    # RESP3 (redis-py 8's default) meets NOAUTH at HELLO, RESP2 at the first command.
    app = make_app(
        backend=f"perkey://127.0.0.1:{guarded.port}/0{query}",
        result_backend_transport_options=NO_RETRIES,
    )
    with pytest.raises(CredentialsRefusedError) as refused:
        app.backend.store_result("t1", 1, states.SUCCESS)
    message = str(refused.value)
    assert f"Redis at perkey://127.0.0.1:{guarded.port}/0{query} requires a password" in message
    assert "give one in the URL" in message
    assert "HELLO" not in message


def test_doctor_without_the_password_says_so_in_one_line(make_app: Any, guarded: Any) -> None:
    app = make_app(backend=f"perkey://127.0.0.1:{guarded.port}/0")
    done = run_cli(app, "doctor")
    assert done.exit_code == 8, done.output
    assert "requires a password" in one_line(done.stderr)
    assert "UNKNOWN" not in done.output


def test_doctor_with_a_wrong_password_says_so_in_one_line(make_app: Any, guarded: Any) -> None:
    app = make_app(backend=f"perkey://:{SECRET}@127.0.0.1:{guarded.port}/0")
    for args in (["doctor"], ["doctor", "--json"]):
        done = run_cli(app, *args)
        assert done.exit_code == 8, done.output
        line = one_line(done.stderr)
        assert f"perkey://:**@127.0.0.1:{guarded.port}/0 refused the password" in line
        assert SECRET not in done.output
        assert done.stdout == ""


def test_doctor_with_the_right_password_still_reports(make_app: Any, guarded: Any) -> None:
    app = make_app(backend=f"perkey://:right-secret@127.0.0.1:{guarded.port}/0")
    done = run_cli(app, "doctor", "--json")
    assert done.exit_code in (0, 6), done.output
    assert json.loads(done.stdout)["counts"]["unknown"] == 0


def test_a_tls_url_to_a_plain_server_hints_at_tls(make_app: Any, server: Any) -> None:
    app = make_app(
        backend=f"perkey+rediss://:{SECRET}@127.0.0.1:{server.port}/0?ssl_cert_reqs=none",
        redis_socket_connect_timeout=1,
        result_backend_transport_options=NO_RETRIES,
    )
    with pytest.raises(PerkeyError) as failed:
        app.backend.store_result("t1", 1, states.SUCCESS)
    message = str(failed.value)
    assert "does the server speak TLS?" in message
    assert f"perkey+rediss://:**@127.0.0.1:{server.port}/0" in message
    assert SECRET not in message


def test_an_unreachable_plain_url_gets_no_tls_hint(make_app: Any) -> None:
    app = make_app(
        backend=f"perkey://127.0.0.1:{free_port()}/0",
        result_backend_transport_options=NO_RETRIES,
    )
    with pytest.raises(PerkeyError) as failed:
        app.backend.store_result("t1", 1, states.SUCCESS)
    assert "is unavailable" in str(failed.value)
    assert "TLS" not in str(failed.value)


# -- a dry run that lists only part of what it would do ------------------------------------


def test_a_dry_run_says_when_its_list_is_cut(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_expires=None)
    for i in range(PLAN_LIMIT + 5):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    done = run_cli(app, "sweep", "--dry-run")
    assert done.exit_code == 0, done.output
    listed = [line for line in done.stdout.splitlines() if line.startswith("would set ttl on")]
    assert len(listed) == PLAN_LIMIT
    note = f"(listed the first {PLAN_LIMIT} of {PLAN_LIMIT + 5} actions it would take"
    assert note in done.stdout
    as_json = json.loads(run_cli(app, "sweep", "--dry-run", "--json").stdout)
    assert (len(as_json["planned"]), as_json["planned_total"]) == (PLAN_LIMIT, PLAN_LIMIT + 5)
    assert r.ttl(app.backend.layout.result("t0")) == -1  # nothing was changed


def test_a_whole_dry_run_has_no_note(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_expires=None)
    app.backend.store_result("t1", 1, states.SUCCESS)
    done = run_cli(app, "sweep", "--dry-run")
    assert "would set ttl on" in done.stdout
    assert "listed the first" not in done.stdout


# -- sizes as people read them ------------------------------------------------------------


def test_doctor_shows_sizes_as_stats_does(make_app: Any) -> None:
    with EmbeddedServer(args=["--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru"]) as srv:
        app = make_app(backend=f"perkey://127.0.0.1:{srv.port}/0")
        done = run_cli(app, "doctor")
        figures = json.loads(run_cli(app, "doctor", "--json").stdout)
    assert "maxmemory-policy is allkeys-lru with maxmemory 10.0 MiB" in done.stdout
    assert re.search(r"used_memory \d+\.\d MiB is \d+% of maxmemory 10\.0 MiB", done.stdout)
    assert "10485760" not in done.stdout
    # For monitoring, --json keeps the raw figures.
    nodes = figures["findings"][1]["details"]["nodes"]
    assert [node["maxmemory"] for node in nodes.values()] == [10485760]


# -- where the Prometheus listener binds ---------------------------------------------------


def test_the_listener_binds_where_perkey_prometheus_addr_says(server: Any, r: redis.Redis) -> None:
    port = free_port()
    env = {"PERKEY_TEST_PROMETHEUS_PORT": str(port), "PERKEY_TEST_PROMETHEUS_ADDR": "127.0.0.1"}
    worker = celery_worker(server, env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                    text = got.read().decode()
                break
            except urllib.error.URLError:
                assert worker.poll() is None, "the worker exited"
                assert time.monotonic() < deadline, "the worker never listened"
                time.sleep(0.1)
        assert value(text, "perkey_up") == 1
        # Another loopback address reaches every-interface listeners, not this one.
        with socket.socket() as other, pytest.raises(ConnectionRefusedError):
            other.settimeout(5)
            other.connect(("127.0.0.2", port))
    finally:
        stop(worker)


def test_the_default_is_every_interface_and_a_bad_address_fails(make_app: Any) -> None:
    assert make_app().backend.settings.prometheus_addr == "0.0.0.0"
    assert make_app(perkey_prometheus_addr="[::1]").backend.settings.prometheus_addr == "::1"
    for bad in ("256.1.1.1", "local host", "", "http://127.0.0.1", 8000):
        with pytest.raises(ConfigurationError, match="perkey_prometheus_addr=") as refused:
            make_app(perkey_prometheus_addr=bad).backend  # noqa: B018
        assert "an IP address of this host" in str(refused.value)


def test_an_address_of_another_host_is_logged_clearly(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "celery_perkey_backend"):
        # TEST-NET-1: documentation only, never an address of this host.
        assert serve(app.backend.store, free_port(), "192.0.2.1") is False
    assert "cannot serve Prometheus metrics on 192.0.2.1 port" in caplog.text
    assert "perkey_prometheus_addr" in caplog.text


def test_the_readme_documents_perkey_prometheus_addr() -> None:
    row = next(
        line for line in README.read_text().splitlines() if "`perkey_prometheus_addr`" in line
    )
    assert "`0.0.0.0`" in row
    assert "all interfaces" in row
