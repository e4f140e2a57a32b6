"""A plain Celery app for `celery worker` subprocesses: perkey by configuration only."""

from __future__ import annotations

import os

from celery import Celery

PORT = os.environ["PERKEY_TEST_PORT"]

app = Celery("worker_app")
app.conf.update(
    broker_url=os.environ.get("PERKEY_TEST_BROKER", f"redis://127.0.0.1:{PORT}/1"),
    result_backend=os.environ.get("PERKEY_TEST_BACKEND", f"perkey://127.0.0.1:{PORT}/0"),
    task_track_started=True,
    broker_connection_retry_on_startup=True,
    beat_schedule={"often": {"task": "w.mul", "schedule": 0.2, "args": (2, 2)}},
    result_expires=3600,
)


if os.environ.get("PERKEY_TEST_ACKS_LATE"):
    # Redelivery of a task whose worker died: acknowledged only when done, and back in
    # the queue soon after the worker is gone.
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True
    app.conf.broker_transport_options = {"visibility_timeout": 2}
if os.environ.get("PERKEY_TEST_READ_ONCE"):
    app.conf.perkey_read_once = True
if "PERKEY_TEST_RESULT_EXPIRES" in os.environ:
    app.conf.result_expires = float(os.environ["PERKEY_TEST_RESULT_EXPIRES"]) or None
if os.environ.get("PERKEY_TEST_LEGACY_FALLBACK"):
    app.conf.perkey_legacy_fallback = os.environ["PERKEY_TEST_LEGACY_FALLBACK"]
if os.environ.get("PERKEY_TEST_PROMETHEUS_PORT"):
    app.conf.perkey_prometheus_port = int(os.environ["PERKEY_TEST_PROMETHEUS_PORT"])
if os.environ.get("PERKEY_TEST_PROMETHEUS_ADDR"):
    app.conf.perkey_prometheus_addr = os.environ["PERKEY_TEST_PROMETHEUS_ADDR"]
if os.environ.get("PERKEY_TEST_PROMETHEUS_TEXTFILE"):
    app.conf.perkey_prometheus_textfile = os.environ["PERKEY_TEST_PROMETHEUS_TEXTFILE"]
    app.conf.perkey_prometheus_refresh = 0.3

if os.environ.get("PERKEY_TEST_SWEEP_EVERY"):
    # The README's one beat entry for the sweep task.
    app.conf.beat_schedule = {
        "perkey-sweep": {
            "task": "celery_perkey_backend.sweep",
            "schedule": float(os.environ["PERKEY_TEST_SWEEP_EVERY"]),
            "kwargs": {"max_age": "1d"},
        }
    }


