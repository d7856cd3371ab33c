"""What a training run writes to its logs: no Python bytecode (it used to be ~40 % of a run's log),
the trainer's own lines, and the training process's pid, work dir and start step."""

from __future__ import annotations

import importlib.util
import logging
import re

import pytest
from prefect import flow

from nexus_core.logs import global_names
from nexus_core.train.sft import SFTConfig
from tasks.train_sft import train_sft

# A line of `dis` output ("159   0 RESUME   0", "  >>  128 LOAD_FAST   5 (tools)"), or an opcode anywhere
# (a log line's prefix puts it mid-line).
BYTECODE = re.compile(r"^\s*(\d+\s+)?(>>\s+)?\d+\s+[A-Z][A-Z_]{3,}\b|\b(LOAD|STORE)_(FAST|GLOBAL|CONST|ATTR|DEREF)\b")


def _dill_nestedglobals():
    """dill's own ``detect.nestedglobals`` (it prints ``dis.dis`` and parses the captured stdout), from a
    fresh copy of the module: the imported one is replaced once a training stage has run."""
    spec = importlib.util.find_spec("dill.detect")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.nestedglobals


GLOBAL_CONSTANT = 3


def _uses_globals(x):
    def inner(y):
        return len(y) + GLOBAL_CONSTANT

    return [inner(v) for v in sorted(x)] + [re.escape(str(x))]


def test_global_names_are_dills_without_printing(capsys):
    from datasets.utils import _dill
    from trl.trainer import sft_trainer

    dill_nestedglobals = _dill_nestedglobals()
    for fn in (_uses_globals, _dill.dumps, sft_trainer.SFTTrainer._prepare_dataset, BYTECODE.search):
        assert sorted(global_names(fn)) == sorted(dill_nestedglobals(fn)), fn
    assert set(global_names(_uses_globals)) == {"GLOBAL_CONSTANT", "len", "re", "sorted", "str"}
    assert capsys.readouterr().out == ""  # ours printed nothing (dill's went into its own capture)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()


@flow(log_prints=True)
def _sft_flow(cfg: SFTConfig, model, data):  # noqa: ANN001, ANN202
    return train_sft(cfg, model, data, name="t_quiet_logs")


@pytest.mark.integration
def test_training_under_log_prints_logs_no_bytecode(prefect_harness, tiny_model, refs, capfd, caplog):
    # Prefect's print capture (log_prints) turned the disassembly dill prints while datasets hashes each
    # Dataset.map function into task-run log lines. Watch everything a run writes: the task-run logger
    # (where captured prints go; INFO, which the test settings would otherwise drop), other logging,
    # stdout and stderr.
    task_log, handler = logging.getLogger("prefect.task_runs"), _Lines()
    level = task_log.level
    task_log.setLevel(logging.INFO)
    task_log.addHandler(handler)
    caplog.set_level(logging.INFO, logger="nexus")
    try:
        r = _sft_flow(SFTConfig(finetune="lora", max_steps=2, batch_size=4, seed=21, checkpoint={"save_steps": 10}),
                      tiny_model, refs["sft"])
    finally:
        task_log.removeHandler(handler)
        task_log.setLevel(level)
    out, err = capfd.readouterr()
    assert r.steps == 2
    assert any("'loss':" in line for line in handler.lines)  # the trainer's prints did reach the run log
    assert "training in pid" in caplog.text and "starting at step 0" in caplog.text
    lines = handler.lines + caplog.text.splitlines() + out.splitlines() + err.splitlines()
    bytecode = [line for line in lines if BYTECODE.search(line)]
    assert bytecode == [], f"{len(bytecode)} bytecode lines, e.g. {bytecode[:5]}"
