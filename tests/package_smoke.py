"""Smoke test of the built wheel, installed into a fresh venv: ``python3 dev.py package``.

Not a pytest module (pytest collects ``test_*.py``): ``dev.py package`` copies it into an
empty directory and runs it there with the fresh venv's Python, so the package can only
be imported from the installed wheel::

    python package_smoke.py chord_done.lua ... take.lua   # the Lua files the wheel must hold

It is also the Celery app of the worker it starts (``celery -A package_smoke worker``).
It checks, and stops at the first failure with a message and exit status 1:

- that ``celery_perkey_backend`` comes from the venv's site-packages, with its metadata
  (license expression, project URLs);
- the files besides modules: the license, every Lua script and ``py.typed``;
- the entry points: ``perkey`` in ``celery.result_backends`` and in ``celery.commands``;
- each extra's import: ``prometheus`` (prometheus_client), ``hiredis`` (hiredis, taken
  up by redis-py), ``server`` (the Valkey binary), ``testing`` (pytest-celery, and the
  fixtures of ``celery_perkey_backend.testing``);
- a task end to end: a ``celery worker`` subprocess stores its result through the
  ``perkey://`` backend on a throwaway server, ``get()`` returns it, and ``celery
  perkey --help`` and ``celery perkey inspect`` run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from celery import Celery

DISTRIBUTION = "celery-perkey-backend"
HERE = Path(__file__).resolve().parent

app = Celery("package_smoke")
if "PERKEY_SMOKE_BACKEND" in os.environ:  # the worker: the URLs come from its parent
    app.conf.update(
        broker_url=os.environ["PERKEY_SMOKE_BROKER"],
        result_backend=os.environ["PERKEY_SMOKE_BACKEND"],
    )


@app.task(name="package_smoke.add")
def add(x: int, y: int) -> int:
    return x + y


def check(what: str, condition: object, detail: object = None) -> None:
    """Print ``ok`` for a check that holds; exit with a message for one that does not."""
    if not condition:
        shown = "" if detail is None else f": {detail!r}"
        sys.exit(f"package smoke test FAILED: {what}{shown}")
    print(f"ok  {what}", flush=True)


def check_installed() -> None:
    """Where the package comes from, and its metadata; without importing it yet."""
    spec = importlib.util.find_spec("celery_perkey_backend")
    location = Path(spec.origin).resolve().parent if spec and spec.origin else None
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(
        "celery_perkey_backend is installed in the venv's site-packages",
        location is not None and location.parent == purelib,
        location,
    )
    meta = importlib.metadata.metadata(DISTRIBUTION)
    check("License-Expression is BSD-3-Clause", meta["License-Expression"] == "BSD-3-Clause")
    urls = {entry.split(",")[0] for entry in meta.get_all("Project-URL") or []}
    wanted = {"Homepage", "Documentation", "Changelog", "Issues"}
    check("the project URLs are in the metadata", wanted <= urls, urls)


def check_files(lua: list[str]) -> None:
    """The files the wheel must install besides modules, by its RECORD and on disk."""
    installed = {
        str(record): Path(record.locate())
        for record in importlib.metadata.files(DISTRIBUTION) or []
        if Path(record.locate()).is_file()
    }
    licenses = [name for name in installed if name.endswith(".dist-info/licenses/LICENSE")]
    check("the LICENSE file is installed", licenses, sorted(installed))
    check("py.typed is installed", "celery_perkey_backend/py.typed" in installed)
    scripts = sorted(
        name.rsplit("/", 1)[1]
        for name in installed
        if name.startswith("celery_perkey_backend/lua/")
    )
    check(f"the {len(lua)} Lua scripts are installed", lua and scripts == sorted(lua), scripts)


def check_entry_points() -> None:
    from celery_perkey_backend.backend import PerkeyBackend
    from celery_perkey_backend.cli import perkey

    def named(group: str) -> Any:
        found = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == "perkey"]
        check(f"one entry point 'perkey' in {group}", len(found) == 1, found)
        return found[0].load()

    check(
        "celery.result_backends:perkey is PerkeyBackend",
        named("celery.result_backends") is PerkeyBackend,
    )
    check("celery.commands:perkey is the perkey command group", named("celery.commands") is perkey)


def check_extras() -> Path:
    prometheus_client = importlib.import_module("prometheus_client")
    check("extra prometheus: prometheus_client imports", hasattr(prometheus_client, "Gauge"))
    importlib.import_module("hiredis")
    from redis.utils import HIREDIS_AVAILABLE

    check("extra hiredis: hiredis imports and redis-py takes it up", HIREDIS_AVAILABLE)
    from celery_perkey_backend.testing import find_server_binary

    binary = find_server_binary("valkey")
    check("extra server: the Valkey binary is installed", os.access(binary, os.X_OK), binary)
    importlib.import_module("pytest_celery")
    testing = importlib.import_module("celery_perkey_backend.testing")
    check("extra testing: pytest-celery and the perkey fixtures import", testing.perkey_url)
    return binary


def celery(*args: str) -> list[str]:
    """The venv's ``celery`` command, with this module as its app."""
    return [str(Path(sys.executable).parent / "celery"), "-A", "package_smoke", *args]


def run_celery(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        celery(*args), cwd=HERE, env=env, capture_output=True, text=True, timeout=60
    )


def check_end_to_end(binary: Path) -> None:
    from celery_perkey_backend.testing import EmbeddedServer

    with EmbeddedServer(binary) as server:
        backend = f"perkey://127.0.0.1:{server.port}/0"
        broker = f"redis://127.0.0.1:{server.port}/1"
        env = dict(os.environ, PERKEY_SMOKE_BACKEND=backend, PERKEY_SMOKE_BROKER=broker)
        app.conf.update(broker_url=broker, result_backend=backend)
        check(
            "the app's backend is the perkey backend", type(app.backend).__name__ == "PerkeyBackend"
        )

        usage = run_celery("perkey", "--help", env=env)
        check("celery perkey --help exits 0", usage.returncode == 0, usage.stderr)
        check("celery perkey --help lists its commands", "sweep" in usage.stdout, usage.stdout)

        options = ["--pool", "solo", "--loglevel", "WARNING", "--without-gossip",
                   "--without-mingle", "--without-heartbeat"]  # fmt: skip
        log = HERE / "worker.log"
        with log.open("wb") as output:
            worker = subprocess.Popen(
                celery("worker", *options), cwd=HERE, env=env, stdout=output, stderr=output
            )
            try:
                result = add.delay(2, 3)
                try:
                    value = result.get(timeout=60)
                except Exception as exc:
                    status = worker.poll()
                    print(log.read_text(errors="replace"), file=sys.stderr)
                    sys.exit(f"package smoke test FAILED: no result (worker {status=}): {exc!r}")
            finally:
                worker.terminate()
                worker.wait(30)
        check("a task runs in a celery worker and get() returns its result", value == 5, value)

        shown = run_celery("perkey", "inspect", result.id, "--json", env=env)
        check("celery perkey inspect exits 0", shown.returncode == 0, shown.stderr)
        report = json.loads(shown.stdout)
        check("celery perkey inspect reads SUCCESS", report["state"]["status"] == "SUCCESS", report)
        types = {entry["type"] for entry in report["keys"]}
        check("the result is kept in a list of its own", "list" in types, report["keys"])


def main(lua: list[str]) -> None:
    check("run from a directory with no source tree", not (HERE / "celery_perkey_backend").exists())
    check_installed()
    check_files(lua)
    check_entry_points()
    binary = check_extras()
    check_end_to_end(binary)
    print("package smoke test passed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
