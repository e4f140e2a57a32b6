"""The benchmark harness runs end to end at tiny sizes and writes its table."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runner import FIGURES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_quick_benchmark_run_writes_the_table(tmp_path: Path) -> None:
    # rpc:// is left out so that the test never depends on (or talks to) a RabbitMQ;
    # db+sqlite:// and the plots are skipped by the harness itself when SQLAlchemy or
    # matplotlib (the `bench` extra) are missing.
    backends = "perkey,perkey-once,redis,sqlite,raw"
    # Figures 10 and 11 have smoke tests of their own (below).
    figures = ",".join(name for name in FIGURES if name not in ("parser", "many"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--figures", figures,
         "--backends", backends, "--max-minutes", "3", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| perkey:// |" in table
    assert "| redis:// |" in table
    assert "## Targets" in table
    assert " failed: " not in table, table


@pytest.mark.timeout(120)
def test_quick_parser_run_compares_hiredis_with_the_python_parser(tmp_path: Path) -> None:
    # Figure 10 needs hiredis (the `hiredis` extra): with it, both sides and their ratios;
    # without it, a line that says so. `dev.py matrix` runs this with hiredis installed.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--figures", "parser",
         "--backends", "perkey", "--no-plots", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    section = table.split("## 10.", 1)[1].split("## Targets", 1)[0]
    if importlib.util.find_spec("hiredis") is None:
        assert "Not run: hiredis is not installed" in section
        return
    assert "| perkey:// with hiredis |" in section
    assert "| perkey:// pure-Python parser |" in section
    assert "| against the pure-Python parser |" in section
    assert " failed: " not in table, table


@pytest.mark.timeout(120)
def test_quick_cluster_run_writes_the_cluster_rows(tmp_path: Path) -> None:
    # A local 3+3 Valkey Cluster and one Valkey server, both started by the harness on
    # 127.0.0.1; only cluster.md is written, never results.md.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--server", "cluster", "--quick", "--rounds", "1",
         "--max-minutes", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "results.md").exists()
    table = (tmp_path / "cluster.md").read_text(encoding="utf-8")
    for row in ("| perkey:// | cluster |", "| perkey:// read-once | cluster |",
                "| perkey:// | single |"):  # fmt: skip
        assert table.count(row) == 3, row  # store and read, wake, join
    assert table.count("| raw redis-py (floor) | cluster |") == 2  # the floor has no join
    assert "## Cluster / single" in table
    assert "| wake p50 | " in table
    assert "redis:// not run" in table
    assert " failed " not in table, table


@pytest.mark.timeout(180)
def test_quick_benchmark_run_of_figure_11_many_waiters(tmp_path: Path) -> None:
    # Every way of waiting once, at 100 waits each (the thread and per-connection rows
    # included), and figure 3's multiplexed rows that two of issue 11's targets use.
    sizes = ["many_waiters=100", "many_threads=100", "many_per_connection=100"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--figures", "wake,many",
         "--backends", "perkey,redis,raw", "--no-plots", "--out", str(tmp_path),
         *(arg for size in sizes for arg in ("--size", size))],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert " failed: " not in table, table
    section = table.split("## 11.", 1)[1].split("## Targets", 1)[0]
    rows = [line for line in section.splitlines() if line.endswith("|") and ", 100 waits |" in line]
    assert len(rows) == 7, section
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == "0", row  # no wait failed
    wake = table.split("## 3.", 1)[1].split("## 4.", 1)[0]
    assert "| perkey:// get(), multiplexed |" in wake
    assert "| perkey:// aio.wait() |" in wake
    targets = table.split("## Targets", 1)[1].splitlines()
    for target in ("one aio.wait()'s wake p50", "one multiplexed get()'s wake p50"):
        (line,) = [line for line in targets if target in line]
        assert "not measured" not in line, line
    (line,) = [line for line in targets if "10,000 asyncio waits on ≤ 8 server" in line]
    held = re.search(r"\| (\d+) connections for 100 waits, 0 failed", line)
    assert held is not None and int(held.group(1)) <= 8, line
