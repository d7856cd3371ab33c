"""Trace a model (or any artifact) back to the raw files that made it: ``nexus lineage``.

The walk reads manifests only (the store is the truth; no catalog or local state needed), starting
from a registry entry (``NAME@ALIAS``, ``NAME/V``, ``models:/...``) or an artifact (``name@vN``, a
store-relative URI). For each artifact on the way it reports the step, its config hash, code hash,
git sha, Prefect flow/task run ids and MLflow run id; the files the step read (prompt templates,
rules, rubrics) with their content hashes; the teacher/judge models its config names; and, for a
review step, the decisions in the reviewed table (by decision, by source, and who reviewed). The
walk ends at raw inputs (files with their digests) and base models.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

from nexus_core.artifacts import ArtifactRef, Manifest, read_manifest
from nexus_core.config import flatten
from nexus_core.errors import InputError

TEACHER_KEYS = ("teacher.model", "judge.model")
PROMPT_KEYS = ("template", "templates", "prompts_dir", "prompt", "rubric", "rules")


class Node(BaseModel):
    """One artifact of the chain."""

    uri: str
    name: str
    version: int
    kind: str
    digest: str
    step: str | None = None
    rows: int | None = None
    config_hash: str | None = None
    code_hash: str | None = None
    git_sha: str | None = None
    prefect_flow_run_id: str | None = None
    prefect_task_run_id: str | None = None
    mlflow_run_id: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict, description="input key -> name@vN (raw: file name)")
    files_read: dict[str, str] = Field(default_factory=dict, description="path -> sha256 (prompt templates, rules)")
    prompts: dict[str, str] = Field(default_factory=dict, description="config key -> template/prompt setting")
    teachers: dict[str, str] = Field(default_factory=dict, description="config key -> teacher/judge model")
    reviews: dict[str, Any] | None = None


class Lineage(BaseModel):
    """What ``nexus lineage`` prints."""

    target: str
    registry: dict[str, Any] | None = None
    chain: list[Node] = Field(default_factory=list, description="From the target back, breadth first")
    raw: list[dict[str, Any]] = Field(default_factory=list, description="Raw files and base models reached")


def _registry_start(spec: str) -> tuple[str, dict[str, Any]] | None:
    """(artifact uri, registry info) when ``spec`` names a registry entry; None otherwise."""
    from nexus_core import lineage

    body = spec.removeprefix("models:/")
    client = lineage.client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            if alias.startswith("v") and alias[1:].isdigit():
                return None  # name@v3 is an artifact version
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body and body.rsplit("/", 1)[1].isdigit():
            name, number = body.rsplit("/", 1)
            mv = client.get_model_version(name, number)
        else:
            return None
    except Exception as exc:
        if spec.startswith("models:/"):
            raise InputError(f"{spec}: not in the MLflow model registry ({str(exc).splitlines()[0]})") from None
        return None
    uri = mv.tags.get("nexus.artifact_uri")
    if not uri:
        raise InputError(f"{spec}: version {mv.version} has no nexus.artifact_uri tag (registered by an older "
                         f"Nexus; re-run its flow to register it again)")
    info = {"name": mv.name, "version": str(mv.version), "aliases": list(getattr(mv, "aliases", []) or []),
            "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags)}
    return uri, info


def _reviews(m: Manifest) -> dict[str, Any] | None:
    """Decision counts and reviewers of a review step's table (None for other steps)."""
    if not m.step.endswith(".run_review"):
        return None
    import polars as pl

    path = m.ref().path / "data.parquet"
    if not path.is_file():
        return None
    df = pl.read_parquet(path, columns=["decision", "decision_source", "reviewer"])
    return {"decisions": dict(Counter(df["decision"].to_list())),
            "sources": dict(Counter(df["decision_source"].to_list())),
            "reviewers": sorted({r for r in df["reviewer"].to_list() if r})}


def _node(m: Manifest) -> Node:
    flat = flatten(m.config)
    teachers = {k: v for k, v in flat.items() if isinstance(v, str) and v and k.endswith(TEACHER_KEYS)}
    prompts = {k: v for k, v in flat.items()
               if isinstance(v, str) and v and k.rsplit(".", 1)[-1] in PROMPT_KEYS}
    return Node(
        uri=m.uri, name=m.name, version=m.version, kind=m.kind, digest=m.digest, step=m.step, rows=m.rows,
        config_hash=m.config_hash, code_hash=m.code_hash, git_sha=m.code_version.get("git_sha"),
        prefect_flow_run_id=m.prefect.get("flow_run_id"), prefect_task_run_id=m.prefect.get("task_run_id"),
        mlflow_run_id=m.mlflow_run_id, files_read=dict(m.files), prompts=prompts, teachers=teachers,
        inputs={k: (f"{r.name}@v{r.version}" if r.version else r.name) for k, r in m.inputs.items()},
        reviews=_reviews(m),
    )


def trace(spec: str, max_nodes: int = 500) -> Lineage:
    """The lineage of ``spec`` (see the module docstring)."""
    from nexus_core.io import resolve_ref

    found = _registry_start(spec)
    if found:
        start, registry = found
    else:
        start, registry = resolve_ref(spec, "lineage").uri, None
    out = Lineage(target=spec, registry=registry)
    seen: set[str] = set()
    todo: list[ArtifactRef | str] = [start]
    while todo and len(out.chain) < max_nodes:
        item = todo.pop(0)
        uri = item if isinstance(item, str) else item.uri
        if uri in seen:
            continue
        seen.add(uri)
        if not isinstance(item, str) and item.version == 0:  # raw input or base model outside the store
            out.raw.append({"uri": item.uri, "name": item.name, "kind": item.kind, "digest": item.digest})
            continue
        m = read_manifest(uri)
        out.chain.append(_node(m))
        todo.extend(m.inputs.values())
    return out


def format_lineage(lin: Lineage) -> str:
    """Human-readable lineage: one block per artifact, then the raw files."""
    lines = []
    if lin.registry:
        r = lin.registry
        aliases = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        lines += [f"registry {r['name']} v{r['version']}{aliases}", f"  source {r['source']}"]
    for n in lin.chain:
        lines.append(f"{n.name}@v{n.version} [{n.kind}] {n.uri}  digest {n.digest[:12]}"
                     + (f", {n.rows} rows" if n.rows is not None else ""))
        lines.append(f"  step {(n.step or '').rsplit('.', 1)[-1]}  config {n.config_hash}  code {n.code_hash}  "
                     f"git {(n.git_sha or 'unknown')[:12]}")
        lines.append(f"  prefect flow run {n.prefect_flow_run_id}  task run {n.prefect_task_run_id}  "
                     f"mlflow run {n.mlflow_run_id}")
        if n.inputs:
            lines.append("  inputs " + ", ".join(f"{k}={v}" for k, v in n.inputs.items()))
        for key, model in n.teachers.items():
            lines.append(f"  teacher {key} = {model}")
        for key, value in n.prompts.items():
            lines.append(f"  prompt {key} = {value}")
        for path, digest in n.files_read.items():
            lines.append(f"  read {path}  sha256 {digest[:16]}")
        if n.reviews:
            lines.append(f"  reviews {n.reviews['decisions']} by source {n.reviews['sources']}, "
                         f"reviewers {', '.join(n.reviews['reviewers']) or 'none'}")
    for raw in lin.raw:
        lines.append(f"raw {raw['kind']} {raw['uri']}  digest {raw['digest'][:16]}")
    return "\n".join(lines)
