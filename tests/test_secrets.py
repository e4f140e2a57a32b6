"""No secret of a backend URL is ever shown: not in ``repr``, errors, logs or CLI output.

Every URL form the backend takes is fed in: Celery's multi-Sentinel form, a cluster of
several nodes (one password, or one per node), ``user:password``, passwords holding
unencoded ``/ ? # @ :``, and secrets in the query string. Each secret is made of
distinctive markers (``sek…``), and every piece of it between those characters is
looked for, so a half-masked password is caught too. Each check also asserts that the
hosts are named: a mask that hid everything would fail.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    ConfigurationError,
    PerkeyError,
)
from celery_perkey_backend.testing import LocalSentinel
from celery_perkey_backend.testing.server import free_port
from celery_perkey_backend.urls import mask_url, redact, secrets_of

from .conftest import run_cli

#: Every operator command, as ``celery -A app perkey …`` runs it.
COMMANDS = [
    ["doctor"],
    ["stats"],
    ["sweep"],
    ["sweep", "--dry-run"],
    ["migrate"],
    ["inspect", "t1"],
    ["metrics"],
]

NO_RETRIES = {"retry_policy": {"max_retries": 0}}


def pieces(secret: str) -> set[str]:
    """The secret, encoded and not, and each of its pieces between URL characters."""
    found = {secret, quote(secret, safe="")}
    found.update(piece for piece in re.split(r"[/?#@:;,&=]", secret) if piece)
    return found


def assert_hidden(
    text: str, secrets: Sequence[str], hosts: Sequence[str] = (), where: str = ""
) -> None:
    """No piece of any secret is in ``text``; every host is (``where``: for the report)."""
    for secret in secrets:
        for piece in pieces(secret):
            assert piece not in text, f"{where}: {piece!r} (of a secret) is shown: {text[:2000]}"
    for host in hosts:
        assert host in text, f"{where}: host {host!r} is not named: {text[:2000]}"


def shown(error: BaseException) -> str:
    """All a traceback would print of ``error``: its message and its chain's."""
    return "".join(traceback.format_exception(error))


# -- the one masking function, on every form ---------------------------------------------


@dataclass
class Form:
    """A URL with its secrets and the hosts it must still name."""

    url: str
    secrets: list[str]
    hosts: list[str]
    transport: dict[str, Any] = field(default_factory=dict)
    refused: bool = False  # as the backend is built


