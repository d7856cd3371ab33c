"""Task: a frozen tower run once over a multimodal dataset into MDS shards of tokenized rows + features."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.mm_features import MMFeaturesConfig, MMFeaturesResult, run_mm_features
from tasks.common import nexus_task, run_context


@nexus_task(run_mm_features, name="train-mm-features", gpu=True)
def train_mm_features(cfg: MMFeaturesConfig, model: ArtifactRef, data: ArtifactRef,
                      name: str = "mm_features") -> MMFeaturesResult:
    """Precompute ``model``'s tower features for ``data`` into ``train/<name>_vN`` (an mm stage's ``features``)."""
    return run_step(run_mm_features, cfg, name=name, inputs={"model": model, "data": data}, context=run_context())
