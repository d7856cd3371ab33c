"""Run a server until it is stopped: what ``nexus serve`` and the ``serve`` flow (deployments) both call.

``ServeConfig`` holds what to serve (served name → a model directory, artifact spec or registry entry
such as ``models:/nexus-tiny-release@champion``), the engine (``embedded``: this process decodes;
``vllm``: vLLM servers as child processes behind :mod:`nexus_core.serve.proxy`), and the limits.
:func:`serve_models` resolves the models, starts the engine(s) and serves on ``host:port`` until
SIGTERM or Ctrl-C; vLLM children are stopped on the way out.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.config import NexusModel
from nexus_core.errors import NexusError


class ServeConfig(NexusModel):
    """What to serve, with which engine, and the server's limits."""

    models: dict[str, str] = Field(min_length=1, description="Served name → model: a directory, an artifact spec "
                                   "(NAME@vN) or a registry entry (models:/NAME@ALIAS)")
    drafts: dict[str, str] = Field(default_factory=dict, description="Served name → a smaller draft model with the "
                                   "same tokenizer, for speculative decoding")
    engine: Literal["embedded", "vllm"] = Field(default="embedded", description="embedded: this process decodes; "
                                                "vllm: vLLM servers as child processes behind this one")
    host: str = Field(default="127.0.0.1", description="Interface to bind; any other than loopback needs api_key_env")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the accepted API "
                                    "key(s), comma-separated (only their sha256 digests are kept)")
    max_batch_size: int = Field(default=16, ge=1, description="Most rows decoded together (vLLM: --max-num-seqs)")
    max_body_mb: float = Field(default=8.0, gt=0, description="Larger request bodies get 413")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Seconds a generation may take (504)")
    max_queue: int = Field(default=256, ge=0, description="Requests waiting for a batch slot before 429")
    max_request_rows: int = Field(default=256, ge=1, description="Most prompts × n in one request (400)")
    timeout_keep_alive: int = Field(default=5, ge=1, description="Idle keep-alive connections close after (s)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="Connections without a complete request head "
                                    "after this many seconds are closed")
    limit_concurrency: int = Field(default=1024, ge=1, description="Open connections beyond this get 503")
    vllm_python: str | None = Field(default=None, description="vllm: interpreter with vllm installed (default: "
                                    "$NEXUS_VLLM_PYTHON, else this one)")
    vllm_args: list[str] = Field(default_factory=list, description="vllm: extra server arguments, e.g. "
                                 "'--tensor-parallel-size 2'")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vllm: GPU memory share for all "
                                          "served models together")
    engine_startup_timeout_s: float = Field(default=900.0, gt=0, description="vllm: seconds each engine may take "
                                            "to answer /health")
    image_models: dict[str, str] = Field(default_factory=dict, description="Served name → an image_gen projector "
                                         "artifact (directory, NAME@vN or store URI) for /v1/images/generations "
                                         "(embedded only)")
    tts: dict[str, str] = Field(default_factory=dict, max_length=1, description="Served name → a VITS text-to-speech "
                                "model (directory or hub id) for /v1/audio/speech and chat audio out (embedded only)")
    tts_voices: dict[str, int | None] | None = Field(default=None, description="Voice name → speaker id of the tts "
                                                     "model (null: OpenAI's voice names in speaker order)")
    media_root: str | None = Field(default=None, description="image_url parts may name files (file:// URLs or "
                                   "absolute paths) under this directory (embedded only)")
    allow_image_urls: bool = Field(default=False, description="Fetch http(s) image_url parts (public addresses only "
                                   "unless allow_private_image_urls; embedded only)")
    allow_private_image_urls: bool = Field(default=False, description="Also fetch image URLs on loopback, private "
                                           "and link-local addresses (SSRF risk: trusted clients only)")
    max_image_mb: float = Field(default=8.0, gt=0, description="Larger image files or fetched images get 400")
    image_url_timeout_s: float = Field(default=10.0, gt=0, description="Seconds an image URL may take to fetch")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_models(cfg: ServeConfig) -> None:
    """Serve ``cfg`` until SIGTERM or Ctrl-C (see the module docstring)."""
    import shlex

    import uvicorn

    from nexus_core.models.io import resolve_model
    from nexus_core.serve import server_config
    from nexus_core.serve.app import hash_api_key

    if cfg.engine == "vllm":  # before any model is resolved or downloaded
        from nexus_core.serve.vllm import check_vllm, vllm_python

        if cfg.tts:
            raise NexusError("tts: speech out is served by the embedded engine only (not --engine vllm)")
        if cfg.image_models:
            raise NexusError("image_models: images are rendered by the embedded engine only (not --engine vllm)")
        if cfg.media_root or cfg.allow_image_urls:
            raise NexusError("media_root / allow_image_urls: image files and URLs are read by the embedded engine "
                             "only (not --engine vllm)")

        check_vllm(vllm_python(cfg.vllm_python))
    hashes = None
    if cfg.api_key_env:
        keys = [k for k in os.environ.get(cfg.api_key_env, "").split(",") if k]
        if not keys:
            raise NexusError(f"api_key_env {cfg.api_key_env}: variable is unset or empty")
        hashes = [hash_api_key(k) for k in keys]  # only hashes are kept in memory
    elif not _is_loopback(cfg.host):
        raise NexusError(f"host {cfg.host}: serving beyond loopback needs API keys (api_key_env / --api-key-env)")

    def resolve(where: str) -> str:
        return where if Path(where).exists() else str(resolve_model(where).path)

    models = {name: resolve(where) for name, where in cfg.models.items()}
    unknown = sorted(set(cfg.drafts) - set(models))
    if unknown:
        raise NexusError(f"drafts for {unknown}: not served models ({sorted(models)})")
    drafts = {name: resolve(where) for name, where in cfg.drafts.items()}
    tts = {name: resolve(where) for name, where in cfg.tts.items()}
    limits = {"max_body_bytes": int(cfg.max_body_mb * 2**20), "request_timeout_s": cfg.request_timeout_s,
              "max_queue": cfg.max_queue, "max_request_rows": cfg.max_request_rows}
    upstreams: list = []
    previous = None
    if cfg.engine == "vllm" and threading.current_thread() is threading.main_thread():
        def _exit(signum: int, frame: object) -> None:
            raise SystemExit(0)

        # SIGTERM (and uvicorn, which re-raises it after its own shutdown) must unwind through the
        # `finally` below, or the engine processes outlive us.
        previous = signal.signal(signal.SIGTERM, _exit)
    try:
        if cfg.engine == "vllm":
            from nexus_core.serve.proxy import create_proxy_app
            from nexus_core.serve.vllm import start_vllm

            upstreams, key = start_vllm(models, drafts=drafts, python=cfg.vllm_python,
                                        max_num_seqs=cfg.max_batch_size,
                                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                                        extra_args=[a for x in cfg.vllm_args for a in shlex.split(x)],
                                        startup_timeout_s=cfg.engine_startup_timeout_s)
            app = create_proxy_app(upstreams, api_key_hashes=hashes, upstream_api_key=key,
                                   max_in_flight=cfg.max_batch_size, **limits)
        else:
            from nexus_core.serve.app import create_app

            app = create_app(models, api_key_hashes=hashes, max_batch_size=cfg.max_batch_size, draft_models=drafts,
                             image_models=cfg.image_models,
                             tts=tts, tts_voices=cfg.tts_voices, media_root=cfg.media_root,
                             allow_image_urls=cfg.allow_image_urls,
                             allow_private_image_urls=cfg.allow_private_image_urls,
                             max_image_bytes=int(cfg.max_image_mb * 2**20),
                             image_url_timeout_s=cfg.image_url_timeout_s, **limits)
        print(f"serving {', '.join(models)} on http://{cfg.host}:{cfg.port}/v1 (engine: {cfg.engine})", flush=True)
        uvicorn.Server(server_config(app, cfg.host, cfg.port, timeout_keep_alive=cfg.timeout_keep_alive,
                                     header_timeout_s=cfg.header_timeout_s,
                                     limit_concurrency=cfg.limit_concurrency)).run()
    finally:
        for up in upstreams:
            up.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
