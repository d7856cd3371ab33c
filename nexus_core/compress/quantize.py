"""Quantize: INT8 dynamic, INT8 static (calibrated), mixed precision (sensitive layers kept fp32), NF4.

INT8 variants run on CPU through torch.ao eager quantization. The output holds config and tokenizer
at its root and the whole INT8 model under ``quantized/`` (int8 Linears + float modules, safetensors,
no pickle, no fp32 copy; see :mod:`nexus_core.models.compressed`). ``load_causal_lm`` runs it through
the int8 runtime (serving, evaluation, benchmark) or as dequantized float weights (``int8=False``).
NF4 needs bitsandbytes on a CUDA GPU and says so clearly otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core import contract  # contract.model/table: `model` and `table` are local names here
from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.common import dir_bytes, load_texts, perplexity, save_model, shipped_bytes
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError, StepError
from nexus_core.models.compressed import (
    linear_names,
    quantize_dynamic_int8,
    quantize_static_int8,
    save_int8_model,
)
from nexus_core.models.io import check_model_dir
from nexus_core.runner import StepResult


class QuantizeConfig(NexusModel):
    """How to quantize."""

    method: Literal["int8_dynamic", "int8_static", "mixed", "nf4"] = Field(description="Quantization scheme")
    keep_fraction: float = Field(default=0.25, ge=0, lt=1, description="Mixed: fraction of Linears kept in fp32, "
                                                               "the most sensitive first")
    calibration_column: str | None = Field(default=None, description="Text column of the calibration dataset")
    calibration_rows: int = Field(default=16, ge=1, description="Calibration texts (static observers, sensitivity)")
    max_length: int = Field(default=128, ge=8, description="Tokens per calibration text")


class QuantizeResult(StepResult):
    """What was quantized."""

    method: str
    quantized_modules: int
    kept_fp32: list[str] = Field(default_factory=list, description="Mixed: modules left in fp32")
    int8_bytes: int = Field(default=0, description="Bytes of every file of the INT8 artifact")
    fp32_bytes: int = Field(default=0, description="Bytes of every file of the input model")


def _sensitivity(model: Any, tokenizer: Any, texts: list[str], names: list[str], max_length: int) -> dict[str, float]:
    """Mean squared logit change when only one Linear is quantized: how much that layer minds int8."""
    import torch

    batch = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"] for t in texts]
    with torch.no_grad():
        ref = [model(input_ids=ids).logits for ids in batch]
        scores = {}
        for name in names:
            trial = quantize_dynamic_int8(copy.deepcopy(model), [name])
            scores[name] = float(sum((trial(input_ids=ids).logits - r).pow(2).mean()
                                     for ids, r in zip(batch, ref, strict=True)) / len(batch))
    return scores


def _nf4(cfg: QuantizeConfig, src: str, out: Path) -> QuantizeResult:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise StepError("quantize: method=nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); none is available "
                        "here. Use int8_dynamic / int8_static / mixed on CPU, or run on a GPU work pool.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StepError("quantize: method=nf4 needs the 'bitsandbytes' package: pip install bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cuda")
    save_model(model, AutoTokenizer.from_pretrained(src), out)
    return QuantizeResult(method="nf4", quantized_modules=len(linear_names(model)),
                          metrics={"size_mb": dir_bytes(out, "*.safetensors") / 1e6})


@step(area="compress", kind="model",
      inputs={"model": contract.model(description="HF causal LM to quantize"),
              "calibration": contract.table(optional=True, description="Texts: calibration_column, text, "
                                                              "input+output or prompt+completion")})
def run_quantize(cfg: QuantizeConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext) -> QuantizeResult:
    """Quantize ``inputs['model']`` (``calibration`` needed for int8_static and mixed)."""
    import torch

    from nexus_core.models.io import load_causal_lm

    src = str(check_model_dir(inputs["model"].path))
    out = Path(out_uri)
    if cfg.method == "nf4":
        return _nf4(cfg, src, out)
    texts: list[str] = []
    if cfg.method in {"int8_static", "mixed"}:
        if "calibration" not in inputs:
            raise InputError(f"quantize: calibration data missing: method={cfg.method} needs a 'calibration' "
                             "dataset input")
        texts = load_texts(inputs["calibration"], cfg.calibration_column, cfg.calibration_rows)

    model, tokenizer = load_causal_lm(src, int8=False)
    names = linear_names(model)
    kept: list[str] = []
    metrics: dict[str, float] = {}
    if cfg.method == "mixed":
        scores = _sensitivity(model, tokenizer, texts, names, cfg.max_length)
        n_keep = int(round(cfg.keep_fraction * len(names)))
        kept = sorted(scores, key=lambda n: scores[n], reverse=True)[:n_keep]
        names = [n for n in names if n not in set(kept)]
        metrics["max_sensitivity"] = max(scores.values())

    def calibrate(m: Any) -> None:
        with torch.no_grad():
            for t in texts:
                m(input_ids=tokenizer(t, return_tensors="pt", truncation=True, max_length=cfg.max_length)["input_ids"])

    work = copy.deepcopy(model)
    if cfg.method == "int8_static":
        qmodel = quantize_static_int8(work, names, calibrate)
    else:
        qmodel = quantize_dynamic_int8(work, names)
    save_int8_model(qmodel, model, tokenizer, out, cfg.method, names, {"kept_fp32": kept})
    if texts:  # calibration texts: a sanity check of the step, not the release's held-out quality
        metrics["ppl_fp32"] = perplexity(model, tokenizer, texts[:8])
        metrics["ppl_int8"] = perplexity(qmodel, tokenizer, texts[:8])
    fp32_bytes = shipped_bytes(src)
    int8_bytes = shipped_bytes(out)  # every file shipped: config, tokenizer, quantized/ (no fp32 copy)
    metrics.update({"int8_mb": int8_bytes / 1e6, "fp32_mb": fp32_bytes / 1e6, "size_ratio": int8_bytes / fp32_bytes})
    return QuantizeResult(method=cfg.method, quantized_modules=len(names), kept_fp32=kept, int8_bytes=int8_bytes,
                          fp32_bytes=fp32_bytes, metrics=metrics)
