"""INT8 variants of HF causal LMs on CPU (torch.ao eager quantization) and the loader that rebuilds them.

A quantized artifact is still an HF directory: the root holds fp32 weights *rounded through int8*
(so ``from_pretrained(uri)`` works everywhere and shows the quantization error), and ``quantized/``
holds the real int8 runtime: ``model_int8.pt`` (state dict with packed int8 weights) and
``quantization.json`` (method and module names). :func:`load_compressed` returns the int8 model when
``quantized/`` exists, the plain model otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANT_DIR = "quantized"
QUANT_META = "quantization.json"
QUANT_WEIGHTS = "model_int8.pt"


def linear_names(model: Any) -> list[str]:
    """Names of the decoder-block Linears (embeddings and the tied LM head stay in float)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def _set_module(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _engine() -> str:
    import torch

    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else "qnnpack")
    torch.backends.quantized.engine = engine
    return engine


def quantize_dynamic_int8(model: Any, modules: list[str]) -> Any:
    """Dynamic INT8 (weights int8, activations quantized on the fly) of the named Linears, in place."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    _engine()
    return quantize_dynamic(model, qconfig_spec={n: default_dynamic_qconfig for n in modules},
                            dtype=torch.qint8, inplace=True)


class StaticQuantLinear:
    """Factory for ``QuantStub → Linear → DeQuantStub``: eager static quantization of one Linear."""

    @staticmethod
    def wrap(linear: Any) -> Any:
        """Wrap a Linear; after ``prepare``/``convert`` it runs as a quantized int8 Linear."""
        import torch
        from torch.ao.quantization import DeQuantStub, QuantStub

        class _Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.quant, self.linear, self.dequant = QuantStub(), linear, DeQuantStub()

            def forward(self, x: Any) -> Any:
                return self.dequant(self.linear(self.quant(x)))

        return _Wrapped()


def quantize_static_int8(model: Any, modules: list[str], calibrate: Any = None) -> Any:
    """Static INT8 of the named Linears: observers see ``calibrate(model)`` runs, then fixed scales.

    ``calibrate=None`` only rebuilds the structure (used when loading saved int8 weights).
    """
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    engine = _engine()
    qconfig = get_default_qconfig(engine)
    for name in modules:
        wrapped = StaticQuantLinear.wrap(model.get_submodule(name))
        wrapped.qconfig = qconfig
        _set_module(model, name, wrapped)
    prepare(model, inplace=True)
    if calibrate is not None:
        calibrate(model)
        convert(model, inplace=True)
        return model
    import warnings

    with warnings.catch_warnings():  # uncalibrated observers: the saved scales are loaded right after
        warnings.filterwarnings("ignore", message="must run observer")
        convert(model, inplace=True)
    return model


def dequantized_state(qmodel: Any, fp_model: Any, modules: list[str], method: str) -> Any:
    """Copy int8-rounded weights back into ``fp_model`` (for the from_pretrained-loadable root weights)."""
    import torch

    with torch.no_grad():
        for name in modules:
            q = qmodel.get_submodule(name)
            qlin = q.linear if method == "int8_static" else q
            fp_model.get_submodule(name).weight.copy_(qlin.weight().dequantize())
    return fp_model


def save_quantized(qmodel: Any, out: str | Path, method: str, modules: list[str], extra: dict[str, Any]) -> Path:
    """Write ``quantized/model_int8.pt`` + ``quantized/quantization.json``; return the weights path."""
    import torch

    qdir = Path(out) / QUANT_DIR
    qdir.mkdir(parents=True, exist_ok=True)
    path = qdir / QUANT_WEIGHTS
    torch.save(qmodel.state_dict(), path)
    (qdir / QUANT_META).write_text(json.dumps({"method": method, "modules": modules, **extra}, indent=2))
    return path


def load_compressed(path: str | Path, dtype: str = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, quantization meta or {})``: the int8 runtime when ``quantized/`` exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype))
    model.eval()
    meta_file = p / QUANT_DIR / QUANT_META
    if not meta_file.is_file():
        return model, tokenizer, {}
    meta = json.loads(meta_file.read_text())
    if meta["method"] == "int8_static":
        quantize_static_int8(model, meta["modules"])
    else:
        quantize_dynamic_int8(model, meta["modules"])
    # Packed int8 params are not plain tensors; this file is our own artifact, written by save_quantized.
    state = torch.load(p / QUANT_DIR / QUANT_WEIGHTS, weights_only=False)
    model.load_state_dict(state)
    model.eval()
    return model, tokenizer, meta
