"""Model I/O: resolve a model reference, check a model directory, load a causal LM and its tokenizer.

A model reference is any of:

- an artifact: ``NAME``, ``NAME@vN`` or ``AREA/NAME@vN`` under the data root, or its directory;
- a local Hugging Face directory (``config.json`` + weights, or a peft adapter directory);
- a hub id ``ORG/NAME`` (optionally ``ORG/NAME@REVISION``), loaded through the Hugging Face cache:
  with ``HF_HUB_OFFLINE=1`` only what is already cached is used;
- a registry entry ``models:/NAME/V`` or ``models:/NAME@ALIAS`` (:mod:`nexus_core.models.registry`).

Every reference resolves to an :class:`ArtifactRef` whose ``digest`` identifies the weights (the
artifact digest, the directory's content digest, or ``hf:ORG/NAME@<commit sha>``), so a model's
identity joins every cache key it feeds. Loading handles plain weights, adapter directories (merged
into their base) and the INT8 variants of the quantize step.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError
from nexus_core.store import as_local

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """``ORG/NAME`` or ``ORG/NAME@REV`` that is not a path on this machine."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve_hub(spec: str, role: str = "model") -> ArtifactRef:
    """A hub id resolved through the Hugging Face cache (downloaded unless ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = spec.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        path = Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        if offline:
            raise InputError(f"{role} {spec!r}: a hub id, but it is not in the Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set (fetch it where the hub is reachable: "
                             f"huggingface-cli download {repo})") from None
        try:
            path = Path(snapshot_download(repo, revision=revision or None))
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise InputError(f"{role} {spec!r}: hub model could not be fetched ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    check_model_dir(path, role)
    return ArtifactRef(uri=str(path), kind="model", name=repo, version=0,
                       digest=f"hf:{repo}@{path.name}")  # snapshot dirs are named by commit sha


def resolve_model(spec: str, role: str = "model") -> ArtifactRef:
    """Resolve a model reference (see module docstring) and check that it is a model directory.

    Errors say which kind of reference failed: a missing path, a directory that is not a model, an
    unknown artifact, or a hub id that is not cached.
    """
    from nexus_core.io import resolve_ref
    from nexus_core.models.registry import is_registry_uri, resolve_registry_model

    if is_registry_uri(spec):
        ref = resolve_registry_model(spec, role)
        check_model_dir(ref.path, role)
        return ref
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", ".", "~")):
        if not path.exists():
            raise InputError(f"{role} {spec}: no such file or directory")
        ref = resolve_ref(spec, role)
        check_model_dir(ref.path, role)
        return ref.model_copy(update={"kind": "model"}) if ref.kind == "raw" else ref
    if is_hub_id(spec):
        try:  # an artifact named like ORG/NAME (AREA/NAME) wins over the hub
            ref = resolve_ref(spec, role)
        except InputError as not_artifact:
            try:
                return resolve_hub(spec, role)
            except InputError as not_hub:
                raise InputError(f"{not_hub}; nor is it a known artifact "
                                 f"({str(not_artifact).split('(', 1)[-1].rstrip(')')})") from None
        check_model_dir(ref.path, role)
        return ref
    ref = resolve_ref(spec, role)
    check_model_dir(ref.path, role)
    return ref


def check_model_dir(path: str | Path, role: str = "model") -> Path:
    """Fail fast on a directory that cannot be loaded: missing, no config, or no weights."""
    p = as_local(path)
    if not p.is_dir():
        raise InputError(f"{role} {p}: model directory does not exist")
    if (p / "adapter_config.json").is_file():
        if not any(p.glob("adapter_model.*")):
            raise InputError(f"{role} {p}: adapter directory without adapter weights (adapter_model.safetensors)")
        check_safetensors(p, role)
        return p
    if not (p / "config.json").is_file():
        raise InputError(f"{role} {p}: not a Hugging Face model directory (no config.json)")
    if (p / "quantized" / "quantization.json").is_file() and not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
        # an INT8 artifact: its weights (int8 Linears + float modules) are all under quantized/
        if not (p / "quantized" / "model_int8.safetensors").is_file():
            raise InputError(f"{role} {p}: INT8 model directory without quantized/model_int8.safetensors")
        check_safetensors(p / "quantized", role)
        return p
    if not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
        raise InputError(f"{role} {p}: model directory without weights (no *.safetensors or pytorch_model*.bin)")
    check_safetensors(p, role)
    return p


def check_safetensors(path: str | Path, role: str = "model") -> None:
    """Read the header of every ``*.safetensors`` file in a directory (cheap: no tensor is loaded), so a
    truncated or corrupt weights file fails here, named, rather than deep inside a loader."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{role} {file}: unreadable safetensors file ({exc})") from None


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer, with a pad token guaranteed (batched generation and trainers pad)."""
    from transformers import AutoTokenizer

    p = as_local(path)
    src = p
    if (p / "adapter_config.json").is_file() and not (p / "tokenizer_config.json").is_file():
        src = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(str(src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if "token_type_ids" in tok.model_input_names:
        # Decoder-only LMs take no token types; a generic fast tokenizer still emits them, and
        # generate() rejects the unknown kwarg.
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    return tok


def safe_weight_kwargs(path: str | Path) -> dict[str, Any]:
    """``from_pretrained`` kwargs that never unpickle: safetensors when the directory has any; a
    ``.bin``-only directory only through ``torch.load(weights_only=True)`` (transformers 4.57's default
    too, made explicit here so no caller can turn it off)."""
    p = as_local(path)
    if any(p.glob("*.safetensors")):
        return {"use_safetensors": True, "weights_only": True}
    return {"use_safetensors": False, "weights_only": True}


def from_pretrained_safe(auto_cls: Any, path: str | Path, role: str = "model", **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(path)`` preferring safetensors, ``.bin`` files only as weights
    (``weights_only=True``); a ``.bin`` that is not plain weights (a pickle carrying code, a corrupt file)
    is one InputError naming the directory, and nothing in it runs."""
    import pickle

    p = as_local(path)
    if kwargs.get("weights_only") is False or kwargs.get("use_safetensors") is False:
        raise InputError(f"{role} {p}: loading with weights_only=False / use_safetensors=False is not allowed "
                         f"(unpickling can run code)")
    kwargs.update(safe_weight_kwargs(p))
    try:
        return auto_cls.from_pretrained(str(p), **kwargs)
    except (pickle.UnpicklingError, OSError, RuntimeError) as exc:
        if kwargs["use_safetensors"]:
            raise
        bins = sorted(f.name for f in p.glob("*.bin"))
        raise InputError(f"{role} {p}: {', '.join(bins) or 'weights'} is not loadable as plain tensors "
                         f"(torch.load with weights_only=True refused it: {type(exc).__name__}); Nexus never "
                         f"unpickles model files: convert the model to safetensors") from None


