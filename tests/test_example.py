"""``python3 dev.py example``: the demo runs clean, and its last line says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "run.py"


def test_the_example_ends_with_one_unambiguous_line() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[-1] == "example finished: every step gave the expected result"
    # The deliberate failure is reported as expected, and no traceback follows it.
    assert any("fails on purpose" in line and "as expected" in line for line in lines)
    assert "Traceback" not in done.stdout + done.stderr
    # Stopping the server at the end is no outage to warn about (its waits are done).
    assert "lost their connection" not in done.stdout + done.stderr
