"""Export: merged safetensors (LoRA folded in), ONNX with an onnxruntime parity check, TensorRT, Core ML.

The artifact root is always the merged HF directory (``from_pretrained(uri)`` works). ONNX goes to
``onnx/model.onnx``: a no-cache graph ``(input_ids, attention_mask) -> logits`` with dynamic batch and
sequence axes, checked against PyTorch on fresh inputs. TensorRT and Core ML are attempted only
when their converters are importable; otherwise the format's row says why (or the step fails, with
``on_unavailable: error``). ``data.parquet`` has one row per format: status, path, reason, parity.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.compress.common import dir_bytes, save_model
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import directory, step
from nexus_core.errors import StepError
from nexus_core.io import write_parquet
from nexus_core.models.io import check_model_dir
from nexus_core.runner import StepResult

Format = Literal["safetensors", "onnx", "tensorrt", "coreml"]
PARITY_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Export parity check", "a"]


class ExportConfig(NexusModel):
    """Which formats to write."""

    formats: list[Format] = Field(default_factory=lambda: ["safetensors", "onnx"], description="Formats to export")
    opset: int = Field(default=18, ge=13, description="ONNX opset")
    parity_atol: float = Field(default=1e-3, gt=0, description="Max |logit difference| ONNX vs PyTorch")
    on_unavailable: Literal["skip", "error"] = Field(default="skip", description="A format whose converter is not "
                                                                         "installed: record why, or fail")


class ExportResult(StepResult):
    """What was exported."""

    formats: dict[str, str] = Field(description="format -> status (ok / unavailable / failed)")
    onnx_max_abs_diff: float | None = None


def _load_merged(uri: str | Path) -> tuple[Any, Any, bool]:
    """The model with any LoRA adapter folded in (an adapter dir is merged into its base); training
    stages already save merged weights at the root next to ``adapter/``. Returns (model, tokenizer, merged)."""
    from nexus_core.models.io import load_causal_lm

    model, tokenizer = load_causal_lm(uri, int8=False)
    return model, tokenizer, (check_model_dir(uri) / "adapter_config.json").is_file()


def _export_onnx(src: Path, out: Path, cfg: ExportConfig) -> float:
    """Write ``onnx/model.onnx`` and return the max |logit| difference against PyTorch on fresh inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Eager attention traces to plain ops every ONNX runtime understands.
    model = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapper = LogitsOnly().eval()
    example = tokenizer(["export example one", "two"], return_tensors="pt", padding=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    path = out / "onnx" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(wrapper, (example["input_ids"], example["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=cfg.opset,
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = tokenizer(PARITY_TEXTS, return_tensors="pt", padding=True)  # other shapes than the traced example
    got = session.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
    with torch.no_grad():
        want = wrapper(enc["input_ids"], enc["attention_mask"]).numpy()
    real = enc["attention_mask"].numpy().astype(bool)  # padded positions carry no meaning
    return float(np.abs(got - want)[real].max())


def _unavailable(fmt: str) -> str | None:
    if fmt == "tensorrt":
        import torch

        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT converter not installed (pip install tensorrt; needs an NVIDIA GPU)"
        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU; none is available here"
    if fmt == "coreml" and importlib.util.find_spec("coremltools") is None:
        return "Core ML converter not installed (pip install coremltools; conversion runs best on macOS)"
    return None


def _export_tensorrt(out: Path) -> str:
    """Build a TensorRT engine from the ONNX graph (GPU machines with tensorrt installed)."""
    import tensorrt as trt  # pyright: ignore[reportMissingImports] - optional package

    onnx_path = out / "onnx" / "model.onnx"
    if not onnx_path.is_file():
        raise StepError("export: tensorrt builds from the ONNX graph: list 'onnx' before 'tensorrt' in formats")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise StepError(f"export: TensorRT could not parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (1, 64), (8, 512))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    target = out / "tensorrt" / "model.plan"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(engine))
    return str(target.relative_to(out))


def _export_coreml(src: Path, out: Path) -> str:
    """Convert a traced no-cache graph with coremltools (where installed)."""
    import coremltools as ct  # pyright: ignore[reportMissingImports] - optional package
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager", torchscript=True).eval()
    ids = torch.ones((1, 16), dtype=torch.long)
    traced = torch.jit.trace(model, (ids,), strict=False)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=ids.shape, dtype=int)])
    target = out / "coreml" / "model.mlpackage"
    target.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(target))
    return str(target.relative_to(out))


# a directory, not model(): a peft adapter dir (no config.json) is accepted and merged
@step(area="compress", kind="model", inputs={"model": directory(description="HF model dir or peft adapter dir")})
def run_export(cfg: ExportConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> ExportResult:
    """Export ``inputs['model']`` to the configured formats under ``out_uri``."""
    import polars as pl

    out = Path(out_uri)
    model, tokenizer, merged = _load_merged(inputs["model"].path)
    save_model(model, tokenizer, out)  # merged safetensors at the root, always
    rows: list[dict[str, Any]] = [{"format": "safetensors", "status": "ok", "path": ".", "reason":
                                   "LoRA adapter merged" if merged else None, "max_abs_diff": None}]
    diff = None
    for fmt in cfg.formats:
        if fmt == "safetensors":
            continue
        reason = _unavailable(fmt)
        if reason:
            if cfg.on_unavailable == "error":
                raise StepError(f"export: format {fmt!r} unavailable: {reason}")
            rows.append({"format": fmt, "status": "unavailable", "path": None, "reason": reason, "max_abs_diff": None})
            continue
        if fmt == "onnx":
            diff = _export_onnx(out, out, cfg)
            if diff > cfg.parity_atol:
                raise StepError(f"export: ONNX parity check failed: max |logit diff| {diff:.2e} > "
                                f"parity_atol {cfg.parity_atol:.0e}")
            rows.append({"format": "onnx", "status": "ok", "path": "onnx/model.onnx", "reason": None,
                         "max_abs_diff": diff})
        elif fmt == "tensorrt":
            rows.append({"format": fmt, "status": "ok", "path": _export_tensorrt(out), "reason": None,
                         "max_abs_diff": None})
        else:
            rows.append({"format": fmt, "status": "ok", "path": _export_coreml(out, out), "reason": None,
                         "max_abs_diff": None})
    table = pl.DataFrame(rows, schema={"format": pl.String, "status": pl.String, "path": pl.String,
                                       "reason": pl.String, "max_abs_diff": pl.Float64})
    write_parquet(table, out / "data.parquet")
    atomic_write_json(out / "export.json", {"rows": rows, "lora_merged": merged})
    metrics = {"safetensors_mb": dir_bytes(out, "*.safetensors") / 1e6}
    if diff is not None:
        metrics.update({"onnx_max_abs_diff": diff, "onnx_mb": dir_bytes(out / "onnx") / 1e6})
    return ExportResult(formats={r["format"]: r["status"] for r in rows}, onnx_max_abs_diff=diff, rows=len(rows),
                        columns={c: str(t) for c, t in table.schema.items()}, metrics=metrics)