def forms(p1: int, p2: int, s1: int | None = None, s2: int | None = None) -> dict[str, Form]:
    """Every URL form, on ports ``p1`` and ``p2`` of 127.0.0.1; the Sentinel forms on
    ``s1`` and ``s2`` if given, asking for a master the Sentinels do not know."""
    h1, h2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    sh1, sh2 = f"127.0.0.1:{s1 or p1}", f"127.0.0.1:{s2 or p2}"
    sentinel = {"master_name": "no-such-master"}
    return {
        "password": Form(f"perkey://:sekPlain@{h1}/0", ["sekPlain"], [h1]),
        "user-password": Form(f"perkey://sec-user:sekUser@{h1}/0", ["sekUser"], [h1, "sec-user"]),
        "slash": Form(f"perkey://:sekSl1/sekSl2@{h1}/0", ["sekSl1/sekSl2"], [h1], refused=True),
        "question-mark": Form(
            f"perkey://:sekQm1?sekQm2@{h1}/0", ["sekQm1?sekQm2"], [h1], refused=True
        ),
        "hash": Form(f"perkey://:sekHa1#sekHa2@{h1}/0", ["sekHa1#sekHa2"], [h1], refused=True),
        "at": Form(f"perkey://:sekAt1@sekAt2@{h1}/0", ["sekAt1@sekAt2"], [h1]),
        "colon": Form(f"perkey://u:sekCo1:sekCo2@{h1}/0", ["sekCo1:sekCo2"], [h1]),
        "all-specials": Form(
            f"perkey://u:sekAl1@sekAl2/sekAl3?sekAl4#sekAl5:sekAl6@{h1}/0",
            ["sekAl1@sekAl2/sekAl3?sekAl4#sekAl5:sekAl6"],
            [h1],
            refused=True,
        ),
        "query-password": Form(
            f"perkey://{h1}/0?password=sekQp&socket_keepalive=true", ["sekQp"], [h1, "keepalive"]
        ),
        "bad-option": Form(
            f"perkey://:sekBo@{h1}/0?socket_timeout=soon", ["sekBo"], [h1, "socket_timeout"]
        ),
        "tls-option-on-plain": Form(
            f"perkey://{h1}/0?ssl_password=sekTo", ["sekTo"], [h1, "ssl_password"], refused=True
        ),
        "unix": Form(f"perkey+unix://:sekUx@/tmp/perkey-{p1}.sock?db=0", ["sekUx"], [f"{p1}.sock"]),
        "sentinels": Form(
            f"perkey+sentinel://:sekSe1@{sh1};sentinel://:sekSe2@{sh2}/0",
            ["sekSe1", "sekSe2"],
            [sh1, sh2],
            sentinel,
        ),
        "sentinels-users-query": Form(
            f"perkey+sentinel://u:sekSu1@{sh1};u:sekSu2@{sh2}/0?password=sekSu3",
            ["sekSu1", "sekSu2", "sekSu3"],
            [sh1, sh2],
            sentinel,
        ),
        "cluster": Form(f"perkey+cluster://:sekCl@{h1},{h2}/0", ["sekCl"], [h1, h2]),
        "cluster-per-node": Form(
            f"perkey+cluster://u:sekCn1@{h1},u:sekCn2@{h2}/0", ["sekCn1", "sekCn2"], [h1, h2]
        ),
        "cluster-specials": Form(
            f"perkey+cluster://:sekCs1/sekCs2@{h1},:sekCs3@sekCs4@{h2}/0",
            ["sekCs1/sekCs2", "sekCs3@sekCs4"],
            [h1, h2],
            refused=True,
        ),
    }


FORM_NAMES = list(forms(1, 2))


