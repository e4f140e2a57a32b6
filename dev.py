#!/usr/bin/env python3
"""The project's two commands, runnable with nothing but Python 3.10+.

    python3 dev.py test       # lint, type-check and run the test suite with coverage
    python3 dev.py example    # run the example app on a private server with a real worker
    python3 dev.py lint       # ruff and mypy only

Each creates ``.venv`` on first use and installs what it needs there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def run(*args: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def ensure_env(extra: str) -> Path:
    python = BIN / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-e",
        f".[{extra}]",
    )
    return python


def lint(python: Path) -> None:
    run(python, "-m", "ruff", "check", ".")
    run(python, "-m", "ruff", "format", "--check", ".")
    run(python, "-m", "mypy")


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - run by whatever python3 is there
        sys.exit("Python 3.10 or newer is needed")
    command = argv[0] if argv else "test"
    rest = argv[1:]
    if command == "test":
        python = ensure_env("dev")
        lint(python)
        run(python, "-m", "pytest", "--cov", "--cov-report=term", "-m", "not slow", *rest)
    elif command == "lint":
        lint(ensure_env("dev"))
    elif command == "example":
        python = ensure_env("example")
        run(python, ROOT / "examples" / "run.py", *rest)
    else:
        sys.exit(f"unknown command {command!r}; use test, lint or example")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
