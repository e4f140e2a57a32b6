"""Under gevent, plain `get()` multiplexes by itself: more waits than the server takes
clients, all answered, on a handful of connections (a scaled-down run of the 12,000
greenlets against ``maxclients 10000`` that issue 11 measured)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import redis
from celery import states

from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_until

WAITS = 1200
MAXCLIENTS = 1000

_GREENLETS = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
from celery import Celery
app = Celery("green", backend=sys.argv[1], set_as_current=False)
app.conf.redis_client_name = "green"
waits = int(sys.argv[2])
assert app.backend.waiter.multiplex, "perkey_multiplex=auto did not see gevent"
jobs = [gevent.spawn(app.AsyncResult(f"t{i}").get, timeout=120) for i in range(waits)]
gevent.joinall(jobs, timeout=150)
values = [job.value for job in jobs]
errors = [repr(job.exception) for job in jobs if job.exception is not None]
print(sum(values[i] == i for i in range(waits)), len(errors), errors[:3])
"""


def test_more_gevent_waits_than_the_server_takes_clients(make_app: Any) -> None:
    with EmbeddedServer(args=["--maxclients", str(MAXCLIENTS)]) as srv:
        client = redis.Redis(port=srv.port)
        url = f"perkey://127.0.0.1:{srv.port}/0"
        green = subprocess.Popen(
            [sys.executable, "-c", _GREENLETS, url, str(WAITS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        app = make_app(backend=url)
        layout = app.backend.layout
        # Every wait has registered: then none can miss its result.
        wait_until(
            lambda: (
                all(client.exists(layout.watchers(f"t{i}")) for i in range(0, WAITS, 97))
                and client.exists(layout.watchers(f"t{WAITS - 1}"))
            ),
            "the greenlets wait",
            120,
        )
        held = [c for c in client.client_list() if c["name"] == "green"]
        for i in range(WAITS):
            app.backend.store_result(f"t{i}", i, states.SUCCESS)
        out, err = green.communicate(timeout=180)
        assert green.returncode == 0, err[-3000:]
        answered, failed, _ = out.split(" ", 2)
        assert (int(answered), int(failed)) == (WAITS, 0), out
        assert len(held) <= 8
        client.close()
