"""Helpers the compress steps share: texts, sizes, pruning surgery, recovery distillation, perplexity.

Works on decoder-only HF models with the Llama layout (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``): Llama, Qwen2, Mistral and the tiny presets. Heavy imports stay inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError, StepError


def load_texts(ref: ArtifactRef, column: str | None = None, limit: int | None = None) -> list[str]:
    """Texts of a dataset artifact: ``column``, else ``text``, else ``input``+``output``, else ``prompt``+``completion``."""
    from nexus_core.io import load_table

    df = load_table(ref)
    if column:
        if column not in df.columns:
            raise InputError(f"{ref.uri}: missing column {column!r} (columns: {', '.join(df.columns)})")
        texts = [str(x) for x in df[column].drop_nulls().to_list()]
    elif "text" in df.columns:
        texts = [str(x) for x in df["text"].drop_nulls().to_list()]
    elif {"input", "output"} <= set(df.columns):
        texts = [f"{a}\n{b}" for a, b in zip(df["input"].to_list(), df["output"].to_list(), strict=True) if a and b]
    elif {"prompt", "completion"} <= set(df.columns):
        texts = [f"{a}{b}" for a, b in zip(df["prompt"].to_list(), df["completion"].to_list(), strict=True) if a and b]
    else:
        raise InputError(f"{ref.uri}: no text column (need text, input/output or prompt/completion)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{ref.uri}: no non-empty texts")
    return texts[:limit] if limit else texts


def count_params(model: Any) -> int:
    """Number of parameters (tied weights counted once), int8-packed Linear weights included."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        # Quantized Linears keep their weights in packed params, invisible to .parameters().
        if ".quantized" in type(m).__module__ and callable(getattr(m, "weight", None)):
            total += m.weight().numel() + (m.bias().numel() if callable(getattr(m, "bias", None))
                                           and m.bias() is not None else 0)
    return total


def dir_bytes(path: str | Path, pattern: str = "*") -> int:
    """Bytes of files under ``path`` matching ``pattern`` (recursively)."""
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


def save_model(model: Any, tokenizer: Any, out: str | Path) -> None:
    """Save an HF model dir (safetensors + tokenizer) so ``from_pretrained(out)`` works."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder blocks, or a StepError naming the unsupported architecture."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0], "mlp"):
        raise StepError(f"{type(model).__name__}: pruning supports Llama-style decoders (model.layers[i].self_attn/mlp)")
    return layers


def prunable_linears(model: Any) -> dict[str, Any]:
    """Linear layers inside the decoder blocks (embeddings and the tied LM head are left alone)."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


# -- unstructured -----------------------------------------------------------------------------------
def magnitude_prune(model: Any, sparsity: float, scope: str = "global") -> dict[str, Any]:
    """Zero the smallest-magnitude weights of the decoder Linears; return the keep-masks by module name.

    ``global`` ranks all weights together (layers with small weights lose more); ``layer`` prunes each
    Linear to the same sparsity.
    """
    import torch

    linears = prunable_linears(model)
    masks: dict[str, Any] = {}
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([m.weight.detach().abs().flatten() for m in linears.values()])
            k = int(sparsity * flat.numel())
            threshold = torch.kthvalue(flat, max(k, 1)).values if k else flat.min() - 1
            for name, m in linears.items():
                masks[name] = m.weight.abs() > threshold
        else:
            for name, m in linears.items():
                w = m.weight.abs().flatten()
                k = int(sparsity * w.numel())
                threshold = torch.kthvalue(w, max(k, 1)).values if k else w.min() - 1
                masks[name] = m.weight.abs() > threshold
        apply_masks(model, masks)
    return masks


def apply_masks(model: Any, masks: dict[str, Any]) -> None:
    """Re-zero pruned weights (after an optimiser step during recovery)."""
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            mods[name].weight.mul_(mask)


def sparsity_of(model: Any) -> float:
    """Fraction of exactly-zero weights in the decoder Linears."""
    linears = prunable_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / total if total else 0.0