@app.task(name="w.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="w.steps", bind=True)
def steps(self, n: int) -> int:  # type: ignore[no-untyped-def]
    import time

    for i in range(n):
        self.update_state(state="PROGRESS", meta={"i": i})
        time.sleep(0.05)
    return n


@app.task(name="w.slow")
def slow(seconds: float, value: object) -> object:
    import time

    time.sleep(seconds)
    return value


@app.task(name="w.total")
def total(values: list[int]) -> int:
    return sum(values)


@app.task(name="w.fail")
def fail() -> None:
    raise ValueError("subprocess failure")


# -- chord crash tests (tests/test_chord_crash.py) ------------------------------------
#
# With PERKEY_TEST_CHORD_HOOKS set, a worker SIGKILLs itself once at one step of the
# chord protocol, as the side channel (db 3) says: its key "kill" holds
# "<step>:<child|worker>" (the pool child, or the whole worker), and is deleted as the
# kill happens, which sets "killed". Steps: before_claim (on_chord_part_return of the
# header's last part, its result stored), after_claim (the claim won), before_publish
# ("publishing" recorded, the body not sent), after_publish (the body sent, not yet
# marked done), after_done (marked done, the header task not yet acknowledged).
SIDE_DB = 3

if os.environ.get("PERKEY_TEST_CHORD_CLAIM_TTL"):
    app.conf.perkey_chord_claim_ttl = os.environ["PERKEY_TEST_CHORD_CLAIM_TTL"]


def side_channel():  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis(port=int(PORT), db=SIDE_DB)


@app.task(name="w.count_body")
def count_body(values: list[int], tag: str) -> int:
    """A chord body that counts its runs in the side channel."""
    side_channel().incr(f"body-runs:{tag}")
    return sum(values)


def _install_chord_kill() -> None:
    import signal

    from celery_perkey_backend.backend import PerkeyBackend
    from celery_perkey_backend.store import ResultStore

    side = side_channel()

    def die(at: str) -> None:
        spec = (side.get("kill") or b"").decode()
        step, _, who = spec.partition(":")
        if step == at and side.delete("kill"):
            side.set("killed", spec)
            if who == "worker":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    part_returned = PerkeyBackend.on_chord_part_return

    def on_chord_part_return(self, request, state, result, **kwargs):  # type: ignore[no-untyped-def]
        # Header tasks run one at a time (--concurrency=1), in order: the last one
        # completes the chord.
        size = self.client.get(self.layout.chord_keys(request.group).size)
        if size is not None and request.group_index == int(size) - 1:
            die("before_claim")
        return part_returned(self, request, state, result, **kwargs)

    chord_part = ResultStore.chord_part

    def claim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        tally = chord_part(self, *args, **kwargs)
        if tally.claimed:
            die("after_claim")
        return tally

    chord_publishing = ResultStore.chord_publishing

    def publishing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        allowed = chord_publishing(self, *args, **kwargs)
        die("before_publish")
        return allowed

    chord_done = ResultStore.chord_done

    def done(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        die("after_publish")
        finished = chord_done(self, *args, **kwargs)
        die("after_done")
        return finished

    PerkeyBackend.on_chord_part_return = on_chord_part_return  # type: ignore[method-assign]
    ResultStore.chord_part = claim  # type: ignore[method-assign]
    ResultStore.chord_publishing = publishing  # type: ignore[method-assign]
    ResultStore.chord_done = done  # type: ignore[method-assign]


if os.environ.get("PERKEY_TEST_CHORD_HOOKS"):
    _install_chord_kill()


# -- chord agreement tests (tests/test_chord_agreement.py) ----------------------------
#
# With PERKEY_TEST_HOLD_STORE set, the pool child about to store the SUCCESS of the task
# whose id the side channel's "hold" key names records its pid under "held" and blocks
# there until the test SIGKILLs it. With perkey:// that is after the task was counted
# as a chord part; with redis:// it is the same moment, before the write. Each header
# task whose on_chord_part_return has finished is added to the "returned" set.


def _install_store_hold() -> None:
    from celery import states
    from celery.backends.redis import RedisBackend

    from celery_perkey_backend.backend import PerkeyBackend
    from celery_perkey_backend.store import ResultStore

    side = side_channel()

    def hold(task_id: str) -> None:
        if task_id.encode() == side.get("hold"):
            side.set("held", os.getpid())
            while True:  # until SIGKILLed
                side.blpop(["never"], timeout=1)

    write = ResultStore.write

    def held_write(self, task_id, letter, *args, **kwargs):  # type: ignore[no-untyped-def]
        if letter == "S":
            hold(task_id)
        return write(self, task_id, letter, *args, **kwargs)

    set_with_state = RedisBackend._set_with_state

    def held_set(self, key, value, state):  # type: ignore[no-untyped-def]
        name, prefix = (
            k.decode() if isinstance(k, bytes) else k for k in (key, self.task_keyprefix)
        )
        if state == states.SUCCESS and name.startswith(prefix):
            hold(name[len(prefix) :])
        return set_with_state(self, key, value, state)

    def recorded(returned):  # type: ignore[no-untyped-def]
        def on_chord_part_return(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
            outcome = returned(self, request, *args, **kwargs)
            side.sadd("returned", request.id)
            return outcome

        return on_chord_part_return

    ResultStore.write = held_write  # type: ignore[method-assign]
    RedisBackend._set_with_state = held_set  # type: ignore[method-assign]
    for backend in (PerkeyBackend, RedisBackend):
        backend.on_chord_part_return = recorded(backend.on_chord_part_return)  # type: ignore[method-assign]


if os.environ.get("PERKEY_TEST_HOLD_STORE"):
    _install_store_hold()
