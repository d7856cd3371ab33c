"""The spine without Prefect: manifests, idempotent re-runs, failures that leave nothing behind,
contracts checked before work, and the StepContext a step gets (MLflow run, work dir)."""

from pathlib import Path

import pytest

from nexus_core import catalog, lineage
from nexus_core.artifacts import raw_ref, read_manifest
from nexus_core.cachekey import step_key
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import model, step, table
from nexus_core.corpus.ingest import IngestConfig, run_ingest
from nexus_core.errors import InputError
from nexus_core.io import DataQuery, write_parquet
from nexus_core.runner import StepResult, run_step, work_dir_for


class BoomConfig(NexusModel):
    n: int = 1


class BoomResult(StepResult):
    pass


@step(area="corpus")
def run_boom(cfg: BoomConfig, *, inputs, out_uri: str, ctx: StepContext) -> BoomResult:
    Path(out_uri, "partial.txt").write_text("half")
    (ctx.work_dir / "checkpoint.txt").write_text("row 2")  # what a resumable step keeps
    raise InputError("boom: bad row 3")


def _corpus(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "raw.jsonl"
    path.write_text('{"text": "alpha"}\n{"text": "beta"}\n{"text": "alpha"}\n' + text)
    return path


def test_manifest_holds_the_lineage(data_root, tmp_path):
    src = raw_ref(_corpus(tmp_path))
    res = run_step(run_ingest, IngestConfig(sources=[src.uri]), name="c", inputs={"s": src})
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
    first = run_step(run_ingest, cfg, name="c", inputs={"s": raw_ref(path)})
    again = run_step(run_ingest, cfg, name="c", inputs={"s": raw_ref(path)})
    assert again.reused and again.ref == first.ref and again.rows_per_source == first.rows_per_source
    path.write_text(path.read_text() + '{"text": "gamma"}\n')
    third = run_step(run_ingest, cfg, name="c", inputs={"s": raw_ref(path)})
    assert not third.reused and third.ref.version == 2 and third.rows == 3
    assert DataQuery().load("c@v1").height == 2  # the earlier version is untouched


def test_failed_step_leaves_no_manifest_and_keeps_earlier_versions(data_root, tmp_path):
    run_step(run_ingest, IngestConfig(sources=["x"]), name="c", inputs={"s": raw_ref(_corpus(tmp_path))})
    with pytest.raises(InputError, match="bad row 3"):
        run_step(run_boom, BoomConfig(), name="c")
    assert [p.name for p in (data_root / "processed" / "corpus").iterdir() if not p.name.startswith(".lock")] \
        == ["c_v1"]
    failed = [r for r in catalog.step_runs() if r.status == "failed" and r.step.endswith("run_boom")]
    assert failed and "bad row 3" in failed[-1].error
    run = lineage.client().get_run(failed[-1].mlflow_run_id)
    assert run.info.status == "FAILED"
    # the work dir outlives the failure, so a re-run resumes from its checkpoints
    work = work_dir_for("corpus", "c", step_key(run_boom, BoomConfig(), {}))
    assert (work / "checkpoint.txt").read_text() == "row 2"


def test_missing_column_is_named(data_root, tmp_path):
    src = raw_ref(_corpus(tmp_path))
    with pytest.raises(InputError, match=r"missing column\(s\) domain"):
        run_step(run_ingest, IngestConfig(sources=[src.uri], required_columns=["text", "domain"]),
                 name="c", inputs={"s": src})


class PeekConfig(NexusModel):
    n: int = 1


class PeekResult(StepResult):
    run_id: str | None = None
    work_dir: str


@step(area="t")
def run_peek(cfg: PeekConfig, *, inputs, out_uri: str, ctx: StepContext) -> PeekResult:
    ctx.log_metrics({"loss": 0.5}, step=1)  # what a training loop does while it works
    (ctx.work_dir / "checkpoint.txt").write_text("step 1")
    Path(out_uri, "x.txt").write_text("x")
    return PeekResult(run_id=ctx.run_id, work_dir=str(ctx.work_dir))


def test_a_step_logs_to_its_own_mlflow_run_and_its_work_dir_goes_once_published(data_root):
    res = run_step(run_peek, PeekConfig(), name="peek")
    assert res.run_id and res.run_id == read_manifest(res.ref.uri).mlflow_run_id
    history = lineage.client().get_metric_history(res.run_id, "loss")
    assert [m.value for m in history] == [0.5]
    assert not Path(res.work_dir).exists()  # published: its checkpoints are no longer needed


def test_a_detached_context_has_no_run_and_logs_nothing(tmp_path):
    ctx = StepContext.detached(work_dir=tmp_path / "work")
    res = run_peek(PeekConfig(), inputs={}, out_uri=str(tmp_path), ctx=ctx)
    assert res.run_id is None and (tmp_path / "work" / "checkpoint.txt").read_text() == "step 1"


class PairConfig(NexusModel):
    n: int = 1


@step(area="t", inputs={"model": model(), "data": table(one_of=[("messages",), ("input", "output")]),
                        "extra": table("x", optional=True)})
def run_pair(cfg: PairConfig, *, inputs, out_uri: str, ctx: StepContext) -> StepResult:
    raise AssertionError("never reached: the contract refuses these inputs first")


def test_inputs_that_break_the_contract_are_refused_before_any_work(data_root, tmp_path):
    import polars as pl

    write_parquet(pl.DataFrame({"input": ["q"]}), tmp_path / "half" / "data.parquet")
    runs_before = len(catalog.step_runs())
    with pytest.raises(InputError) as err:
        run_step(run_pair, PairConfig(), name="pair",
                 inputs={"model": raw_ref(tmp_path / "half"), "data": raw_ref(tmp_path / "half"), "extra": None})
    text = str(err.value)
    assert "pair: input 'model'" in text and "no config.json" in text  # every problem in one message
    assert "needs a table with column(s) messages or input/output; has: input" in text
    assert "extra" not in text  # optional, passed as None: dropped
    assert len(catalog.step_runs()) == runs_before and not (data_root / "processed" / "t").exists()
