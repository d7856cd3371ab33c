"""Run a stage's training function in this process, or in N data-parallel processes via ``accelerate launch``.

    python -m nexus_core.train.launch SPEC.json      (what each launched process runs)

A step calls :func:`run_stage` with its private ``_train(cfg, inputs, out_uri, run_id) -> dict`` function.
With ``num_processes > 1`` the spec (config, input refs, output dir, MLflow run id) is written to
the stage's work dir and ``accelerate launch`` starts the processes (gloo on CPU, NCCL on GPU; DDP
or FSDP by config); rank 0 saves the model and writes the metrics back as JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import config_hash
from nexus_core.errors import StepError
from nexus_core.train.common import StageBase, work_dir

TrainFn = Callable[[Any, dict[str, ArtifactRef], str, str | None], dict[str, float]]
RUN_ID_ENV = "NEXUS_TRAIN_MLFLOW_RUN_ID"


def current_step_run_id(cfg: StageBase) -> str | None:
    """MLflow run id of the step execution in progress for ``cfg`` (the runner opened it).

    ``lineage.current_step_run()`` when the runner set it; else (a step called outside the runner's
    context) the RUNNING step run tagged with this config hash.
    """
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    try:
        from nexus_core import lineage

        current = lineage.current_step_run()
        if current is not None:
            return current.run_id
        c = lineage.client()
        runs = c.search_runs(
            experiment_ids=[e.experiment_id for e in c.search_experiments()],
            filter_string=f"tags.`nexus.config_hash` = '{config_hash(cfg)}' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception:  # tracking is best-effort; training must not fail because MLflow is unreachable
        return None


def run_stage(train_fn: TrainFn, cfg: StageBase, inputs: dict[str, ArtifactRef], out_uri: str,
              method: str) -> dict[str, float]:
    """Run ``train_fn`` here, in one child process (``cfg.isolate``), or under ``accelerate launch``
    (``cfg.num_processes`` > 1). A child process gets the signal controller even when this call runs
    in a Prefect worker thread, and gives its memory back to the OS when training ends."""
    run_id = current_step_run_id(cfg)
    if cfg.num_processes == 1 and not cfg.isolate:
        return train_fn(cfg, inputs, out_uri, run_id)
    work = work_dir(method, cfg, inputs)
    spec_path, result_path = work / "launch.json", work / "launch_result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {
        "module": train_fn.__module__, "function": train_fn.__name__, "config_class": type(cfg).__name__,
        "config": cfg.model_dump(mode="json"), "inputs": {k: v.model_dump(mode="json") for k, v in inputs.items()},
        "out_uri": out_uri, "run_id": run_id, "result": str(result_path)})
    cmd = [sys.executable, "-m", "nexus_core.train.launch", str(spec_path)]
    if cfg.num_processes > 1:
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
                    "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise StepError(f"{method}: training in {cfg.num_processes} child process(es) failed "
                        f"(exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(spec_path: str) -> None:
    """Entry point of each launched process: rebuild the config and call the stage's training function."""
    spec = json.loads(Path(spec_path).read_text())
    module = importlib.import_module(spec["module"])
    cfg = getattr(module, spec["config_class"]).model_validate(spec["config"])
    inputs = {k: ArtifactRef.model_validate(v) for k, v in spec["inputs"].items()}
    metrics = getattr(module, spec["function"])(cfg, inputs, spec["out_uri"], spec["run_id"])
    if int(os.environ.get("RANK", "0")) == 0:
        metrics["world_size"] = float(os.environ.get("WORLD_SIZE", "1"))
        atomic_write_json(spec["result"], metrics)


if __name__ == "__main__":
    main(sys.argv[1])
