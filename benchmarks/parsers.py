"""Figure 10: perkey:// with hiredis, and with redis-py's pure-Python parser.

redis-py parses replies and packs commands with hiredis (C) whenever it is installed
(the ``hiredis`` extra), in pure Python otherwise. Each round runs perkey's figures 1-4
and 9 (store, ready read, wake, join, sweep) once per side, in a child process per side,
the sides alternating and their order flipping from round to round:

* ``hiredis``: the child as installed (the run needs hiredis; without it the figure
  says so and runs nothing);
* ``python``: the child with ``PERKEY_BENCH_PARSER=python``, so that it and its helper
  process run as if hiredis were not installed (see :mod:`benchmarks`).

With ``--baseline DIR`` (a directory holding another revision's ``celery_perkey_backend``
package, e.g. from ``git archive``), a third side runs that package's sweep (figure 9
only, with hiredis) in the same rounds: the sweep before and after a change, side by
side, for the sweep rate and for what it costs other clients' latency.

A child is ``python -m benchmarks.parsers``: it runs those figures for one round on the
parent's server, with the parent's sizes, and writes its per-round values as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import ROOT, Budget, Results, Sizes, build_specs
from .context import Bench

#: The two sides, by the name of their rows (``perkey-<side>``).
SIDES = ("hiredis", "python")

#: The figures a child runs, in order.
CHILD_FIGURES = ("store", "read", "wake", "join", "sweep")

#: The child's metrics that this figure reports, under ``parser_<name>``.
REPORTED = (
    "store",
    "read",
    "wake_p50",
    "wake_p99",
    "join_stored",
    "sweep_scan_rate",
    "sweep_probe_p99_idle",
    "sweep_probe_p99_during",
)

#: How long one child may take (a full-size round takes about 40 s on two cores).
CHILD_LIMIT = 900.0


def hiredis_installed() -> bool:
    return importlib.util.find_spec("hiredis") is not None


def run_parsers(bench: Bench) -> None:
    if not hiredis_installed():
        bench.results.unavailable["parser"] = (
            "Not run: hiredis is not installed (the `hiredis` extra; `bench` brings it)."
        )
        return
    if not bench.has("perkey"):
        bench.results.unavailable["parser"] = "Not run: the perkey backend is not selected."
        return
    sides = [*SIDES, "baseline"] if bench.baseline else list(SIDES)
    for number in bench.round_range("parser"):
        for side in sides if number % 2 == 0 else sides[::-1]:
            found = _child(bench, side)
            for metric in REPORTED:
                for value in found["values"].get(metric, []):
                    bench.results.add(f"parser_{metric}", f"perkey-{side}", value)
            for note in found["notes"]:
                bench.results.note(f"parser ({side}): {note}")
            bench.results.meta.setdefault("parsers", {})[side] = found["parser"]


def _child(bench: Bench, side: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PERKEY_BENCH_PARSER"}
    if side == "python":
        env["PERKEY_BENCH_PARSER"] = "python"
    # The baseline's package first: it wins over the one installed from this tree.
    paths = [str(bench.baseline)] if side == "baseline" and bench.baseline else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, str(ROOT), env.get("PYTHONPATH")]))
    figures = ["sweep"] if side == "baseline" else list(CHILD_FIGURES)
    with tempfile.TemporaryDirectory(prefix="perkey-bench-parser-") as tmp:
        out = Path(tmp) / "values.json"
        sizes = json.dumps(dataclasses.asdict(bench.sizes))
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.parsers", "--port", str(bench.port),
             "--sizes", sizes, "--out", str(out), "--figures", ",".join(figures)],
            # Not from ROOT: ``-m`` puts the working directory first on the import path,
            # ahead of PYTHONPATH, and the baseline's package must come first.
            cwd=tmp, env=env, capture_output=True, text=True, timeout=CHILD_LIMIT,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"the {side} side failed: {proc.stderr[-2000:]}")
        found: dict[str, Any] = json.loads(out.read_text())
    wanted = "python" if side == "python" else "hiredis"
    if found["parser"] != wanted:
        raise RuntimeError(f"the {side} side ran with the {found['parser']} parser")
    package = Path(found["package"]).resolve()
    expected = (bench.baseline if side == "baseline" and bench.baseline else ROOT).resolve()
    if expected not in package.parents:
        raise RuntimeError(f"the {side} side ran the package at {package}")
    return found


def _parser_in_use() -> str:
    """Which parser a new redis-py connection of this process gets."""
    import redis.connection

    return "hiredis" if "Hiredis" in redis.connection.DefaultParser.__name__ else "python"


def child_main(argv: Sequence[str] | None = None) -> int:
    """One round of perkey's figures 1-4 and 9 on the parent's server; JSON to ``--out``."""
    from .helper import Helper
    from .runner import FIGURES, warm

    parser = argparse.ArgumentParser(prog="python -m benchmarks.parsers")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sizes", required=True, help="benchmarks.common.Sizes as JSON")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figures", default=",".join(CHILD_FIGURES))
    args = parser.parse_args(argv)
    sizes = Sizes.from_dict(json.loads(args.sizes))
    results = Results()
    with tempfile.TemporaryDirectory(prefix="perkey-bench-child-") as tmp:
        specs = build_specs(args.port, Path(tmp), ["perkey"])
        helper = Helper(specs, args.port)
        bench = Bench(sizes, 1, results, Budget(CHILD_LIMIT), args.port, Path(tmp), specs, helper)
        try:
            warm(bench)
            for figure in args.figures.split(","):
                FIGURES[figure](bench)
                with contextlib.suppress(Exception):
                    bench.client(0).flushdb()
        finally:
            bench.close()
            helper.close()
    import celery_perkey_backend

    values = {metric: results.get(metric, "perkey") for metric in REPORTED}
    found = {
        "parser": _parser_in_use(),
        "package": celery_perkey_backend.__file__,
        "values": values,
        "notes": results.notes,
    }
    args.out.write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