def load_causal_lm(path: str | Path, dtype: str = "float32", int8: bool = True, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a model directory, in eval mode (see :func:`_load_causal_lm`).

    Files that cannot be read (a truncated weights file, a config that is not JSON) raise InputError
    naming the directory and what failed, not the loader's own exception.
    """
    from safetensors import SafetensorError

    try:
        return _load_causal_lm(path, dtype, int8, **kwargs)
    except (OSError, SafetensorError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"model {path}: cannot be loaded ({type(exc).__name__}: {first[:300]})") from exc


def _load_causal_lm(path: str | Path, dtype: str = "float32", int8: bool = True, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a model directory, in eval mode.

    An adapter directory is merged into its base; a quantize-step INT8 variant (``quantized/``) runs
    through the INT8 runtime when ``int8``, else as float weights rebuilt from its int8 values
    (:func:`nexus_core.models.compressed.load_dequantized`; a registry copy's root weights are the same).
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``). Nothing is unpickled:
    safetensors are preferred, ``.bin`` weights load only with ``weights_only=True`` (see
    :func:`from_pretrained_safe`), and INT8 variants load from safetensors.
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    torch_dtype = getattr(torch, dtype)
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype, **kwargs).merge_and_unload()
        tokenizer = load_tokenizer(p)
    elif int8 and (p / "quantized").is_dir():
        from nexus_core.models.compressed import load_compressed

        model, tokenizer, _ = load_compressed(p, dtype)
    elif (p / "quantized").is_dir() and not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
        from nexus_core.models.compressed import load_dequantized

        model, tokenizer, _ = load_dequantized(p, dtype)
    else:
        model = from_pretrained_safe(AutoModelForCausalLM, p, dtype=torch_dtype, **kwargs)
        tokenizer = load_tokenizer(p)
    model.eval()
    return model, tokenizer


def describe_model(path: str | Path) -> dict[str, Any]:
    """Architecture, size and input modalities of an HF model dir (config.json only; no weights loaded)."""
    cfg = json.loads((as_local(path) / "config.json").read_text())
    modalities = ["text"]
    for key, name in (("vision_config", "image"), ("audio_config", "audio"), ("video_config", "video")):
        if key in cfg or key in cfg.get("text_config", {}):
            modalities.append(name)
    text = cfg.get("text_config", cfg)
    return {"architecture": (cfg.get("architectures") or ["?"])[0], "model_type": cfg.get("model_type"),
            "modalities": modalities, "hidden_size": text.get("hidden_size"),
            "layers": text.get("num_hidden_layers"), "vocab_size": text.get("vocab_size"),
            "context": text.get("max_position_embeddings")}
