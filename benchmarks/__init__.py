"""Benchmarks of the perkey result backend against Celery's own backends.

Run ``python -m benchmarks`` (``--quick`` for a short run, ``--help`` for options). It
starts a private server on a free loopback port, alternates the backends round by
round, and writes ``results.md`` and PNG plots to ``docs/benchmarks/``.

``PERKEY_BENCH_PARSER=python`` in the environment makes every process of a run behave
as if hiredis were not installed (redis-py then parses and packs in pure Python): the
parser figure (:mod:`.parsers`) runs its two sides so. It acts here, in the package's
first import, before anything can import redis.
"""

import os
import sys

if os.environ.get("PERKEY_BENCH_PARSER") == "python":
    sys.modules["hiredis"] = None  # type: ignore[assignment]  # "import hiredis" now fails