@pytest.mark.parametrize("name", FORM_NAMES)
def test_mask_url_hides_every_secret_and_names_every_host(name: str) -> None:
    form = forms(6379, 6380)[name]
    masked = mask_url(form.url)
    assert_hidden(masked, form.secrets, form.hosts)
    assert "**" in masked
    assert set(form.secrets) <= set(secrets_of(form.url))
    # What redis-py or urllib say about a URL is redacted of each piece of its secrets.
    said = " ".join(sorted(p for s in form.secrets for p in pieces(s)))
    assert_hidden(redact(said, form.url), form.secrets)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "perkey+sentinel://h1:1;h2:2/0?sentinel_password=sekSq1&x=1",
            "perkey+sentinel://h1:1;h2:2/0?sentinel_password=**&x=1",
        ),
        ("perkey://h:1/0?ssl_password=sekSq2;x#y", "perkey://h:1/0?ssl_password=**"),
        ("perkey://h:1/0?db=1&Password=sekSq3", "perkey://h:1/0?db=1&Password=**"),
        # Read two ways (a user "h" with a password "1/0?...", or a query): hidden whole.
        ("perkey://h:1/0?password=sekSq4@sekSq5", "perkey://**"),
        ("perkey://:sekSq6@[::1]:6379/0", "perkey://:**@[::1]:6379/0"),
        # Read as a form it is not, a URL is masked whole after its scheme.
        ("perkey://:sekSq7://sekSq8@h/0", "perkey://**"),
    ],
)
def test_mask_url_of_query_secrets_and_odd_forms(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_leaves_urls_without_secrets_alone() -> None:
    for url in (
        "perkey://127.0.0.1:6379/0",
        "perkey://user@h/0?client_name=a@b",
        "perkey+sentinel://h1:1;sentinel://h2:2/0",
        "perkey+cluster://h1:1,h2:2/0",
        "perkey+rediss://h:1/0?ssl_cert_reqs=CERT_REQUIRED",
        "perkey://[::1]:6379/0",
    ):
        assert mask_url(url) == url


# -- an unreachable server, or a URL redis-py cannot take ---------------------------------


GOOD = "sekGd1@sekGd2:sekGd3"
WRONG = "sekWr1@sekWr2:sekWr3"
SENTINEL_GOOD = "sekSg1/sekSg2"


@pytest.fixture(scope="module")
def closed_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def sentinels() -> Iterator[LocalSentinel]:
    """Two real Sentinels watching a primary and a replica, both with ``sec-user``."""
    with LocalSentinel(sentinels=2) as local:
        for port in local.data_ports:  # ACL users are not replicated
            node = local.client(port)
            node.acl_setuser("sec-user", enabled=True, passwords=[f"+{SENTINEL_GOOD}"])
            node.execute_command("ACL", "SETUSER", "sec-user", "~*", "&*", "+@all")
        yield local


def everything_fails(app: Any) -> Iterator[tuple[str, Callable[[], object]]]:
    """Each way a user meets the backend's errors."""
    yield "store", lambda: app.backend.store_result("t1", 1, states.SUCCESS)
    yield "get", lambda: app.AsyncResult("t1").get(timeout=1)
    yield "state", lambda: app.AsyncResult("t1").state
    yield "forget", lambda: app.AsyncResult("t1").forget()
    yield "restore group", lambda: app.GroupResult.restore("g1")
    yield "sweep", lambda: app.backend.run_sweep()
    yield "stats", lambda: app.backend.stats()


def every_command_fails(
    app: Any,
    secrets: list[str],
    hosts: list[str],
    caplog: pytest.LogCaptureFixture,
    code: int = 3,
) -> None:
    """Each command fails with exit ``code`` (3 an outage, 8 a configuration error)
    naming the hosts, never a secret. ``metrics`` reports ``perkey_up 0`` and logs why,
    as a scrape would; ``doctor`` reports what it could not read where the server
    answers."""
    for command in COMMANDS:
        caplog.clear()
        done = run_cli(app, *command)
        if command == ["metrics"]:
            assert done.exit_code == 0, done.output
            assert "perkey_up 0.0" in done.output
            assert_hidden(done.output, secrets)
            assert_hidden(caplog.text, secrets, hosts)
        elif command == ["doctor"] and done.exit_code != code:
            assert "cannot be read" in done.output, done.output
            assert_hidden(done.output, secrets, hosts)
        else:
            assert done.exit_code == code, (command, done.output)
            assert_hidden(done.output, secrets, hosts)


@pytest.mark.parametrize("name", FORM_NAMES)
def test_repr_errors_logs_and_every_command_of_an_unreachable_server(
    name: str,
    closed_ports: tuple[int, int],
    sentinels: LocalSentinel,
    make_app: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    form = forms(*closed_ports, *sentinels.sentinel_ports)[name]
    app = make_app(
        backend=form.url, result_backend_transport_options={**form.transport, **NO_RETRIES}
    )
    if form.refused:
        # Refused as the backend is built, before any connection.
        with pytest.raises(ConfigurationError) as refused:
            app.backend  # noqa: B018
        assert_hidden(shown(refused.value), form.secrets, form.hosts)
        for command in COMMANDS:
            done = run_cli(app, *command)
            assert done.exit_code == 8, (command, done.output)  # a configuration error
            assert_hidden(done.output, form.secrets, form.hosts)
        return
    assert_hidden(repr(app.backend), form.secrets, form.hosts)
    assert_hidden(app.backend.as_uri(), form.secrets, form.hosts)
    assert_hidden(repr(app.backend.settings), form.secrets)
    with caplog.at_level(logging.DEBUG, logger="celery_perkey_backend"):
        for what, call in everything_fails(app):
            with pytest.raises((PerkeyError, TimeoutError)) as info:
                call()
            if isinstance(info.value, TimeoutError):
                # Sentinels that do not answer can outlast a wait: Celery's TimeoutError
                # names no server.
                assert what == "get" and form.transport, (what, info.value)
                assert_hidden(shown(info.value), form.secrets)
                continue
            assert isinstance(info.value, (BackendUnavailableError, ConfigurationError)), what
            assert_hidden(shown(info.value), form.secrets, form.hosts, what)
        # An option redis-py rejects as it connects is a configuration error too.
        code = 8 if name == "bad-option" else 3
        every_command_fails(app, form.secrets, form.hosts, caplog, code)
    assert_hidden(caplog.text, form.secrets)


# -- real servers: a user whose password holds URL characters --------------------------


@pytest.fixture
def user(r: redis.Redis) -> Iterator[str]:
    r.acl_setuser("sec-user", enabled=True, passwords=[f"+{GOOD}"], reset=True)
    r.execute_command("ACL", "SETUSER", "sec-user", "~*", "&*", "+@all")
    yield "sec-user"
    r.acl_deluser("sec-user")


def user_forms(port: int, password: str) -> dict[str, str]:
    """The forms redis-py connects with, for ``sec-user`` and ``password``."""
    return {
        "userinfo": f"perkey://sec-user:{password}@127.0.0.1:{port}/0",
        "query": f"perkey://sec-user@127.0.0.1:{port}/0?password={password}",
    }


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_every_command_as_a_user_with_a_password_of_url_characters(
    form: str, user: str, server: Any, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    host = f"127.0.0.1:{server.port}"
    app = make_app(backend=user_forms(server.port, GOOD)[form])
    assert_hidden(repr(app.backend), [GOOD], [host, user])
    with caplog.at_level(logging.DEBUG, logger="celery_perkey_backend"):
        app.backend.store_result("t1", {"answer": 42}, states.SUCCESS)
        assert app.AsyncResult("t1").get(timeout=5) == {"answer": 42}
        for command in COMMANDS:
            done = run_cli(app, *command)
            # doctor exits 6 for a dangerous finding on a test server (no persistence).
            assert done.exit_code in (0, 6), (command, done.output)
            assert_hidden(done.output, [GOOD])
    assert_hidden(caplog.text, [GOOD])


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_a_wrong_password_of_url_characters_is_never_shown(
    form: str, user: str, server: Any, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    host = f"127.0.0.1:{server.port}"
    app = make_app(backend=user_forms(server.port, WRONG)[form])
    with caplog.at_level(logging.DEBUG, logger="celery_perkey_backend"):
        for what, call in everything_fails(app):
            with pytest.raises(AccessDeniedError) as info:
                call()
            assert_hidden(shown(info.value), [WRONG], [host], what)
        every_command_fails(app, [WRONG], [host], caplog, 8)
    assert_hidden(caplog.text, [WRONG])


# -- real Sentinels: Celery's multi-Sentinel form ---------------------------------------


def test_celerys_multi_sentinel_form_never_shows_a_password(
    sentinels: LocalSentinel, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = [f"127.0.0.1:{port}" for port in sentinels.sentinel_ports]

    def url(password: str) -> str:
        nodes = [f"sentinel://sec-user:{password}@{host}" for host in hosts]
        return "perkey+" + ";".join(nodes) + "/0"

    transport = {"master_name": sentinels.master_name, **NO_RETRIES}
    # An unencoded "/" would cut the URL before the host: written encoded.
    app = make_app(
        backend=url(quote(SENTINEL_GOOD, safe="")), result_backend_transport_options=transport
    )
    assert_hidden(repr(app.backend), [SENTINEL_GOOD], hosts)
    with caplog.at_level(logging.DEBUG, logger="celery_perkey_backend"):
        app.backend.store_result("t1", 1, states.SUCCESS)
        assert app.AsyncResult("t1").get(timeout=5) == 1
        for command in COMMANDS:
            done = run_cli(app, *command)
            assert done.exit_code in (0, 6), (command, done.output)
            assert_hidden(done.output, [SENTINEL_GOOD])
        app.backend.client.flushall()

        wrong = make_app(backend=url(WRONG), result_backend_transport_options=transport)
        assert_hidden(repr(wrong.backend), [WRONG], hosts)
        for what, call in everything_fails(wrong):
            with pytest.raises(AccessDeniedError) as info:
                call()
            assert_hidden(shown(info.value), [WRONG], hosts, what)
        every_command_fails(wrong, [WRONG], hosts, caplog, 8)
    assert_hidden(caplog.text, [SENTINEL_GOOD, WRONG])
