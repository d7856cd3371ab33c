"""OpenAI-compatible server for local models (``create_app`` in :mod:`nexus_core.serve.app`).

``serve_in_thread`` runs any ASGI app under uvicorn in a background thread, for tests, benchmarks and
steps that need a live endpoint (the teacher stage, the judge) without a separate process.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nexus_core.errors import NexusError


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, startup_timeout_s: float = 30.0
                    ) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yield its base URL ending in ``/v1``.

    ``port=0`` picks a free port: the socket is bound here, before uvicorn starts, so the URL is known
    and no other process can take the port in between.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
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
