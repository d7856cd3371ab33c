"""INT8 variants of HF causal LMs on CPU (torch.ao eager quantization) and the loader that rebuilds them.

A quantized artifact is still an HF directory: the root holds fp32 weights *rounded through int8*
(so ``from_pretrained(uri)`` works everywhere and shows the quantization error), and ``quantized/``
holds the real int8 runtime: ``model_int8.safetensors`` (plain tensors: each quantized Linear's int8
weight, scale(s), zero point(s) and bias, plus the static input/output qparams) and ``quantization.json``
(method, module names, format). :func:`load_compressed` returns the int8 model when ``quantized/``
exists, the plain model otherwise. Nothing here unpickles: the int8 modules are rebuilt by quantizing
the fp skeleton the same way and copying the stored values in. The old pickled ``model_int8.pt`` is
refused with a request to re-run the quantize step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nexus_core.store import as_local

QUANT_DIR = "quantized"
QUANT_META = "quantization.json"
QUANT_WEIGHTS = "model_int8.safetensors"
QUANT_FORMAT = "nexus-int8-safetensors/1"
LEGACY_QUANT_WEIGHTS = "model_int8.pt"  # pickled state dict of older versions: refused, never loaded


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


def _qlinear(model: Any, name: str, method: str) -> Any:
    """The torch quantized Linear of module ``name`` (inside the static wrapper for int8_static)."""
    mod = model.get_submodule(name)
    return mod.linear if method == "int8_static" else mod


def quantized_tensors(qmodel: Any, method: str, modules: list[str]) -> dict[str, Any]:
    """Plain tensors that fully describe the int8 modules: ``{name}.weight_int8`` (int8),
    ``.weight_scale`` (float64), ``.weight_zero_point`` (int64), ``.weight_axis`` (per-channel only),
    ``.bias``; static adds ``.output_scale``/``.output_zero_point`` and the input stub's
    ``.input_scale``/``.input_zero_point``."""
    import torch

    out: dict[str, Any] = {}
    for name in modules:
        qlin = _qlinear(qmodel, name, method)
        w = qlin.weight()
        out[f"{name}.weight_int8"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{name}.weight_scale"] = w.q_per_channel_scales().to(torch.float64).contiguous()
            out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64).contiguous()
            out[f"{name}.weight_axis"] = torch.tensor([w.q_per_channel_axis()], dtype=torch.int64)
        else:
            out[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
            out[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        bias = qlin.bias()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().clone().contiguous()
        if method == "int8_static":
            stub = qmodel.get_submodule(name).quant
            out[f"{name}.output_scale"] = torch.tensor([float(qlin.scale)], dtype=torch.float64)
            out[f"{name}.output_zero_point"] = torch.tensor([int(qlin.zero_point)], dtype=torch.int64)
            out[f"{name}.input_scale"] = stub.scale.detach().clone().reshape(-1)
            out[f"{name}.input_zero_point"] = stub.zero_point.detach().clone().reshape(-1)
    return out


def save_quantized(qmodel: Any, out: str | Path, method: str, modules: list[str], extra: dict[str, Any]) -> Path:
    """Write ``quantized/model_int8.safetensors`` + ``quantized/quantization.json``; return the weights path."""
    from safetensors.torch import save_file

    qdir = Path(out) / QUANT_DIR
    qdir.mkdir(parents=True, exist_ok=True)
    path = qdir / QUANT_WEIGHTS
    save_file(quantized_tensors(qmodel, method, modules), str(path), metadata={"format": QUANT_FORMAT})
    (qdir / QUANT_META).write_text(json.dumps({"method": method, "modules": modules, "format": QUANT_FORMAT,
                                               "weights": QUANT_WEIGHTS, **extra}, indent=2))
    return path


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def int8_runtime_bytes(path: str | Path) -> int:
    """Bytes the INT8 runtime needs: ``quantized/model_int8.safetensors`` plus the root tensors of every
    module that stays in float (embeddings, norms, LM head); the fp32 copies of the quantized Linears
    at the root are not counted. Reads safetensors headers only."""
    from safetensors import safe_open

    p = as_local(path)
    meta = json.loads((p / QUANT_DIR / QUANT_META).read_text())
    quantized = set(meta["modules"])
    total = (p / QUANT_DIR / QUANT_WEIGHTS).stat().st_size
    for file in sorted(p.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.rpartition(".")[0] in quantized:
                    continue
                sl = f.get_slice(key)
                numel = 1
                for dim in sl.get_shape():
                    numel *= dim
                total += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


def _read_meta(p: Path) -> dict[str, Any] | None:
    """``quantization.json`` of an INT8 artifact (None when there is no ``quantized/``), checked."""
    from nexus_core.errors import InputError

    qdir = p / QUANT_DIR
    meta_file = qdir / QUANT_META
    weights = qdir / QUANT_WEIGHTS
    if not qdir.is_dir():
        return None
    if (qdir / LEGACY_QUANT_WEIGHTS).exists() and not weights.is_file():
        raise InputError(f"{qdir / LEGACY_QUANT_WEIGHTS}: INT8 artifact in the old pickle format, which Nexus no "
                         f"longer loads (unpickling can run code); re-run the quantize step on the source model "
                         f"to write {QUANT_DIR}/{QUANT_WEIGHTS}")
    if not meta_file.is_file():
        raise InputError(f"{qdir}: INT8 artifact without {QUANT_META}; re-run the quantize step")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta_file}: unreadable quantization meta ({exc})") from None
    if not isinstance(meta, dict) or meta.get("method") not in {"int8_dynamic", "int8_static", "mixed"} \
            or not isinstance(meta.get("modules"), list) or not all(isinstance(m, str) for m in meta["modules"]):
        raise InputError(f"{meta_file}: key 'method' must be int8_dynamic/int8_static/mixed and 'modules' a list "
                         f"of module names")
    if meta.get("format") != QUANT_FORMAT or not weights.is_file():
        raise InputError(f"{meta_file}: INT8 artifact format {meta.get('format')!r} (need {QUANT_FORMAT!r} with "
                         f"{QUANT_DIR}/{QUANT_WEIGHTS}); re-run the quantize step on the source model")
    return meta


def load_quantized_into(model: Any, path: str | Path, meta: dict[str, Any]) -> Any:
    """Quantize the fp skeleton ``model`` as the quantize step did, then copy the stored int8 values in."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nexus_core.errors import InputError

    file = Path(path)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{file}: unreadable INT8 weights ({exc})") from None
    method, modules = meta["method"], meta["modules"]
    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{file}: quantized module {name!r} is not in the model") from None
        for key in ("weight_int8", "weight_scale", "weight_zero_point"):
            if f"{name}.{key}" not in tensors:
                raise InputError(f"{file}: key {name}.{key} missing")
    if method == "int8_static":
        quantize_static_int8(model, modules)
    else:
        quantize_dynamic_int8(model, modules)

    def get(key: str) -> Any:
        if key not in tensors:
            raise InputError(f"{file}: key {key} missing")
        return tensors[key]

    for name in modules:
        qlin = _qlinear(model, name, method)
        int8, scale, zp = get(f"{name}.weight_int8"), get(f"{name}.weight_scale"), get(f"{name}.weight_zero_point")
        if int8.dtype != torch.int8 or tuple(int8.shape) != tuple(qlin.weight().shape):
            raise InputError(f"{file}: key {name}.weight_int8 is {int8.dtype} {tuple(int8.shape)}, the model "
                             f"needs int8 {tuple(qlin.weight().shape)}")
        if f"{name}.weight_axis" in tensors:
            axis = int(tensors[f"{name}.weight_axis"][0])
            if scale.numel() != int8.shape[axis] or zp.numel() != int8.shape[axis]:
                raise InputError(f"{file}: key {name}.weight_scale/zero_point: one per channel of axis {axis} needed")
            qweight = torch._make_per_channel_quantized_tensor(int8, scale.to(torch.float64), zp.to(torch.int64), axis)
        else:
            if scale.numel() != 1 or zp.numel() != 1:
                raise InputError(f"{file}: key {name}.weight_scale/zero_point: one value needed (per-tensor)")
            qweight = torch._make_per_tensor_quantized_tensor(int8, float(scale[0]), int(zp[0]))
        bias = tensors.get(f"{name}.bias")
        qlin.set_weight_bias(qweight, None if bias is None else bias.to(torch.float32))
        if method == "int8_static":
            qlin.scale = float(get(f"{name}.output_scale")[0])
            qlin.zero_point = int(get(f"{name}.output_zero_point")[0])
            stub = model.get_submodule(name).quant
            stub.scale = get(f"{name}.input_scale").to(stub.scale.dtype).reshape(stub.scale.shape).clone()
            stub.zero_point = get(f"{name}.input_zero_point").to(stub.zero_point.dtype).reshape(
                stub.zero_point.shape).clone()
    return model


def load_compressed(path: str | Path, dtype: str = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, quantization meta or {})``: the int8 runtime when ``quantized/`` exists.

    Never unpickles: weights come from safetensors only (see the module docstring).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from nexus_core.models.io import from_pretrained_safe, load_tokenizer

    p = as_local(path)
    meta = _read_meta(p)  # refuses old pickled artifacts before anything is loaded
    tokenizer = load_tokenizer(p)  # the one tokenizer loader: a pad token guaranteed, as for every model
    model = from_pretrained_safe(AutoModelForCausalLM, p, dtype=getattr(torch, dtype))
    model.eval()
    if meta is None:
        return model, tokenizer, {}
    load_quantized_into(model, p / QUANT_DIR / QUANT_WEIGHTS, meta)
    model.eval()
    return model, tokenizer, meta
