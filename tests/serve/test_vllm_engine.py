"""`nexus serve --engine vllm` without vLLM installed (it needs Linux + CUDA): the command lines built
from our flags, the one-line error when the package is missing, and the whole command end to end with a
stand-in `vllm` package on PYTHONPATH whose `vllm.entrypoints.openai.api_server` takes vLLM's documented
flags (--model, --served-model-name, --host, --port, VLLM_API_KEY) and serves the model with our embedded
engine, so the launch, the health wait, the front and the shutdown are the real ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from flows.cli import main
from nexus_core.errors import NexusError
from nexus_core.serve.vllm import check_vllm, free_port, vllm_argv

REPO = Path(__file__).resolve().parents[2]


def test_vllm_argv_from_our_flags(tmp_path: Path) -> None:
    argv = vllm_argv("/opt/vllm/bin/python", "/models/tiny", "tiny", 8123, max_num_seqs=8, gpu_memory_utilization=0.45,
                     draft_dir="/models/draft", max_model_len=2048, extra_args=["--tensor-parallel-size", "2"])
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model"] == "/models/tiny" and flags["--served-model-name"] == "tiny"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"  # loopback only: the front is the door
    assert flags["--max-num-seqs"] == "8" and flags["--gpu-memory-utilization"] == "0.45"
    assert flags["--dtype"] == "auto" and flags["--max-model-len"] == "2048"
    assert json.loads(flags["--speculative-config"]) == {"model": "/models/draft", "num_speculative_tokens": 4}
    assert argv[-2:] == ["--tensor-parallel-size", "2"] and "--api-key" not in argv  # the key goes by env
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(NexusError, match="peft adapter directory"):
        vllm_argv("python", str(adapter), "lora", 1)


def test_missing_vllm_is_one_error_line(tiny_llm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--engine", "vllm", f"tiny={tiny_llm}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --engine vllm needs the `vllm` package")
    assert "pip install vllm" in err[0]


def test_missing_vllm_in_another_interpreter(tmp_path: Path) -> None:
    other = tmp_path / "python"
    other.symlink_to(sys.executable)  # another path: asked in a subprocess, as for a separate vLLM venv
    with pytest.raises(NexusError, match=f"{other} cannot import"):
        check_vllm(str(other))
    with pytest.raises(NexusError, match="could not be run"):
        check_vllm(str(tmp_path / "no-such-python"))


STAND_IN = textwrap.dedent("""
    # vLLM's server flags in, our embedded engine out (test stand-in for vllm.entrypoints.openai.api_server)
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for flag in ("--model", "--served-model-name", "--host", "--port"):
        p.add_argument(flag, required=True)
    args, rest = p.parse_known_args()
    with open(os.environ["STAND_IN_RECORD"], "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv[1:], "has_key": bool(os.environ.get("VLLM_API_KEY"))}, f)
    from flows.cli import main
    sys.exit(main(["serve", f"{args.served_model_name}={args.model}", "--host", args.host, "--port", args.port,
                   "--api-key-env", "VLLM_API_KEY"]))
""")


@pytest.mark.integration
@pytest.mark.slow  # two fresh interpreters, one of them loads torch
def test_nexus_serve_engine_vllm_end_to_end(tiny_llm: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "stand_in" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(STAND_IN)
    record = tmp_path / "record.json"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stand_in"), str(REPO)]),
           "STAND_IN_RECORD": str(record), "CLIENT_KEYS": "k1", "OMP_NUM_THREADS": "1"}
    front = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--engine", "vllm", f"tiny={tiny_llm}",
                              "--port", str(port), "--api-key-env", "CLIENT_KEYS", "--max-batch-size", "4"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert front.poll() is None, front.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the front did not come up"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        rec = json.loads(record.read_text())
        flags = dict(zip(rec["argv"][::2], rec["argv"][1::2], strict=False))
        assert flags["--served-model-name"] == "tiny" and flags["--max-num-seqs"] == "4"
        assert rec["has_key"] and flags["--port"] != str(port)  # an internal key, a port of its own
        body = {"model": "tiny", "messages": [{"role": "user", "content": "one"}], "max_tokens": 3}
        assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 401
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k1"}
                                           ).json()["data"]] == ["tiny"]
    finally:
        front.send_signal(signal.SIGTERM)
        out = front.communicate(timeout=60)[0]
    assert front.returncode == 0, out[-3000:]
    assert "engine: vllm" in out
    with pytest.raises(ProcessLookupError):  # the engine went with the server
        os.kill(rec["pid"], 0)


def test_serving_beyond_loopback_needs_api_keys(tiny_llm: Path) -> None:
    from nexus_core.serve.launch import ServeConfig, serve_models

    with pytest.raises(NexusError, match="beyond loopback needs API keys"):
        serve_models(ServeConfig(models={"tiny": str(tiny_llm)}, host="0.0.0.0"))
    with pytest.raises(NexusError, match="drafts for \\['other'\\]"):
        serve_models(ServeConfig(models={"tiny": str(tiny_llm)}, drafts={"other": str(tiny_llm)}))
