"""INT8 variants of HF causal LMs on CPU (torch.ao eager quantization) and the loaders that rebuild them.

An INT8 artifact ships no fp32 copy of what it quantized. Its root holds ``config.json``,
``generation_config.json`` and the tokenizer, and ``quantized/`` holds the runtime:

- ``model_int8.safetensors``: plain tensors only. Each quantized Linear has its int8 weight, scale(s),
  zero point(s) and bias (plus the static input/output qparams). Every module that stays in float
  (embeddings, norms, LM head, Linears kept in fp32 by ``mixed``) is stored under its usual
  state-dict name.
- ``quantization.json``: method, quantized module names, format.

There are no root weights, so a bare ``from_pretrained(root)`` fails loudly rather than running
half-random weights. Load through :func:`load_compressed` (the int8 runtime, used by
``load_causal_lm(int8=True)``, serving and evaluation) or :func:`load_dequantized` (fp32 weights
rebuilt from the int8 values, used by ``load_causal_lm(int8=False)``, export and the registry).
Nothing here unpickles: the int8 modules are rebuilt by quantizing the fp skeleton the same way
and copying the stored values in. The old pickled ``model_int8.pt`` is refused with a request to
re-run the quantize step. Artifacts in the first safetensors format (``/1``) still load: they had
fp32 weights rounded through int8 at their root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nexus_core.store import as_local

QUANT_DIR = "quantized"
QUANT_META = "quantization.json"
QUANT_WEIGHTS = "model_int8.safetensors"
QUANT_FORMAT = "nexus-int8-safetensors/2"  # self-contained: int8 Linears + float modules, no root weights
QUANT_FORMAT_V1 = "nexus-int8-safetensors/1"  # int8 Linears only; fp32 (int8-rounded) weights at the root
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


def float_tensors(fp_model: Any, modules: list[str]) -> dict[str, Any]:
    """State-dict tensors of every module that stays in float; a tensor shared by several names (a tied
    LM head) is stored once, under its first name."""
    qset = set(modules)
    out: dict[str, Any] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, t in fp_model.state_dict().items():
        if key.rpartition(".")[0] in qset:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().clone().contiguous()
    return out


def save_int8_model(qmodel: Any, fp_model: Any, tokenizer: Any, out: str | Path, method: str, modules: list[str],
                    extra: dict[str, Any]) -> Path:
    """Write an INT8 artifact (see the module docstring): config and tokenizer at ``out``, and
    ``quantized/model_int8.safetensors`` + ``quantized/quantization.json``; return the weights path.

    ``fp_model`` is the float model ``qmodel`` was quantized from (its float modules are stored)."""
    from safetensors.torch import save_file

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    fp_model.config.save_pretrained(root)
    if getattr(fp_model, "generation_config", None) is not None:
        fp_model.generation_config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    qdir = root / QUANT_DIR
    qdir.mkdir(parents=True, exist_ok=True)
    tensors = float_tensors(fp_model, modules)
    int8 = quantized_tensors(qmodel, method, modules)
    clash = sorted(set(tensors) & set(int8))
    if clash:
        raise ValueError(f"int8 and float tensor names clash: {clash[:3]}")
    path = qdir / QUANT_WEIGHTS
    save_file({**tensors, **int8}, str(path), metadata={"format": QUANT_FORMAT})
    (qdir / QUANT_META).write_text(json.dumps({"method": method, "modules": modules, "format": QUANT_FORMAT,
                                               "weights": QUANT_WEIGHTS, **extra}, indent=2))
    return path


def is_int8_dir(path: str | Path) -> bool:
    """Whether ``path`` is an INT8 artifact of the quantize step (it has ``quantized/quantization.json``)."""
    return (as_local(path) / QUANT_DIR / QUANT_META).is_file()


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
    if meta.get("format") not in {QUANT_FORMAT, QUANT_FORMAT_V1} or not weights.is_file():
        raise InputError(f"{meta_file}: INT8 artifact format {meta.get('format')!r} (need {QUANT_FORMAT!r} with "
                         f"{QUANT_DIR}/{QUANT_WEIGHTS}); re-run the quantize step on the source model")
    if meta["format"] == QUANT_FORMAT_V1 and not any(p.glob("*.safetensors")):
        raise InputError(f"{meta_file}: format {QUANT_FORMAT_V1!r} needs the fp32 weights at {p}; none there")
    return meta


def _tensors(file: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nexus_core.errors import InputError

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{file}: unreadable INT8 weights ({exc})") from None


def _skeleton(p: Path, meta: dict[str, Any], tensors: dict[str, Any], dtype: str) -> Any:
    """The float model the int8 values go into: its float modules loaded, its quantized Linears not yet."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nexus_core.errors import InputError
    from nexus_core.models.io import from_pretrained_safe

    if meta["format"] == QUANT_FORMAT_V1:  # fp32 copies at the root
        return from_pretrained_safe(AutoModelForCausalLM, p, dtype=getattr(torch, dtype))
    file = p / QUANT_DIR / QUANT_WEIGHTS
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(p))).to(getattr(torch, dtype))
    qset = set(meta["modules"])
    floats = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in qset}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise InputError(f"{file}: tensors the model does not have: {', '.join(sorted(unexpected)[:5])}")
    shared: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), set()).add(name)
    loaded = set(floats)
    for key in missing:
        if key.rpartition(".")[0] in qset or any(shared[pid] & loaded for pid in shared if key in shared[pid]):
            continue  # a quantized Linear (filled below) or a tied tensor stored under its other name
        raise InputError(f"{file}: key {key} missing")
    return model


