"""Benchmarks of the perkey result backend against Celery's own backends.

Run ``python -m benchmarks`` (``--quick`` for a short run, ``--help`` for options). It
starts a private server on a free loopback port, alternates the backends round by
round, and writes ``results.md`` and PNG plots to ``docs/benchmarks/``.
"""
