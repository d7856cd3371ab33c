"""The model registry: every registered version is a real MLflow ``transformers`` model.

``mlflow.transformers.load_model("models:/NAME/V")`` (or ``models:/NAME@ALIAS``) loads it on any
machine that reaches the tracking server and the artifact store: the model files are copied into
the MLflow run that produced them (artifact path ``registered_model``), so they live in the MLflow
artifact store (the Nexus store when it is remote), never at a path on the machine that trained it.

- A training stage's artifact holds merged weights at its root and the LoRA adapter under
  ``adapter/``: the merged model is what loads; the tag ``nexus.adapter`` says where the adapter is.
- An adapter-only directory is merged into its base first (the registry entry must load alone).
- An INT8 variant ships no float weights (see :mod:`nexus_core.models.compressed`), which
  ``mlflow.transformers`` cannot load. The registry copy alone gets float weights rebuilt from the
  int8 values (``(int8 - zero_point) * scale``, exactly what the int8 runtime multiplies by), with the
  artifact's ``quantized/`` files beside them. ``mlflow.transformers.load_model`` loads the float
  weights; ``load_causal_lm`` (serving, evaluation) on the downloaded version runs the int8 runtime
  from ``quantized/``. The tags ``nexus.int8_runtime`` and ``nexus.weights`` say so. The artifact in
  the store stays int8 only.

Registering is idempotent by artifact digest: a version with the same ``nexus.digest`` is reused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError, StepError

MODEL_ARTIFACT = "registered_model"
_MODELS_URI = "models:/"


def _int8_loadable(src: Path, tmp: Path) -> Path:
    """``src`` (an INT8 artifact) with float weights rebuilt from its int8 values at the root and its
    ``quantized/`` runtime files beside them: for the MLflow copy only."""
    from nexus_core.models.compressed import QUANT_DIR, load_dequantized

    model, tokenizer, _ = load_dequantized(src)
    out = tmp / "int8_dequantized"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    shutil.copytree(src / QUANT_DIR, out / QUANT_DIR)
    return out


def _loadable_dir(src: Path, tmp: Path) -> tuple[Path, str | None]:
    """A directory ``transformers`` loads as is, and where the adapter is (None: no adapter)."""
    from nexus_core.models.compressed import is_int8_dir
    from nexus_core.models.io import WEIGHT_GLOBS

    if is_int8_dir(src) and not any(any(src.glob(g)) for g in WEIGHT_GLOBS):
        return _int8_loadable(src, tmp), None
    if (src / "config.json").is_file():
        return src, "adapter/" if (src / "adapter" / "adapter_config.json").is_file() else None
    if (src / "adapter_config.json").is_file():  # adapter only: fold it into its base
        from nexus_core.models.io import load_causal_lm

        model, tokenizer = load_causal_lm(src, int8=False)
        out = tmp / "merged"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out, "merged from the adapter artifact"
    raise InputError(f"{src}: not a model directory (no config.json or adapter_config.json)")


def register_model_version(ref: ArtifactRef, name: str, *, run_id: str | None, tags: dict[str, Any],
                           description: str, alias: str | None = None) -> str:
    """Register ``ref`` (a model artifact) as a version of ``name``; returns the version number.

    The model is saved with ``mlflow.transformers`` (task text-generation) into the run ``run_id``
    (the step that made the weights); without one, a run of its own is created. ``alias`` (if given)
    moves to the new version.
    """
    import mlflow.transformers

    from nexus_core import lineage
    from nexus_core.models.compressed import is_int8_dir

    client = lineage.client()
    try:
        client.get_registered_model(name)
    except Exception:  # mlflow raises RestException/MlflowException for "not found" depending on store
        client.create_registered_model(name, description="Nexus models (mlflow.transformers flavour)")
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("nexus.digest") == ref.digest:
            if alias:
                client.set_registered_model_alias(name, alias, mv.version)
            return str(mv.version)
    if run_id is None:
        run_id = client.create_run(lineage.experiment_id(), run_name=f"register {name}",
                                   tags={"nexus.step": "registry"}).info.run_id
        client.set_terminated(run_id)
    with tempfile.TemporaryDirectory(prefix="nexus-register-") as tmp:
        src, adapter = _loadable_dir(ref.path, Path(tmp))
        saved = Path(tmp) / MODEL_ARTIFACT
        try:
            mlflow.transformers.save_model(transformers_model=str(src), path=str(saved), task="text-generation")
        except Exception as exc:
            raise StepError(f"registry: {ref.uri} could not be saved as an MLflow transformers model: {exc}") from exc
        client.log_artifacts(run_id, str(saved), MODEL_ARTIFACT)
    source = f"{(client.get_run(run_id).info.artifact_uri or '').rstrip('/')}/{MODEL_ARTIFACT}"
    all_tags = {**tags, "nexus.digest": ref.digest, "nexus.artifact_uri": ref.uri, "nexus.flavor": "transformers"}
    if adapter:
        all_tags["nexus.adapter"] = adapter
    if is_int8_dir(ref.path):
        all_tags["nexus.int8_runtime"] = ("quantized/: int8 weights + quantization.json; "
                                          "nexus_core.models.io.load_causal_lm runs them")
        all_tags["nexus.weights"] = ("float weights rebuilt from the int8 values, for mlflow.transformers; "
                                     "the released artifact itself ships int8 only")
    try:
        version = client.create_model_version(name, source=source, run_id=run_id, description=description,
                                              tags={k: str(v)[:5000] for k, v in all_tags.items() if v is not None})
    except Exception as exc:
        raise StepError(f"registry: MLflow refused a version of {name} for {ref.uri}: {exc}") from exc
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def is_registry_uri(spec: str) -> bool:
    """``models:/NAME/V`` or ``models:/NAME@ALIAS``."""
    return spec.startswith(_MODELS_URI)


def resolve_registry_model(spec: str, role: str = "model") -> ArtifactRef:
    """A registry reference as a model ref: the version's weights, downloaded once (NEXUS_HOME/store-cache).

    The ref's digest is the artifact digest the version was registered with, so cache keys see the
    same model whether it is named by registry alias or by artifact.
    """
    from mlflow.artifacts import download_artifacts

    from nexus_core import lineage
    from nexus_core.store import fill_once, scratch_dir

    body = spec[len(_MODELS_URI):]
    client = lineage.client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.partition("/")
            mv = client.get_model_version(name, number)
    except Exception as exc:
        raise InputError(f"{role} {spec!r}: not in the MLflow model registry ({str(exc).splitlines()[0]})") from None
    digest = mv.tags.get("nexus.digest") or f"mlflow:{mv.name}/{mv.version}"
    target = scratch_dir("store-cache") / f"registry__{mv.name}__v{mv.version}"

    def download(tmp: Path) -> None:
        download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp))
        if not (tmp / "model" / "config.json").is_file():  # MLflow's layout: model/ holds the checkpoint
            raise InputError(f"{role} {spec!r}: version {mv.version} is not a transformers model "
                             f"(registered before models were logged with mlflow.transformers?)")

    if not (target / "model" / "config.json").is_file():
        fill_once(target, download)
    return ArtifactRef(uri=str(target / "model"), kind="model", name=f"{mv.name}@v{mv.version}", version=0,
                       digest=digest)
