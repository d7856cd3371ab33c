"""The spine without Prefect: manifests, idempotent re-runs, failures that leave nothing behind."""

from pathlib import Path

import pytest

from nexus_core import catalog, lineage
from nexus_core.artifacts import raw_ref, read_manifest
from nexus_core.config import NexusModel
from nexus_core.corpus.ingest import IngestConfig, run_ingest
from nexus_core.errors import InputError
from nexus_core.io import DataQuery
from nexus_core.runner import StepResult, run_step


class BoomConfig(NexusModel):
    n: int = 1


class BoomResult(StepResult):
    pass


def run_boom(cfg: BoomConfig, *, inputs, out_uri: str) -> BoomResult:
    Path(out_uri, "partial.txt").write_text("half")
    raise InputError("boom: bad row 3")


def _corpus(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "raw.jsonl"
    path.write_text('{"text": "alpha"}\n{"text": "beta"}\n{"text": "alpha"}\n' + text)
    return path


def test_manifest_holds_the_lineage(data_root, tmp_path):
    src = raw_ref(_corpus(tmp_path))
    res = run_step(run_ingest, IngestConfig(sources=[src.uri]), area="corpus", name="c", inputs={"s": src})
    m = read_manifest(res.ref.uri)
    assert (m.name, m.version, m.rows, m.kind) == ("c", 1, 2, "dataset")
    assert m.inputs["s"].digest == src.digest
    assert m.step == "nexus_core.corpus.ingest.run_ingest"
    assert m.config["sources"] == [src.uri] and m.config_hash and m.code_hash
    assert m.schema_ == {"text": "String", "source_file": "String"}
    assert "git_sha" in m.code_version and m.metrics["rows_out"] == 2
    run = lineage.client().get_run(m.mlflow_run_id)
    assert run.data.tags["nexus.output_uri"] == m.uri
    assert run.inputs.dataset_inputs[0].dataset.digest == src.digest[:36]
    assert any(r.uri == m.uri for r in catalog.artifacts(name="c"))


def test_rerun_is_idempotent_and_changed_input_makes_a_new_version(data_root, tmp_path):
    path = _corpus(tmp_path)
    cfg = IngestConfig(sources=[str(path)])
    first = run_step(run_ingest, cfg, area="corpus", name="c", inputs={"s": raw_ref(path)})
    again = run_step(run_ingest, cfg, area="corpus", name="c", inputs={"s": raw_ref(path)})
    assert again.reused and again.ref == first.ref and again.rows_per_source == first.rows_per_source
    path.write_text(path.read_text() + '{"text": "gamma"}\n')
    third = run_step(run_ingest, cfg, area="corpus", name="c", inputs={"s": raw_ref(path)})
    assert not third.reused and third.ref.version == 2 and third.rows == 3
    assert DataQuery().load("c@v1").height == 2  # the earlier version is untouched


def test_failed_step_leaves_no_manifest_and_keeps_earlier_versions(data_root, tmp_path):
    run_step(run_ingest, IngestConfig(sources=["x"]), area="corpus", name="c",
             inputs={"s": raw_ref(_corpus(tmp_path))})
    with pytest.raises(InputError, match="bad row 3"):
        run_step(run_boom, BoomConfig(), area="corpus", name="c")
    assert [p.name for p in (data_root / "processed" / "corpus").iterdir() if not p.name.startswith(".lock")] \
        == ["c_v1"]
    failed = [r for r in catalog.step_runs() if r.status == "failed" and r.step.endswith("run_boom")]
    assert failed and "bad row 3" in failed[-1].error
    run = lineage.client().get_run(failed[-1].mlflow_run_id)
    assert run.info.status == "FAILED"


def test_missing_column_is_named(data_root, tmp_path):
    src = raw_ref(_corpus(tmp_path))
    with pytest.raises(InputError, match=r"missing column\(s\) domain"):
        run_step(run_ingest, IngestConfig(sources=[src.uri], required_columns=["text", "domain"]),
                 area="corpus", name="c", inputs={"s": src})


class PeekConfig(NexusModel):
    n: int = 1


class PeekResult(StepResult):
    run_id: str | None = None


def run_peek(cfg: PeekConfig, *, inputs, out_uri: str) -> PeekResult:
    run = lineage.current_step_run()
    run.log_metrics({"loss": 0.5}, step=1)  # what a training loop does while it works
    Path(out_uri, "x.txt").write_text("x")
    return PeekResult(run_id=run.run_id)


def test_a_step_can_log_to_its_own_mlflow_run_while_it_works(data_root):
    assert lineage.current_step_run() is None
    res = run_step(run_peek, PeekConfig(), area="t", name="peek")
    assert res.run_id == read_manifest(res.ref.uri).mlflow_run_id
    history = lineage.client().get_metric_history(res.run_id, "loss")
    assert [m.value for m in history] == [0.5]
    assert lineage.current_step_run() is None
