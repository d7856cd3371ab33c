"""A real ``prefect server start`` for integration tests: loopback, a free port, its own PREFECT_HOME and
log file, stopped (its whole process group) when the block ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its Prefect/MLflow settings (the test session's own temporary
    API must not leak into a subprocess), with ``NEXUS_HOME`` at ``home`` and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(NEXUS_HOME=str(home), PREFECT_HOME=str(home / "prefect"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", LITELLM_LOCAL_MODEL_COST_MAP="True")
    env.update(extra)
    return env


@dataclass
class PrefectServer:
    """A running server: ``api_url``, ``env`` for CLI subprocesses that talk to it, and its ``log``."""

    api_url: str
    env: dict[str, str]
    log: Path

    def log_text(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """TERM the server's process group (uvicorn and the services run in children), KILL after 15 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextmanager
def prefect_server(home: Path, *, startup_timeout: float = 180, **settings: str) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on 127.0.0.1 with PREFECT_HOME under ``home`` (a fresh SQLite
    database) and ``settings`` (``PREFECT_...`` variables) in its environment; wait for ``/api/health``."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # no UI: building its static files is startup time this server never uses
    env = clean_env(home, PREFECT_SERVER_UI_ENABLED="false", **settings)
    log = home / "prefect-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = PrefectServer(api_url, {**clean_env(home), "PREFECT_API_URL": api_url}, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(f"{api_url}/health"):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{server.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server not healthy after {startup_timeout:.0f} s:\n"
                                   f"{server.log_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)
