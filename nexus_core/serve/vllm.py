"""vLLM as the engine behind ``nexus serve --engine vllm``: its server as a child process per model.

vLLM serves one model per process, so each served name gets ``python -m
vllm.entrypoints.openai.api_server`` on a loopback port of its own (the GPU memory share split between
them), started with :func:`nexus_core.serve.proxy.start_upstream` and put behind the front of
:mod:`nexus_core.serve.proxy`, which keeps our auth and limits. The children listen on 127.0.0.1 only
and require an internal API key (``VLLM_API_KEY`` in their environment, so it never shows in ``ps``)
that only the front holds.

``python`` may be another interpreter than ours: vLLM pins its own torch, so an image can keep it in
a virtual environment of its own (``NEXUS_VLLM_PYTHON``; the GPU image does).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from nexus_core.errors import NexusError
from nexus_core.serve.proxy import Upstream, start_upstream

INSTALL_HINT = ("install it with `pip install vllm` (Linux with a CUDA GPU; the GPU image infra/docker/Dockerfile.gpu "
                "has it in /opt/vllm), or point --vllm-python / NEXUS_VLLM_PYTHON at an interpreter that has it")


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter that runs vLLM: ``explicit``, else ``NEXUS_VLLM_PYTHON``, else this one."""
    return explicit or os.environ.get("NEXUS_VLLM_PYTHON") or sys.executable


def check_vllm(python: str) -> None:
    """Raise one clear :class:`NexusError` when ``vllm`` cannot be imported by ``python``."""
    if python == sys.executable:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return
    else:
        try:
            found = subprocess.run([python, "-c", "import importlib.util, sys; "
                                                  "sys.exit(importlib.util.find_spec('vllm') is None)"],
                                   capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NexusError(f"--engine vllm: interpreter {python} could not be run ({exc}); {INSTALL_HINT}") from None
        if found:
            return
    raise NexusError(f"--engine vllm needs the `vllm` package, which {python} cannot import; {INSTALL_HINT}")


def vllm_argv(python: str, model_dir: str, served_name: str, port: int, *, max_num_seqs: int = 16,
              dtype: str = "auto", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
              draft_dir: str | None = None, num_speculative_tokens: int = 4,
              extra_args: list[str] | None = None) -> list[str]:
    """The command line of one vLLM OpenAI server for ``model_dir`` answering as ``served_name``."""
    path = Path(model_dir)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise NexusError(f"{model_dir}: a peft adapter directory; --engine vllm serves full models "
                         f"(merge the adapter into its base first, or use --engine embedded)")
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--dtype", dtype,
            "--gpu-memory-utilization", f"{gpu_memory_utilization:.3g}"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if draft_dir:
        argv += ["--speculative-config", json.dumps({"model": str(draft_dir),
                                                     "num_speculative_tokens": num_speculative_tokens})]
    return argv + list(extra_args or [])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_vllm(models: dict[str, str], *, drafts: dict[str, str] | None = None, python: str | None = None,
               max_num_seqs: int = 16, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
               max_model_len: int | None = None, extra_args: list[str] | None = None,
               startup_timeout_s: float = 900.0, log_dir: Path | None = None) -> tuple[list[Upstream], str]:
    """One vLLM server per served model, each healthy before the next starts; returns them and the
    internal API key they require. Any failure stops the ones already started and raises."""
    py = vllm_python(python)
    check_vllm(py)
    key = secrets.token_urlsafe(32)
    env = {**os.environ, "VLLM_API_KEY": key}
    share = gpu_memory_utilization / max(1, len(models))
    started: list[Upstream] = []
    try:
        for name, path in models.items():
            port = free_port()
            argv = vllm_argv(py, path, name, port, max_num_seqs=max_num_seqs, dtype=dtype,
                             gpu_memory_utilization=share, max_model_len=max_model_len,
                             draft_dir=(drafts or {}).get(name), extra_args=extra_args)
            log = log_dir / f"vllm-{name.replace('/', '_')}.log" if log_dir else None
            print(f"starting vLLM for {name} on 127.0.0.1:{port}" + (f" (log: {log})" if log else ""), flush=True)
            started.append(start_upstream(name, argv, f"http://127.0.0.1:{port}/v1", env=env,
                                          startup_timeout_s=startup_timeout_s, log_path=log))
    except BaseException:
        for up in started:
            up.stop()
        raise
    return started, key
