"""Task: ingest raw files into a versioned dataset."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.corpus.ingest import IngestConfig, IngestResult, run_ingest
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_ingest, name="ingest")
def ingest(cfg: IngestConfig, sources: dict[str, ArtifactRef], name: str = "corpus") -> IngestResult:
    """Read raw sources (refs with digests, so edited files miss the cache) into ``corpus/<name>_vN``."""
    return run_step(run_ingest, cfg, name=name, inputs=sources, context=run_context())
