"""Running a trainer safely: the signal controller, MLflow logging, checkpoint marking and resume.

Signals (sent to the training process, e.g. ``kill -USR1 <pid>``):

- SIGUSR1 pauses at the next step boundary (caches freed) and resumes on the next SIGUSR1.
- SIGUSR2 writes an emergency checkpoint at the next step boundary (``checkpoint-<step>``).

Handlers can only be installed from a process's main thread. Under a Prefect worker thread the
controller says so in the log and training runs uncontrolled; stages launched as separate
processes (``isolate`` or ``num_processes > 1``) always have it. The training process logs its pid
(also written to ``<work dir>/train.pid``), its work dir and the step it resumes from.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from nexus_core import checkpoints
from nexus_core.errors import StepError
from nexus_core.train.common import StageBase, last_checkpoint, peak_memory_mb, resume_checkpoint

if TYPE_CHECKING:
    from nexus_core.context import StepContext
    from nexus_core.lineage import StepRun

# Under the "nexus" logger, so a launched child passes these lines on to the step's log (launch.py).
log = logging.getLogger("nexus.train")

# Fault injection for tests and drills: SIGKILL ourselves at this global step (after its optimizer step,
# before its checkpoint), exactly what an OOM-killer or a pre-empted node does.
KILL_AT_STEP_ENV = "NEXUS_TRAIN_KILL_AT_STEP"


def gpu_temperatures() -> list[int]:
    """Temperatures (°C) of every NVIDIA GPU via NVML; empty without a GPU or NVML."""
    try:
        import pynvml  # pyright: ignore[reportMissingImports] - optional package
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            return [pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(i), pynvml.NVML_TEMPERATURE_GPU)
                    for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return []


def free_memory() -> None:
    """Release cached allocator memory while paused."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrainingController(TrainerCallback):
    """Pause/resume (SIGUSR1), emergency checkpoint (SIGUSR2), cooldown, GPU temperature guard."""

    def __init__(self, cfg: StageBase, poll_s: float = 0.1):
        self.cfg = cfg.control
        self.total_limit = cfg.checkpoint.save_total_limit
        self.method: str | None = getattr(cfg, "method", None)
        self.poll_s = poll_s
        self.paused = False
        self.save_requested = False
        self.pauses = 0
        self.paused_seconds = 0.0
        self.emergency_saves = 0
        self.thermal_pauses = 0
        self._previous: dict[int, Any] = {}

    # -- signals
    def install(self) -> bool:
        """Install the signal handlers (main thread only). Returns whether they are active."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("training controller: not on the main thread, SIGUSR1/SIGUSR2 control is off")
            return False
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_usr1)
        self._previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, self._on_usr2)
        return True

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.paused = not self.paused

    def _on_usr2(self, signum: int, frame: Any) -> None:
        self.save_requested = True

    # -- trainer hooks
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - transformers API
        """Step boundary: kill drill, emergency save, pause, cooldown, thermal guard."""
        if os.environ.get(KILL_AT_STEP_ENV) == str(state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.save_requested:
            self.save_requested = False
            self.emergency_saves += 1
            control.should_save = True
        if self.paused:
            self.pauses += 1
            t0 = time.monotonic()
            log.warning("training paused at step %d (SIGUSR1 to resume)", state.global_step)
            free_memory()
            while self.paused:
                time.sleep(self.poll_s)
            self.paused_seconds += time.monotonic() - t0
        c = self.cfg
        if c.cooldown_every and state.global_step % c.cooldown_every == 0 and c.cooldown_seconds:
            time.sleep(c.cooldown_seconds)
        if state.global_step % c.gpu_check_every == 0:
            temps = gpu_temperatures()
            if temps and max(temps) > c.gpu_max_temp_c:
                self.thermal_pauses += 1
                log.warning("GPU at %d°C > %d°C: pausing until <= %d°C", max(temps), c.gpu_max_temp_c,
                            c.gpu_resume_temp_c)
                free_memory()
                while (temps := gpu_temperatures()) and max(temps) > c.gpu_resume_temp_c:
                    time.sleep(5.0)
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """The trainer finished writing checkpoint-N: mark it complete (resume only trusts marked ones),
        then rotate out the oldest beyond ``save_total_limit`` (never the best one) — in this order, so
        a kill at any moment leaves a complete checkpoint (the trainer's own rotation is off: it runs
        before this hook)."""
        if state.is_world_process_zero:
            root = Path(str(args.output_dir))
            ckpt = root / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                checkpoints.mark_complete(ckpt, state.global_step, self.method)
                checkpoints.rotate(root, self.total_limit, keep=state.best_model_checkpoint)
        return control


class MlflowLogger(TrainerCallback):
    """Logs loss, learning rate, grad norm, tokens/s and peak memory to the step's MLflow run (rank 0).

    Metrics are buffered and sent with one ``log_batch`` every ``flush_s`` seconds (and at save/end):
    a SQLite commit per training step would cost more than a tiny model's step. Checkpoints are
    recorded as artifacts (their trainer_state.json, small) plus a path tag.
    """

    def __init__(self, run: StepRun | None, flush_s: float = 10.0):
        self.run = run
        self.flush_s = flush_s
        self._t = self._flushed = time.monotonic()
        self._tokens = 0
        self._buffer: list[Any] = []
        self.tokens_per_s: list[float] = []

    def flush(self) -> None:
        """Send buffered metrics in batches of 1000 (MLflow's limit)."""
        if self.run and self._buffer:
            from nexus_core import lineage

            for i in range(0, len(self._buffer), 1000):  # one call per batch: each metric has its own step
                lineage.client().log_batch(self.run.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer.clear()
        self._flushed = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        """Buffer the trainer's numeric logs, plus throughput and memory."""
        if not (self.run and state.is_world_process_zero):
            return control
        from mlflow.entities import Metric

        logs = dict(logs or {})
        now, tokens = time.monotonic(), state.num_input_tokens_seen or 0
        if tokens > self._tokens and now > self._t:
            self.tokens_per_s.append((tokens - self._tokens) / (now - self._t))
            logs["tokens_per_s"] = self.tokens_per_s[-1]
        self._t, self._tokens = now, tokens
        logs["peak_memory_mb"] = peak_memory_mb()
        ms = int(time.time() * 1000)
        self._buffer += [Metric(f"train/{k}", float(v), ms, state.global_step)
                         for k, v in logs.items() if isinstance(v, int | float)]
        if now - self._flushed >= self.flush_s:
            self.flush()
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Record the checkpoint in MLflow."""
        ckpt = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if self.run and state.is_world_process_zero and (ckpt / "trainer_state.json").is_file():
            self.flush()
            self.run.log_file(ckpt / "trainer_state.json", f"checkpoints/{ckpt.name}")
            self.run.set_tags({"nexus.last_checkpoint": str(ckpt)})
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Send what is left."""
        self.flush()
        return control


class ProgressReporter(TrainerCallback):
    """Training progress through ``ctx.progress`` (the Prefect UI's progress artifact): step of max
    steps and the last logged loss, on rank 0. ``ctx.progress`` throttles; the last step always shows."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.loss: float | None = None

    def _report(self, state: Any) -> None:
        total = state.max_steps or state.global_step
        text = f"step {state.global_step}/{total}" + (f", loss {self.loss:.4f}" if self.loss is not None else "")
        self.ctx.progress(state.global_step, total, text)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201 - transformers API
        """Remember the last training loss for the progress message."""
        if logs and isinstance(logs.get("loss"), int | float):
            self.loss = float(logs["loss"])
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """One report per optimizer step (throttled by the context)."""
        if state.is_world_process_zero:
            self._report(state)
        return control


TRAIN_LOCK = "train.lock"


@contextlib.contextmanager
def work_dir_lock(work: Path, holder: bool = True) -> Iterator[None]:
    """Hold ``<work dir>/train.lock`` (an exclusive ``flock``, released by the kernel when its process
    dies) while training: a second trainer in the same work dir — a training child that outlived its
    killed parent, or the same stage started twice — would resume from and overwrite the same
    checkpoints, so it stops with a StepError instead. Only ``holder`` (rank 0) takes it."""
    import fcntl

    if not holder:
        yield
        return
    work.mkdir(parents=True, exist_ok=True)
    with open(work / TRAIN_LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise StepError(f"another training process (pid {pid}) is still running in {work}: a training child "
                            f"that outlived its killed parent, or this stage started twice. Stop it (kill {pid}) "
                            "or wait for it, then re-run to resume from its checkpoints") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield  # closing the file releases the lock


def fit(trainer, cfg: StageBase, ctx: StepContext | None = None) -> dict[str, float]:  # noqa: ANN001
    """Train with the controller and MLflow logger, resuming from the newest complete checkpoint in
    the trainer's output dir (``<work dir>/checkpoints``), else from ``cfg.resume_from``, holding the
    work dir's lock (:func:`work_dir_lock`). Logs through ``ctx`` (the step's log, MLflow run and
    progress) when given.

    Returns metrics: final loss, steps, the step resumed from, tokens/s, peak memory, pauses; under
    data parallelism also the nodes that took part and whether every rank ended with the same weights.
    """
    with work_dir_lock(Path(trainer.args.output_dir).parent, trainer.is_world_process_zero()):
        return _fit(trainer, cfg, ctx)


def _fit(trainer, cfg: StageBase, ctx: StepContext | None) -> dict[str, float]:  # noqa: ANN001
    info = ctx.info if ctx is not None else log.info
    controller, logger = TrainingController(cfg), MlflowLogger(ctx.run if ctx is not None else None)
    trainer.add_callback(controller)
    trainer.add_callback(logger)
    if ctx is not None:
        trainer.add_callback(ProgressReporter(ctx))
    ckpt_dir = Path(trainer.args.output_dir)
    work = ckpt_dir.parent
    resume = last_checkpoint(ckpt_dir) or resume_checkpoint(cfg)  # its own (after a kill), else resume_from
    resumed_from = int(resume.name.rsplit("-", 1)[-1]) if resume else 0
    if resume and 0 < cfg.max_steps < resumed_from:
        raise StepError(f"max_steps={cfg.max_steps}: the checkpoint to resume from is at step {resumed_from} "
                        f"({resume}); raise max_steps, or delete {ckpt_dir} to start over")
    who = f"pid {os.getpid()}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        who += f" (rank {os.environ.get('RANK', '0')})"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the strategy the accelerate config file asked for, or stop
        from nexus_core.train.backends import launched_strategy_problem

        problem = launched_strategy_problem(cfg, trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled)
        if problem:
            raise StepError(f"{type(cfg).__name__}: {problem}")
    controlled = controller.install()  # off (and said so) outside the main thread
    if controlled and trainer.is_world_process_zero():  # where to send SIGUSR1/SIGUSR2 (rank 0 under DDP)
        work.mkdir(parents=True, exist_ok=True)
        (work / "train.pid").write_text(str(os.getpid()))
    info(f"training in {who}, work dir {work}"
         + (" (SIGUSR1 pauses/resumes, SIGUSR2 writes a checkpoint)" if controlled else ""))
    if resume:
        info(f"resuming from step {resumed_from} ({resume})")
    else:
        info(f"no complete checkpoint in {ckpt_dir}: starting at step 0")
        for other in _other_attempts(work):
            log.warning("checkpoints of an earlier run of this stage with other data, model, hyper-parameters or "
                        "code are in %s (not resumed: they would train something else); set resume_from: %s to "
                        "continue from them", other, other)
    t0 = time.monotonic()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        controller.uninstall()
    seconds = time.monotonic() - t0
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    tokens = state.num_input_tokens_seen or 0
    metrics = {
        "train_loss": float(out.training_loss), "final_loss": float(losses[-1]) if losses else float("nan"),
        "global_step": float(state.global_step), "resumed_from_step": float(resumed_from),
        "train_seconds": seconds, "tokens_seen": float(tokens),
        # what the cost ledger prices: wall time on every GPU of the run (0 on CPU)
        "gpu_seconds": seconds * trainer.args.world_size if _on_cuda() else 0.0,
        "tokens_per_s": tokens / seconds if seconds and tokens else 0.0,
        "peak_memory_mb": peak_memory_mb(), "pauses": float(controller.pauses),
        "emergency_saves": float(controller.emergency_saves), "thermal_pauses": float(controller.thermal_pauses),
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # which nodes took part; DDP: same weights on every rank
        from nexus_core.train.backends import accelerate_setup
        from nexus_core.train.multinode import check_ranks

        metrics.update(check_ranks(trainer.model, sharded=accelerate_setup(cfg).sharded, info=info))
        # what the launch really ran (the accelerate config file sets it up, the Trainer picks it up)
        metrics.update(fsdp=float(trainer.is_fsdp_enabled), deepspeed=float(trainer.is_deepspeed_enabled))
    return metrics


def _other_attempts(work: Path) -> list[Path]:
    """Newest complete checkpoint of each other work dir of the same step name (``<name>-<key>``): a run
    killed before its config or code changed, which the new key no longer finds."""
    from nexus_core.settings import work_root

    name = work.name.rpartition("-")[0]
    if not name or not work.parent.is_dir() or not work.resolve().is_relative_to(work_root()):  # a runner's work dir only
        return []
    found = []
    for other in sorted(work.parent.iterdir()):
        if other != work and other.name.rpartition("-")[0] == name:  # never deletes anything: it may be running
            done = [p for _, p in checkpoints.complete(other / "checkpoints", remove_partial=False)
                    if (p / "trainer_state.json").is_file()]
            found += done[-1:]
    return found


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train_and_save(trainer, cfg: StageBase, ctx: StepContext, base: Path, out_uri: str,  # noqa: ANN001
                   method: str, kind: str = "causal") -> dict[str, float]:
    """fit() plus the bookkeeping every stage wants: parameter change, counts, and rank-0 save."""
    from nexus_core.train.common import (
        full_state_dict,
        is_main_process,
        param_delta,
        param_snapshot,
        save_model_artifact,
        saved_dtype,
    )

    before = param_snapshot(trainer.model)
    total = float(sum(p.numel() for p in trainer.model.parameters()))  # before FSDP/ZeRO-3 shard them
    metrics = fit(trainer, cfg, ctx)
    state = full_state_dict(trainer)  # sharded ranks: gathered on every rank (a collective), else None
    metrics.update(param_delta(before, trainer.model, None if cfg.adapters else saved_dtype(cfg, base), state))
    metrics["trainable_params"] = float(sum(t.numel() for t in before.values()))
    metrics["total_params"] = total
    if is_main_process():
        save_model_artifact(cfg, trainer, trainer.processing_class, base, out_uri, method, kind,  # type: ignore[arg-type]
                            state=state)
    return metrics
