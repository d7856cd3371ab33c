"""Remote results: Prefect results on an fsspec RemoteFileSystem block; artifacts mirrored and fetched."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError
from nexus_core.runner import StepResult, run_step


class NoteConfig(NexusModel):
    """Config of a tiny step writing a note."""

    text: str = Field(description="What to write")


class NoteResult(StepResult):
    """Result of the note step."""


@step(area="notes")
def run_note(cfg: NoteConfig, *, inputs, out_uri: str, ctx: StepContext) -> NoteResult:
    """Write two files, one in a sub-folder (like adapter/ in model artifacts)."""
    (Path(out_uri) / "note.txt").write_text(cfg.text)
    (Path(out_uri) / "sub").mkdir()
    (Path(out_uri) / "sub" / "more.txt").write_text(cfg.text * 2)
    return NoteResult()


def test_artifacts_mirror_to_fsspec_and_come_back_verified(data_root, tmp_path):
    from infra.results import fetch_artifact, mirror_artifacts

    ref = run_step(run_note, NoteConfig(text="hello"), name="note")
    remote = f"file://{tmp_path}/bucket/nexus-data"
    first = mirror_artifacts(remote)
    assert first == [f"{remote}/processed/notes/note_v{ref.ref.version}"]
    assert mirror_artifacts(remote) == []                   # immutable versions: copied once
    back = fetch_artifact(first[0], tmp_path / "back")
    assert (back / "sub" / "more.txt").read_text() == "hellohello"
    # A corrupted remote copy is caught by the digest check.
    (tmp_path / "bucket/nexus-data/processed/notes" / f"note_v{ref.ref.version}" / "note.txt").write_text("evil")
    with pytest.raises(InputError, match="digest mismatch"):
        fetch_artifact(first[0], tmp_path / "back2")
    with pytest.raises(InputError, match="not a finished artifact"):
        fetch_artifact(f"file://{tmp_path}/bucket/nothing", tmp_path / "x")


def test_prefect_results_persist_on_a_remote_filesystem_block(prefect_harness):
    import uuid

    import fsspec
    from prefect import flow, task
    from prefect.filesystems import RemoteFileSystem

    from infra.results import register_result_storage

    # fsspec's in-process memory store stands in for s3:// (same RemoteFileSystem code path;
    # Prefect refuses file:// base paths for this block).
    bucket = f"nexus-results-{uuid.uuid4().hex[:8]}"
    uri = f"memory://{bucket}"
    assert register_result_storage(uri, "nexus-results-test") == "remote-file-system/nexus-results-test"
    storage = RemoteFileSystem.load("nexus-results-test")

    @task(persist_result=True, result_storage=storage, result_serializer="json", cache_policy=None)
    def double(x: int) -> int:
        return 2 * x

    @flow(persist_result=True, result_storage=storage, result_serializer="json")
    def remote_results_flow() -> int:
        return double(21)

    assert remote_results_flow() == 42
    mem = fsspec.filesystem("memory")
    stored = mem.find(f"/{bucket}")
    assert stored, "no result files written to the remote storage"
    assert any(b"42" in mem.cat_file(p) for p in stored)
