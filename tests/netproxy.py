"""A small TCP proxy of the tests' own, between a client and a real server.

It can terminate TLS (so a plain server is reached over a real TLS connection), and
inject real faults: cut every connection, delay traffic, blackhole it, or drop replies
(the server acted, the client never hears).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable

from celery_perkey_backend.testing import free_port


class Proxy:
    """Forward 127.0.0.1:``port`` to ``upstream_port``, optionally behind TLS."""

    def __init__(self, upstream_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.upstream_port = upstream_port
        self.tls = tls
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Seconds each chunk waits before it is forwarded.
        self.delay = 0.0
        #: Forward nothing, either way, but keep the connections open.
        self.blackholed = False
        #: Drop this many replies (server-to-client chunks), then forward again.
        self.drop_replies = 0
        #: Drop the next reply (server-to-client chunk) that this says yes to, then
        #: forward again: a lost reply to one command chosen by what it answers.
        self.drop_reply_if: Callable[[bytes], bool] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()
        self._pump(client, upstream, False)

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if self.blackholed:
                    continue
                if replies and self.drop_replies > 0:
                    self.drop_replies -= 1
                    continue
                if replies and self._drop_chosen(data):
                    continue
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def _drop_chosen(self, data: bytes) -> bool:
        with self._lock:
            chosen = self.drop_reply_if
            if chosen is None or not chosen(data):
                return False
            self.drop_reply_if = None
            return True

    def cut(self) -> None:
        """Close every connection now; new ones are still accepted."""
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
