"""OpenAI-compatible server for local models (``create_app`` in :mod:`nexus_core.serve.app`).

``serve_in_thread`` runs any ASGI app under uvicorn in a background thread, for tests, benchmarks and
steps that need a live endpoint (the teacher stage, the judge) without a separate process.
``server_config`` is the uvicorn configuration ``nexus serve`` uses too: keep-alive connections
close after ``timeout_keep_alive`` idle seconds, and a connection that has not sent a complete
request head within ``header_timeout_s`` (an idle or half-open socket, a slow-header client) is
closed, which plain uvicorn never does.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nexus_core.errors import NexusError


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, *, timeout_keep_alive: int = 5,
                  header_timeout_s: float = 10.0, limit_concurrency: int | None = 1024, log_level: str = "info",
                  access_log: bool = True) -> Any:
    """A ``uvicorn.Config`` for ``app`` with the connection limits described above.

    ``limit_concurrency``: more open connections than this are answered 503 at once.
    """
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=_header_timeout_protocol(header_timeout_s),
                          timeout_keep_alive=timeout_keep_alive, limit_concurrency=limit_concurrency,
                          log_level=log_level, access_log=access_log, lifespan="on", timeout_graceful_shutdown=2)


def _header_timeout_protocol(timeout_s: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        """uvicorn's h11 protocol, closing connections that hold no complete request head for too long."""

        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timeout()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timeout()

        def _arm_header_timeout(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            # Still waiting for (the rest of) a request line and headers: nothing to answer, close.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.close()

    return HeaderTimeoutH11Protocol


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, startup_timeout_s: float = 30.0,
                    **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yield its base URL ending in ``/v1``.

    ``port=0`` picks a free port: the socket is bound here, before uvicorn starts, so the URL is known
    and no other process can take the port in between. ``config`` goes to :func:`server_config`.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, host, bound_port, **{"log_level": "warning", "access_log": False,
                                                                     **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nexus-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise NexusError(f"server on {host}:{bound_port} did not start within {startup_timeout_s:.0f}s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{bound_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
