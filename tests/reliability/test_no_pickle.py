"""Model loading never unpickles: INT8 artifacts are safetensors, ``.bin`` weights load only as plain
weights, and a crafted pickle in a model directory runs nothing (load_causal_lm, serve's Engine, the
``nexus serve`` CLI) but gives one clear InputError."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from nexus_core.compress.common import shipped_bytes
from nexus_core.errors import InputError
from nexus_core.models.compressed import (
    LEGACY_QUANT_WEIGHTS,
    QUANT_DIR,
    QUANT_META,
    QUANT_WEIGHTS,
    linear_names,
    load_compressed,
    quantize_dynamic_int8,
    quantize_static_int8,
    save_int8_model,
)
from nexus_core.models.io import load_causal_lm
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

TEXTS = [f"sample {i}: the cat sat on the mat while a dog ran in the park" for i in range(8)]


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def _evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": _Payload(marker)}, path)  # a real torch zip checkpoint carrying the payload
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("nopickle") / "model", TEXTS,
                          TinyLLMConfig(vocab_size=300, num_hidden_layers=2))


def _quantized(tiny: Path, out: Path, method: str) -> tuple[Any, Any, Path]:
    model, tok = load_causal_lm(tiny, int8=False)
    names = linear_names(model)
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]

    def calibrate(m: Any) -> None:
        with torch.no_grad():
            for t in TEXTS:
                m(input_ids=tok(t, return_tensors="pt")["input_ids"])

    work = copy.deepcopy(model)
    qmodel = (quantize_static_int8(work, names, calibrate) if method == "int8_static"
              else quantize_dynamic_int8(work, names))
    save_int8_model(qmodel, model, tok, out, method, names, {})
    return qmodel, ids, out


def test_payload_is_live_when_unpickled(tmp_path: Path) -> None:
    """The crafted file really runs code under a plain unpickle (so the tests below mean something)."""
    marker = tmp_path / "ran"
    path = _evil(tmp_path / "x.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_static"])
def test_int8_reload_from_safetensors_equals_in_memory_model(tiny: Path, tmp_path: Path, method: str) -> None:
    qmodel, ids, out = _quantized(tiny, tmp_path / method, method)
    assert (out / QUANT_DIR / QUANT_WEIGHTS).is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))
    assert json.loads((out / QUANT_DIR / QUANT_META).read_text())["format"].startswith("nexus-int8-safetensors")
    loaded, _ = load_causal_lm(out)
    assert any(".quantized" in type(m).__module__ for m in loaded.modules())
    with torch.no_grad():
        want, got = qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    # no fp32 copy: the only weights are quantized/model_int8.safetensors; every file shipped is smaller
    assert not list(out.glob("*.safetensors"))
    assert (out / QUANT_DIR / QUANT_WEIGHTS).stat().st_size < shipped_bytes(out) < shipped_bytes(tiny)


def _int8_dir_with_old_pickle(tiny: Path, tmp_path: Path, marker: Path) -> Path:
    """An INT8 artifact as older versions wrote it (quantized/model_int8.pt), the .pt replaced by a payload."""
    out = tmp_path / "old_int8"
    shutil.copytree(tiny, out)
    _evil(out / QUANT_DIR / LEGACY_QUANT_WEIGHTS, marker)
    (out / QUANT_DIR / QUANT_META).write_text(json.dumps({"method": "int8_dynamic", "modules": []}))
    return out


def _bin_only_dir(tiny: Path, tmp_path: Path, marker: Path) -> Path:
    out = tmp_path / "bin_model"
    shutil.copytree(tiny, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    _evil(out / "pytorch_model.bin", marker)
    return out


@pytest.mark.parametrize("layout", ["old_int8_pt", "pytorch_model_bin"])
def test_crafted_pickle_runs_nothing_in_load_causal_lm(tiny: Path, tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "ran"
    path = (_int8_dir_with_old_pickle if layout == "old_int8_pt" else _bin_only_dir)(tiny, tmp_path, marker)
    with pytest.raises(InputError) as err:
        load_causal_lm(path)
    assert not marker.exists()
    msg = str(err.value)
    assert str(path) in msg
    assert ("re-run the quantize step" in msg) if layout == "old_int8_pt" else ("pytorch_model.bin" in msg)


def test_old_int8_artifact_refused_by_load_compressed(tiny: Path, tmp_path: Path) -> None:
    """The benchmark's loader refuses it too, before reading anything."""
    marker = tmp_path / "ran"
    path = _int8_dir_with_old_pickle(tiny, tmp_path, marker)
    with pytest.raises(InputError, match="old pickle format"):
        load_compressed(path)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["old_int8_pt", "pytorch_model_bin"])
def test_crafted_pickle_runs_nothing_in_serve(tiny: Path, tmp_path: Path, layout: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from nexus_core.serve.engine import Engine

    marker = tmp_path / "ran"
    path = (_int8_dir_with_old_pickle if layout == "old_int8_pt" else _bin_only_dir)(tiny, tmp_path, marker)
    with pytest.raises(InputError):
        Engine("evil", path)
    assert main(["serve", f"evil={path}", "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err
    assert not marker.exists()


def test_bin_weights_that_are_plain_tensors_still_load(tiny: Path, tmp_path: Path) -> None:
    """A .bin-only model directory of plain tensors loads (weights_only=True accepts it)."""
    from safetensors.torch import load_file

    out = tmp_path / "bin_ok"
    shutil.copytree(tiny, out)
    state: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, out / "pytorch_model.bin")
    model, _ = load_causal_lm(out)
    ref, _ = load_causal_lm(tiny)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
