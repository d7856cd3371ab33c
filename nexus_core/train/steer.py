"""Training you can steer: a held-out eval split with eval loss and early stopping, several datasets
mixed by weight, and reward functions named by import path.

- **Eval split.** ``eval_split: 0.1`` holds out about a tenth of each dataset's rows, chosen by the
  hash of each row's content (not by position or seed): the same rows are held out on every run and
  every seed, and identical rows always land on the same side, so train and eval never share a row.
  An ``eval_data`` input instead evaluates on a dataset of its own.
- **Eval loss and early stopping.** The trainer evaluates every ``eval_steps`` steps; eval loss goes
  to the step's MLflow run (``train/eval_loss`` per step) and the result (``eval_loss``,
  ``best_eval_loss``). ``early_stopping`` stops after ``patience`` evaluations without improving by
  more than ``threshold`` (transformers' EarlyStoppingCallback) and, with ``restore_best``, saves the
  best checkpoint's weights.
- **Mixing.** A stage trained on several data inputs (``data``, ``data_1``, ``data_2`` ...) draws
  ``weight / sum(weights)`` of its training rows from each: the mix has as many rows as the inputs
  together, a dataset larger than its share is subsampled, a smaller one repeated (then topped up
  with a sample); the draw is seeded by ``seed``. Every input is in the manifest (lineage).
- **Reward functions by import path** (``module:function``) are imported before training starts; the
  file that defines each joins the step's cache key, so editing a reward re-runs the stage.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.errors import InputError
from nexus_core.train.data import Use, layout, load_rows

EVAL_INPUT = "eval_data"
_DATA_INPUT = re.compile(r"^data(?:_(\d+))?$")


class EarlyStopping(NexusModel):
    """Stop when the eval metric stops improving (transformers' EarlyStoppingCallback)."""

    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping")
    metric: str = Field(default="eval_loss", description="Eval metric to watch (eval_loss, or any the trainer "
                                                         "reports, e.g. eval_rewards/accuracies for DPO)")
    mode: Literal["min", "max"] = Field(default="min", description="min: lower is better (losses); max: higher")
    threshold: float = Field(default=0.0, ge=0, description="An improvement must exceed this to count")
    restore_best: bool = Field(default=True, description="Save the best evaluated checkpoint's weights, not the "
                                                         "last step's (checkpoint.save_steps must be a multiple of "
                                                         "eval_steps)")


class Steering(NexusModel):
    """Eval split, eval loss, early stopping and dataset mixing for a trl-based stage."""

    eval_split: float = Field(default=0.0, ge=0, lt=1, description="Share of each dataset's rows held out for "
                              "evaluation, chosen by row hash (the same rows on every run and seed); 0: none")
    eval_steps: int | None = Field(default=None, ge=1, description="Evaluate every N steps when there is eval data "
                                   "(eval_split or an eval dataset); none: every checkpoint.save_steps")
    early_stopping: EarlyStopping | None = Field(default=None, description="Stop when the eval metric stops "
                                                 "improving; needs eval data")
    data_weights: list[float] | None = Field(default=None, description="Mixing weight per data input (data, "
                                             "data_1, data_2, ... in that order): each draws weight/sum of the "
                                             "training rows; none: the inputs' rows as they are")


class EvalResult(BaseModel):
    """What a steered stage adds to its result (a plain model, as step results are)."""

    eval_loss: float | None = Field(default=None, description="Eval loss of the saved weights (with eval data)")
    stopped_early: bool = Field(default=False, description="Early stopping ended training before its last step")

    @staticmethod
    def fields(metrics: dict[str, float]) -> dict[str, Any]:
        """The result fields from a stage's metrics."""
        return {"eval_loss": metrics.get("eval_loss"), "stopped_early": bool(metrics.get("stopped_early"))}


# ---------------------------------------------------------------- checks


def check_tables(inputs: dict[str, ArtifactRef], method: str, use: Use,
                 load: Callable[[ArtifactRef], tuple[Any, str]] = load_rows) -> list[tuple[str, Any, str]]:
    """Every data input and the eval input loaded (by ``load``: a streamed stage reads only the
    columns) and checked for a column layout of ``use`` (the contract checks only ``data`` and
    ``eval_data`` by schema). Returns (input name, rows, where)."""
    tables = [*data_inputs(inputs), *([(EVAL_INPUT, inputs[EVAL_INPUT])] if EVAL_INPUT in inputs else [])]
    if not tables:
        raise InputError(f"{method}: missing input 'data' (have: {', '.join(inputs) or 'none'})")
    out = []
    for name, ref in tables:
        df, where = load(ref)
        layout(df, use, f"{where} ({name})", method)
        out.append((name, df, where))
    return out



def data_inputs(inputs: dict[str, ArtifactRef]) -> list[tuple[str, ArtifactRef]]:
    """The data inputs in mixing order: ``data``, ``data_1``, ``data_2``, ..."""
    found = [(int(m.group(1) or 0), k) for k in inputs if (m := _DATA_INPUT.match(k))]
    return [(k, inputs[k]) for _, k in sorted(found)]


def steer_problems(cfg: Any, inputs: dict[str, ArtifactRef]) -> list[str]:
    """What stops a stage's eval/mix settings before any work (one line each)."""
    method, problems = cfg.method, []
    names = [k for k, _ in data_inputs(inputs)]
    if names and names != ["data", *(f"data_{i}" for i in range(1, len(names)))]:
        problems.append(f"{method}: data inputs must be data, data_1, data_2, ... without gaps; got {', '.join(names)}")
    if cfg.data_weights is not None:
        if len(cfg.data_weights) != len(names):
            problems.append(f"data_weights: {len(cfg.data_weights)} weight(s) for {len(names)} data input(s) "
                            f"({', '.join(names) or 'none'})")
        if any(w < 0 for w in cfg.data_weights) or not sum(cfg.data_weights) > 0:
            problems.append("data_weights: weights must be >= 0 with a positive sum")
    elif len(names) > 1:
        problems.append(f"{method}: {len(names)} data inputs ({', '.join(names)}) need data_weights to mix them")
    if cfg.eval_split and EVAL_INPUT in inputs:
        problems.append(f"eval_split: set together with an {EVAL_INPUT!r} input; use one or the other")
    has_eval = bool(cfg.eval_split) or EVAL_INPUT in inputs
    stop = cfg.early_stopping
    if stop is not None and not has_eval:
        problems.append("early_stopping: needs eval data (eval_split > 0 or an eval dataset)")
    if stop is not None and stop.restore_best and has_eval and cfg.checkpoint.save_steps % eval_every(cfg):
        problems.append(f"early_stopping.restore_best: checkpoint.save_steps ({cfg.checkpoint.save_steps}) must be a "
                        f"multiple of eval_steps ({eval_every(cfg)}) so the best evaluation has a checkpoint")
    return problems


def eval_every(cfg: Any) -> int:
    """Steps between evaluations: ``eval_steps``, else the checkpoint interval."""
    return cfg.eval_steps or cfg.checkpoint.save_steps


# ---------------------------------------------------------------- split and mix


def row_hash(record: Any) -> str:
    """sha256 of a record's canonical JSON: the same content gives the same hash on every machine."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def split_records(records: list[Any], share: float, where: str = "data") -> tuple[list[Any], list[Any]]:
    """(train, eval): about ``share`` of the rows (at least one) held out by row hash, deterministic and
    disjoint; identical rows stay together. InputError when nothing would be left to train on."""
    if not share:
        return list(records), []
    hashes = [row_hash(r) for r in records]
    counts: dict[str, int] = {}
    for h in hashes:
        counts[h] = counts.get(h, 0) + 1
    want, held, chosen = max(1, round(len(records) * share)), 0, set()
    for h in sorted(counts):  # hash order: a pseudo-random pick that depends on content only
        if held >= want:
            break
        chosen.add(h)
        held += counts[h]
    train = [r for r, h in zip(records, hashes, strict=True) if h not in chosen]
    if not train:
        raise InputError(f"{where}: eval_split={share} leaves no rows to train on ({len(records)} row(s), "
                         f"{len(counts)} distinct)")
    return train, [r for r, h in zip(records, hashes, strict=True) if h in chosen]


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows drawn from each dataset: ``sum(sizes)`` split by weight (largest remainder, so they add up)."""
    total, wsum = sum(sizes), sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_records(parts: list[list[Any]], weights: list[float], seed: int) -> tuple[list[Any], list[int]]:
    """Mix datasets by weight (see :func:`mix_counts`): each dataset is shuffled with ``seed`` and
    taken whole as often as its count allows, then topped up from a fresh shuffle; the mix is shuffled
    too. Returns (rows, rows drawn per dataset)."""
    rng = random.Random(seed)
    counts = mix_counts([len(p) for p in parts], weights)
    out: list[Any] = []
    for part, n in zip(parts, counts, strict=True):
        while n >= len(part) > 0:
            out += rng.sample(part, len(part))
            n -= len(part)
        out += rng.sample(part, n) if n else []
    rng.shuffle(out)
    return out, counts


def steered_records(cfg: Any, inputs: dict[str, ArtifactRef],
                    to_records: Callable[[ArtifactRef], list[Any]]) -> tuple[list[Any], list[Any], dict[str, float]]:
    """A stage's training and eval rows: every data input converted by ``to_records``, split by
    ``eval_split`` (each dataset on its own), the training parts mixed by ``data_weights``; eval rows
    from the ``eval_data`` input when there is one. Returns (train, eval, metrics about both)."""
    named = data_inputs(inputs)
    trains, evals = [], []
    for name, ref in named:
        train, held = split_records(to_records(ref), cfg.eval_split, f"{ref.path} ({name})")
        trains.append(train)
        evals += held
    metrics: dict[str, float] = {}
    if cfg.data_weights is not None and len(named) > 1:
        rows, counts = mix_records(trains, cfg.data_weights, cfg.seed)
        metrics.update({f"mix_rows_{name}": float(n) for (name, _), n in zip(named, counts, strict=True)})
    else:
        rows = [r for part in trains for r in part]
    if EVAL_INPUT in inputs:
        evals = to_records(inputs[EVAL_INPUT])
    metrics.update(train_rows=float(len(rows)), eval_rows=float(len(evals)))
    return rows, evals, metrics


# ---------------------------------------------------------------- trainer wiring


def eval_kwargs(cfg: Any, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments for evaluation and early stopping (nothing without eval data)."""
    if not has_eval:
        return {}
    kw: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": eval_every(cfg),
                          "per_device_eval_batch_size": cfg.batch_size}
    stop = cfg.early_stopping
    if stop is not None:
        kw.update(metric_for_best_model=stop.metric, greater_is_better=stop.mode == "max",
                  load_best_model_at_end=stop.restore_best)
    return kw


def callbacks(cfg: Any) -> list[Any]:
    """EarlyStoppingCallback when the stage asks for early stopping."""
    if cfg.early_stopping is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping.patience,
                                  early_stopping_threshold=cfg.early_stopping.threshold)]


def eval_metrics(trainer: Any, cfg: Any) -> dict[str, float]:
    """Eval results for the step result: the final model's eval loss (evaluated again unless the last
    evaluation was at the last step), the best eval loss, evaluations run and whether training stopped
    early. Empty when the stage had no eval data."""
    if trainer.eval_dataset is None:
        return {}
    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    if not evals or evals[-1].get("step") != state.global_step or (
            cfg.early_stopping is not None and cfg.early_stopping.restore_best):
        final = trainer.evaluate()  # the weights being saved: the last step's, or the restored best
    else:
        final = evals[-1]
    losses = [h["eval_loss"] for h in evals] or [final["eval_loss"]]
    out = {"eval_loss": float(final["eval_loss"]), "best_eval_loss": float(min(losses)),
           "evaluations": float(len(evals)),
           "stopped_early": float(state.global_step < state.max_steps)}
    if cfg.early_stopping is not None and cfg.early_stopping.metric in final:
        out[f"final_{cfg.early_stopping.metric}"] = float(final[cfg.early_stopping.metric])
    return out


# ---------------------------------------------------------------- reward functions by import path


def resolve_callable(path: str, key: str) -> Callable[..., Any]:
    """The function named ``module:attribute`` (the attribute may be dotted). InputError naming ``key``
    and the path when the module does not import, the attribute is missing or not callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{key}: {path!r} is not an import path of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure (syntax error included) is the user's to fix
        raise InputError(f"{key}: {path!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(f"{key}: {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise InputError(f"{key}: {path!r} is a {type(obj).__name__}, not a function")
    return obj


def callable_files(paths: list[str], key: str) -> list[Path]:
    """The source files of the functions named by ``paths``: the module named, the file that defines the
    function when that is another, and every module of the same top-level package either imports,
    transitively (its helpers): their contents join the cache key. Imports outside that package
    (installed libraries, a sibling top-level module) do not."""
    from nexus_core.cachekey import module_closure

    files: list[Path] = []
    for i, path in enumerate(paths):
        fn = resolve_callable(path, f"{key}[{i}]")
        name = path.partition(":")[0]
        module = importlib.import_module(name)
        defining = getattr(inspect.unwrap(fn), "__module__", None) or name
        found = [getattr(module, "__file__", None), _source_file(fn)]
        for mod in dict.fromkeys((name, defining)):
            found += [str(f) for f in module_closure(mod, (mod.partition(".")[0],)).values()]
        for src in found:
            if src and Path(src) not in files:
                files.append(Path(src))
    return files


def _source_file(fn: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:  # a builtin or a callable instance of a C type: no source file
        return None