def _weight_parts(tensors: dict[str, Any], name: str, shape: tuple[int, ...], file: Path) -> tuple[Any, Any, Any, int | None]:
    """``(int8, scale, zero_point, axis or None)`` of module ``name``, checked against the model's ``shape``."""
    import torch

    from nexus_core.errors import InputError

    for key in ("weight_int8", "weight_scale", "weight_zero_point"):
        if f"{name}.{key}" not in tensors:
            raise InputError(f"{file}: key {name}.{key} missing")
    int8, scale, zp = tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
    if int8.dtype != torch.int8 or tuple(int8.shape) != tuple(shape):
        raise InputError(f"{file}: key {name}.weight_int8 is {int8.dtype} {tuple(int8.shape)}, the model "
                         f"needs int8 {tuple(shape)}")
    if f"{name}.weight_axis" in tensors:
        axis = int(tensors[f"{name}.weight_axis"][0])
        if scale.numel() != int8.shape[axis] or zp.numel() != int8.shape[axis]:
            raise InputError(f"{file}: key {name}.weight_scale/zero_point: one per channel of axis {axis} needed")
        return int8, scale.to(torch.float64), zp.to(torch.int64), axis
    if scale.numel() != 1 or zp.numel() != 1:
        raise InputError(f"{file}: key {name}.weight_scale/zero_point: one value needed (per-tensor)")
    return int8, scale.to(torch.float64), zp.to(torch.int64), None


def _check_modules(model: Any, modules: list[str], file: Path) -> None:
    from nexus_core.errors import InputError

    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{file}: quantized module {name!r} is not in the model") from None


def load_quantized_into(model: Any, path: str | Path, meta: dict[str, Any], tensors: dict[str, Any] | None = None) -> Any:
    """Quantize the fp skeleton ``model`` as the quantize step did, then copy the stored int8 values in."""
    import torch

    from nexus_core.errors import InputError

    file = Path(path)
    tensors = _tensors(file) if tensors is None else tensors
    method, modules = meta["method"], meta["modules"]
    _check_modules(model, modules, file)
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in modules}
    parts = {name: _weight_parts(tensors, name, shapes[name], file) for name in modules}
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
        int8, scale, zp, axis = parts[name]
        if axis is not None:
            qweight = torch._make_per_channel_quantized_tensor(int8, scale, zp, axis)
        else:
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
    if meta is None:
        model = from_pretrained_safe(AutoModelForCausalLM, p, dtype=getattr(torch, dtype))
        model.eval()
        return model, tokenizer, {}
    tensors = _tensors(p / QUANT_DIR / QUANT_WEIGHTS)
    model = _skeleton(p, meta, tensors, dtype)
    load_quantized_into(model, p / QUANT_DIR / QUANT_WEIGHTS, meta, tensors)
    model.eval()
    return model, tokenizer, meta


def load_dequantized(path: str | Path, dtype: str = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, meta)`` of an INT8 artifact as a plain float model: every quantized Linear
    gets ``(int8 - zero_point) * scale``, the values the int8 runtime computes with. Needs no quantized
    engine (any CPU or GPU); what export and the MLflow registry copy use."""
    import torch
    from transformers import AutoModelForCausalLM

    from nexus_core.errors import InputError
    from nexus_core.models.io import from_pretrained_safe, load_tokenizer

    p = as_local(path)
    meta = _read_meta(p)
    if meta is None:
        raise InputError(f"{p}: not an INT8 artifact (no {QUANT_DIR}/{QUANT_META})")
    tokenizer = load_tokenizer(p)
    if meta["format"] == QUANT_FORMAT_V1:  # its root weights are already the int8-rounded fp32 ones
        model = from_pretrained_safe(AutoModelForCausalLM, p, dtype=getattr(torch, dtype))
        return model.eval(), tokenizer, meta
    file = p / QUANT_DIR / QUANT_WEIGHTS
    tensors = _tensors(file)
    model = _skeleton(p, meta, tensors, dtype)
    _check_modules(model, meta["modules"], file)
    with torch.no_grad():
        for name in meta["modules"]:
            lin = model.get_submodule(name)
            int8, scale, zp, axis = _weight_parts(tensors, name, tuple(lin.weight.shape), file)
            if axis is not None:
                view = [1] * int8.dim()
                view[axis] = -1
                scale, zp = scale.reshape(view), zp.reshape(view)
            lin.weight.copy_(((int8.to(torch.float64) - zp) * scale).to(lin.weight.dtype))
            bias = tensors.get(f"{name}.bias")
            if bias is not None and lin.bias is not None:
                lin.bias.copy_(bias.to(lin.bias.dtype))
    return model.eval(), tokenizer, meta
