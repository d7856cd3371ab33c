"""Every step runs with dill's printing disassembly replaced, not only training stages: SFT packaging
also builds a ``datasets`` Dataset, and its function hashing printed bytecode into the run log."""

from __future__ import annotations

from pathlib import Path

from nexus_core.contract import step
from nexus_core.runner import StepResult, run_step


@step(area="logs")
def run_builds_a_dataset(cfg, *, inputs, out_uri, ctx) -> StepResult:  # noqa: ANN001
    from datasets import Dataset

    Dataset.from_list([{"text": "a"}, {"text": "b"}]).map(lambda r: {"n": len(r["text"])}).save_to_disk(
        str(Path(out_uri) / "ds"))
    return StepResult(rows=2)


def test_the_runner_hashes_functions_quietly_for_every_step(data_root, capfd):
    import dill.detect

    from nexus_core.config import NexusModel
    from nexus_core.logs import global_names

    run_step(run_builds_a_dataset, NexusModel(), name="quiet")
    assert dill.detect.nestedglobals is global_names
    out, err = capfd.readouterr()
    assert "LOAD_" not in out + err and "RETURN_" not in out + err
