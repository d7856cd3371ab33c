"""Run a stage's training function in this process, in one child process, or in N data-parallel
processes via ``accelerate launch``.

    python -m nexus_core.train.launch SPEC.json      (what each launched process runs)

A step calls :func:`run_stage` with its private ``_train(cfg, inputs, out_uri, ctx) -> dict`` function
and the :class:`~nexus_core.context.StepContext` the runner gave it. For child processes
(``isolate`` or ``num_processes > 1``) the spec (config, input refs, output dir, the step's name,
work dir and MLflow run id) is written to the work dir; each child rebuilds an equivalent context
from it (same work dir, so same checkpoints; same MLflow run). ``accelerate launch`` starts the
processes (gloo on CPU, NCCL on GPU; DDP or FSDP by config); rank 0 saves the model and writes the
metrics back as JSON. The children's log lines are passed on to this process's log, and rank 0's
progress reports to this process's ``ctx.progress`` (so the Prefect UI shows them).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.context import StepContext, log
from nexus_core.errors import Killed, StepError
from nexus_core.logs import hash_functions_quietly
from nexus_core.train.backends import launch_flags
from nexus_core.train.common import StageBase
from nexus_core.train.multinode import accelerate_flags, nodes_from_env, watch_launch

TrainFn = Callable[[Any, dict[str, ArtifactRef], str, StepContext], dict[str, Any]]


class Launchable(Protocol):
    """A training config run_stage can launch: an LLM stage or the flux train step."""

    num_processes: int
    isolate: bool

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...  # noqa: D102 - pydantic's
# Prefix of the children's log lines on their stderr, so the parent can tell them from other output.
CHILD_LOG_MARK = "[nexus-train] "
# Prefix of rank 0's progress reports ([fraction, message] as JSON), passed on to the parent's ctx.progress.
CHILD_PROGRESS_MARK = "[nexus-progress] "
# The nodes of a multi-node job serve one launch at a time (on one rendezvous port).
_ONE_MULTINODE_LAUNCH = threading.Lock()


def run_stage(train_fn: TrainFn, cfg: Launchable, inputs: dict[str, ArtifactRef], out_uri: str,
              method: str, ctx: StepContext) -> dict[str, Any]:
    """Run ``train_fn`` here, in one child process (``cfg.isolate``), or under ``accelerate launch``
    (``cfg.num_processes`` > 1, or any stage in a multi-node job: ``cfg.num_processes`` per node,
    on every node, see :mod:`nexus_core.train.multinode`). A child process gets the signal controller
    even when this call runs in a Prefect worker thread, and gives its memory back to the OS when
    training ends."""
    hash_functions_quietly()
    nodes = nodes_from_env()
    if cfg.num_processes == 1 and not cfg.isolate and not nodes.multi:
        return train_fn(cfg, inputs, out_uri, ctx)
    if nodes.rank != 0:
        raise StepError(f"{method}: node {nodes.rank} of a multi-node job ran a training step; only rank 0 runs "
                        "the flow run (the other nodes run python -m nexus_core.train.node_agent)")
    spec_path, result_path = ctx.work_dir / "launch.json", ctx.work_dir / "launch_result.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "module": train_fn.__module__, "function": train_fn.__name__, "config_class": type(cfg).__name__,
        "config": cfg.model_dump(mode="json"), "inputs": {k: v.model_dump(mode="json") for k, v in inputs.items()},
        "out_uri": out_uri, "step": ctx.step, "work_dir": str(ctx.work_dir), "run_id": ctx.run_id,
        "result": str(result_path), "launch_id": uuid.uuid4().hex}
    atomic_write_json(spec_path, spec)  # first: an agent joins only once it sees this spec in the work dir
    # An LLM stage launches with its accelerate config file (DDP, FSDP, DeepSpeed; see backends); the
    # command line's process and node flags win over the file's. Precision is the Trainer's (autocast).
    fixed = ["--mixed_precision", "no", "--dynamo_backend", "no",
             *(launch_flags(cfg) if isinstance(cfg, StageBase) else ["--multi_gpu"])]
    cmd = [sys.executable, "-m", "nexus_core.train.launch", str(spec_path)]
    if nodes.multi:
        flags = [*accelerate_flags(cfg.num_processes, nodes), *fixed]
        cmd[1:1] = ["-m", "accelerate.commands.launch", *flags, "--machine_rank", "0"]
        what = f"{cfg.num_processes} process(es) on each of {nodes.nnodes} nodes"
    elif cfg.num_processes > 1:
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes),
                    "--num_machines", "1", *fixed, "--main_process_port", str(_free_port())]
        what = f"{cfg.num_processes} child process(es)"
    else:
        what = "1 child process"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with contextlib.ExitStack() as stack:
        rdv, seq, stop, problems = None, 0, threading.Event(), []
        if nodes.multi:
            stack.enter_context(_ONE_MULTINODE_LAUNCH)
            rdv = nodes.rendezvous()
            seq, _ = rdv.publish_launch(spec, flags, nodes.nnodes)
            ctx.info(f"launch {seq} published to {rdv.root}; rank 0 at {nodes.main_addr}:{nodes.main_port}")
        ctx.info(f"training in {what}")
        tail: collections.deque[str] = collections.deque(maxlen=60)  # what a failure message shows
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            if rdv is not None:  # on the way out: stop watching, then tell late agents the launch is over
                stack.callback(rdv.end_launch, seq, proc)
                stack.callback(stop.set)
                threading.Thread(target=watch_launch, args=(rdv, seq, nodes, proc, stop, problems),
                                 daemon=True).start()
            assert proc.stdout is not None
            for line in proc.stdout:
                if CHILD_PROGRESS_MARK in line:  # into the step's progress (the Prefect UI), not the log
                    fraction, message = json.loads(line.split(CHILD_PROGRESS_MARK, 1)[1])
                    ctx.progress(fraction, 1.0, message)
                    continue
                tail.append(line)
                if CHILD_LOG_MARK in line:  # the child's own log (pid, resume step): into ours
                    log.info("%s", line.split(CHILD_LOG_MARK, 1)[1].rstrip())
    if problems:
        raise StepError(f"{method}: multi-node training stopped: {problems[0]}\n{''.join(tail)[-3000:]}")
    if proc.returncode is not None and proc.returncode < 0:  # ended by a signal: the MLflow run reads KILLED
        raise Killed(f"{method}: training in {what} was killed by signal {-proc.returncode} "
                     f"(exit {proc.returncode}); re-run to resume from its last checkpoint:\n{''.join(tail)[-3000:]}")
    if proc.returncode != 0 or not result_path.is_file():
        raise StepError(f"{method}: training in {what} failed (exit {proc.returncode}):\n{''.join(tail)[-3000:]}")
    return json.loads(result_path.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress_to_parent(fraction: float, message: str) -> None:
    """A launched process's progress: one line on stderr, which the parent reads (see run_stage)."""
    sys.stderr.write(CHILD_PROGRESS_MARK + json.dumps([fraction, message]) + "\n")
    sys.stderr.flush()


def main(spec_path: str) -> None:
    """Entry point of each launched process: rebuild the config and the step context, then call the
    stage's training function."""
    from nexus_core.lineage import StepRun

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CHILD_LOG_MARK + "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    hash_functions_quietly()
    spec = json.loads(Path(spec_path).read_text())
    module = importlib.import_module(spec["module"])
    cfg = getattr(module, spec["config_class"]).model_validate(spec["config"])
    inputs = {k: ArtifactRef.model_validate(v) for k, v in spec["inputs"].items()}
    ctx = StepContext(step=spec["step"], work_dir=Path(spec["work_dir"]),
                      run=StepRun(spec["run_id"]) if spec["run_id"] else None, on_progress=_progress_to_parent)
    metrics = getattr(module, spec["function"])(cfg, inputs, spec["out_uri"], ctx)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics["world_size"] = float(os.environ.get("WORLD_SIZE", "1"))
        atomic_write_json(spec["result"], metrics)


if __name__ == "__main__":
    main(sys.argv[1])