# -- structured -------------------------------------------------------------------------------------
def _slice_linear(lin: Any, rows: Any = None, cols: Any = None) -> Any:
    import torch

    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def prune_mlp_channels(model: Any, sparsity: float) -> int:
    """Remove the least important MLP channels in every block; return the new intermediate size.

    Importance of channel c: ``|gate[c]| * |up[c]| * |down[:, c]|`` (weight norms). Every block keeps the
    same count because HF configs hold one ``intermediate_size``.
    """
    import torch

    layers = decoder_layers(model)
    inter = model.config.intermediate_size
    keep = max(1, int(round(inter * (1 - sparsity))))
    for layer in layers:
        mlp = layer.mlp
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        idx = torch.sort(torch.topk(score, keep).indices).values
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return keep


def prune_attention_heads(model: Any, sparsity: float) -> int:
    """Remove whole key/value groups (a KV head with its query heads) in every block; return KV heads kept.

    Grouped-query attention shares one K/V head between several query heads, so the group is the
    smallest unit that keeps the layout valid. Importance: squared weight norms of the group's
    q/k/v rows and o columns.
    """
    import torch

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    keep = max(1, int(round(kv * (1 - sparsity))))
    if keep == kv:
        return kv
    for layer in decoder_layers(model):
        attn = layer.self_attn
        q = attn.q_proj.weight.view(kv, group * hd, -1)
        k = attn.k_proj.weight.view(kv, hd, -1)
        v = attn.v_proj.weight.view(kv, hd, -1)
        o = attn.o_proj.weight.view(-1, kv, group * hd)
        score = q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
        groups = torch.sort(torch.topk(score, keep).indices).values
        q_rows = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in groups.tolist()])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = keep * group, keep, hd
    return keep


def layer_importance(model: Any, tokenizer: Any, texts: list[str], max_length: int = 128) -> list[float]:
    """Block influence of each decoder layer: ``1 - cos(input, output)`` of its hidden states, averaged.

    A layer that barely changes the residual stream (low influence) is the cheapest to drop.
    """
    import torch

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    hooks = []

    def hook(i: int):  # noqa: ANN202
        def fn(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def drop_layers(model: Any, drop: list[int]) -> None:
    """Remove decoder blocks by index and fix the config (layer count, per-layer type lists)."""
    import torch

    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    if not keep:
        raise StepError("layer dropping would remove every layer")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):  # KV-cache slots are indexed by layer_idx
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


# -- recovery and quality ---------------------------------------------------------------------------
def recover_by_distillation(student: Any, teacher: Any, tokenizer: Any, texts: list[str], *, steps: int,
                            lr: float = 1e-4, temperature: float = 2.0, batch_size: int = 4, max_length: int = 128,
                            masks: dict[str, Any] | None = None, seed: int = 0) -> list[float]:
    """Short KL(teacher ‖ student) fine-tuning of a pruned model on ``texts``; returns the loss curve.

    ``masks`` (from magnitude pruning) are re-applied after every step so sparsity survives training.
    """
    import torch

    torch.manual_seed(seed)
    student.train()
    teacher.eval()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses = []
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for step in range(steps):
            batch = [texts[(step * batch_size + j) % len(texts)] for j in range(batch_size)]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            with torch.no_grad():
                t_logits = teacher(**enc).logits / temperature
            s_logits = student(**enc).logits / temperature
            kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1),
                                            log_target=True, reduction="none").sum(-1)
            mask = enc["attention_mask"].float()
            loss = (kl * mask).sum() / mask.sum() * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                apply_masks(student, masks)
            losses.append(loss.detach().item())
    finally:
        tokenizer.padding_side = pad_side
        student.eval()
    return losses


def perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256) -> float:
    """Token-level perplexity over ``texts`` (each truncated to ``max_length``)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    if not count:
        raise InputError("perplexity: every text is shorter than two tokens")
    return math.exp(min(nll / count, 50.0))
