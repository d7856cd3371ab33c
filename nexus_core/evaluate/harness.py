"""Standard tasks beside the rubric: EleutherAI lm-evaluation-harness tasks on the model under evaluation.

A task is an lm-evaluation-harness task YAML kept in the repository with its data (see
``configs/eval/harness/``): ``task``, ``dataset_path: json`` (or csv/parquet/text/arrow, or a local
directory) with local ``dataset_kwargs.data_files`` (relative to the task file), ``output_type``
(``multiple_choice``: each choice scored by log-likelihood, ``acc`` and length-normalised (per character)
``acc_norm``; ``generate_until``: greedy generation, lm-eval's filters, ``exact_match``),
``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` (Jinja or a column), ``metric_list``,
``filter_list``, ``include`` and ``!function``. The library itself (``lm_eval.simple_evaluate``) does
the prompting and scoring, on an ``HFLM`` wrapping the model as :func:`nexus_core.models.io.load_causal_lm`
loads it — an adapter merged, an INT8 variant through its INT8 runtime, as the predict step does.

Offline by construction: a task naming a hub dataset is refused before anything runs, the data files
are hashed into the cache key, and the datasets cache lives in the step's work dir.

Writes ``data.parquet`` (task, metric, filter, value, stderr, n, output_type), ``harness.json`` (the
per-task summary the report and the leaderboard read), ``results.json`` (lm-eval's own results, configs,
versions and sample counts) and ``samples.jsonl`` (each document's prompt, target, responses, metrics).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import model as model_dir
from nexus_core.contract import step
from nexus_core.errors import ConfigError, InputError
from nexus_core.io import schema_of, write_jsonl, write_parquet
from nexus_core.runner import Cost, StepResult

# datasets' packaged builders: they read the data files given and nothing else
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
INSTALL_HINT = "pip install -e '.[eval]'"


class HarnessConfig(NexusModel):
    """Which lm-evaluation-harness tasks to run, and how."""

    tasks: list[ConfigPath] = Field(min_length=1, description="lm-evaluation-harness task YAML files with local "
                                                              "data_files (relative to the task file)")
    limit: int | None = Field(default=None, ge=1, description="Only the first N documents of each task (None: all)")
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples; None keeps each task's own "
                                                                    "(0 where it sets none)")
    batch_size: int = Field(default=8, ge=1, description="Requests scored or generated together")
    max_length: int | None = Field(default=None, ge=16, description="Context the harness truncates to (None: the "
                                                                    "model's own)")
    apply_chat_template: bool = Field(default=False, description="Format prompts with the tokenizer's chat template "
                                                                 "(off, lm-eval's default, keeps scores comparable)")
    bootstrap_iters: int = Field(default=1000, ge=0, description="Bootstrap draws for the stderr of metrics without "
                                                                 "a closed form; 0 computes no stderr at all")
    dtype: str = Field(default="float32", description="torch dtype to load the model in")
    seed: int = Field(default=0, description="Seed of python, numpy, torch and the few-shot sampler")


class HarnessResult(StepResult):
    """Each task's metrics: ``tasks[task][metric] = value`` (``metric,filter`` where a filter named it)."""

    tasks: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    n: dict[str, int] = Field(default_factory=dict, description="Documents scored per task")
    library: str = Field(default="", description="lm_eval version that scored them")


# ---------------------------------------------------------------- task files (read without lm_eval)


class _TaskLoader(yaml.SafeLoader):
    """YAML loader that keeps lm-eval's ``!function module.name`` tags as text (for checks and hashing)."""


def _function_tag(loader: yaml.SafeLoader, node: Any) -> str:
    return f"!function {loader.construct_scalar(node)}"


_TaskLoader.add_constructor("!function", _function_tag)


def read_task_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config of a harness task file, its ``include``s merged (its own keys win), ``!function``
    kept as text. InputError when it cannot be read or names a dataset that is not local."""
    p = Path(path).resolve()
    if p in _seen:
        raise InputError(f"{p}: include cycle ({' → '.join(str(s) for s in _seen)})")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise InputError(f"harness task file not found: {p}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{p}: not a readable task file ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: a task file is a mapping (task:, dataset_path:, ...), got {type(data).__name__}")
    includes = data.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes or []:
        merged.update(read_task_file(p.parent / inc, (*_seen, p)))
    merged.update(data)
    if not _seen:
        _check_local(merged, p)
    return merged


def _check_local(cfg: dict[str, Any], path: Path) -> None:
    if not isinstance(cfg.get("task"), str):
        raise InputError(f"{path}: `task:` must name one task (groups and task lists are not supported here)")
    source = cfg.get("dataset_path")
    if source not in LOCAL_BUILDERS and not (isinstance(source, str) and (path.parent / source).is_dir()):
        raise InputError(f"{path}: dataset_path {source!r} is not local; evaluation runs offline: use "
                         f"dataset_path: json (or {', '.join(sorted(LOCAL_BUILDERS - {'json'}))}) with "
                         f"dataset_kwargs.data_files beside the task file")
    if source in LOCAL_BUILDERS and not data_files(cfg, path):
        raise InputError(f"{path}: dataset_path: {source} needs dataset_kwargs.data_files (local files)")


def data_files(cfg: dict[str, Any], path: Path) -> list[Path]:
    """The data files a task config names, resolved against its task file's directory."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files] if files else []
    flat = [v for value in values for v in ([value] if isinstance(value, str) else value)]
    return [(path.parent / f).resolve() for f in flat]


def _functions(value: Any) -> list[str]:
    """Modules named by ``!function module.name`` tags anywhere in a loaded task file."""
    if isinstance(value, str):
        return [value.split()[1].rsplit(".", 1)[0]] if value.startswith("!function ") else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [m for v in items for m in _functions(v)]


def task_files(path: str | Path) -> list[Path]:
    """Every file a task reads: the task file, its includes, their ``!function`` modules and its data."""
    p = Path(path).resolve()
    cfg = read_task_file(p)  # checks it (and that its includes load) first
    out, todo = [], [p]
    while todo:
        cur = todo.pop()
        raw = yaml.load(cur.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader
        out += [cur, *(cur.parent / f"{m.replace('.', '/')}.py" for m in sorted(set(_functions(raw))))]
        incs = raw.get("include")
        todo += [(cur.parent / i).resolve() for i in ([incs] if isinstance(incs, str) else incs or [])]
    if cfg.get("dataset_path") not in LOCAL_BUILDERS:  # a local dataset directory
        return [*out, p.parent / cfg["dataset_path"]]
    return [*out, *data_files(cfg, p)]


def harness_files(cfg: HarnessConfig) -> list[Path]:
    """Every file the configured tasks read (the step's cache key hashes them). One InputError naming
    every problem: a task file that cannot be used, a file it names that is missing, a task named twice."""
    files: list[Path] = []
    problems: list[str] = []
    names: dict[str, str] = {}
    for t in cfg.tasks:
        try:
            name, listed = read_task_file(t)["task"], task_files(t)
        except InputError as exc:
            problems.append(str(exc))
            continue
        if name in names:
            problems.append(f"task {name!r} is defined twice ({names[name]}, {t})")
        names[name] = t
        problems += [f"{t}: file not found: {f}" for f in listed if not f.exists()]
        files += listed
    if problems:
        raise InputError("; ".join(problems))
    return files


def harness_problems(cfg: HarnessConfig | None) -> list[str]:
    """What stops the harness step before anything runs, beyond its files: the library is missing."""
    if cfg is not None and importlib.util.find_spec("lm_eval") is None:
        return [f"harness: needs lm-evaluation-harness (lm_eval), not installed here: {INSTALL_HINT}"]
    return []


# ---------------------------------------------------------------- results


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it computed no stderr
        return None
    return None if math.isnan(f) else f


def summarize(results: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """lm-eval's results → ``{task: {file, output_type, n, num_fewshot, version, metrics: {name: {value,
    stderr}}}}``; a metric is named ``metric`` under the ``none`` filter, else ``metric,filter``."""
    tasks = {}
    for task, values in results["results"].items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else key
            metrics[name] = {"value": _num(value), "stderr": _num(values.get(f"{metric}_stderr,{filt}"))}
        config = results["configs"].get(task, {})
        tasks[task] = {"file": files.get(task), "output_type": config.get("output_type"),
                       "n": int(results["n-samples"][task]["effective"]), "num_fewshot": results["n-shot"].get(task),
                       "version": results["versions"].get(task), "metrics": metrics}
    return tasks


def metric_key(task: str, metric: str) -> str:
    """``harness.<task>.<metric>`` in the characters MLflow accepts (``metric,filter`` → ``metric.filter``)."""
    return re.sub(r"[^\w.\- /:]", "_", f"harness.{task}.{metric.replace(',', '.')}")


# ---------------------------------------------------------------- the step


@step(area="evaluate", inputs={"model": model_dir(description="the model under evaluation")},
      reads=lambda cfg, inputs: harness_files(cfg))
def run_harness(cfg: HarnessConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                ctx: StepContext) -> HarnessResult:
    """Run the configured harness tasks on ``inputs['model']`` with lm-eval; write the tables above."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml  # resolves include and !function as lm-eval does
    except ImportError as exc:
        raise ConfigError([f"harness: needs lm-evaluation-harness ({INSTALL_HINT}): {exc}"]) from None
    from nexus_core.models.io import load_causal_lm

    harness_files(cfg)  # every task local and named once, before the model loads
    configs, by_task = [], {}
    for path in cfg.tasks:
        task = load_yaml(path)
        resolved = [str(f) for f in data_files(task, Path(path))]
        kwargs = dict(task.get("dataset_kwargs") or {})
        if resolved:  # absolute, so they do not depend on the working directory
            files_cfg = kwargs["data_files"]
            kwargs["data_files"] = ({k: _absolute(v, Path(path)) for k, v in files_cfg.items()}
                                    if isinstance(files_cfg, dict) else _absolute(files_cfg, Path(path)))
        elif task.get("dataset_path") not in LOCAL_BUILDERS:
            task["dataset_path"] = str(Path(path).parent / task["dataset_path"])
        kwargs["cache_dir"] = str(ctx.work_dir / "hf_datasets")
        configs.append({**task, "dataset_kwargs": kwargs})
        by_task[task["task"]] = _relative(path)

    model, tokenizer = load_causal_lm(inputs["model"].path, dtype=cfg.dtype, int8=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # a task's max_gen_toks bounds its answers: lm-eval passes it as max_length, which a max_new_tokens
    # saved in the model's generation config would override (answers longer than the task allows)
    model.generation_config.max_new_tokens = None
    # lm-eval's decorators hide these signatures from type checkers: call them as Any
    hflm: Any = HFLM
    simple_evaluate: Any = lm_eval.simple_evaluate
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
    ctx.progress(0, len(configs), f"lm-eval: {len(configs)} task(s)")
    results = simple_evaluate(
        model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False), num_fewshot=cfg.num_fewshot,
        limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters, apply_chat_template=cfg.apply_chat_template,
        log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed)
    if results is None:  # only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm_eval returned no results (not rank 0)")
    ctx.progress(len(configs), len(configs), f"lm-eval: {len(configs)} task(s) scored")

    summary = summarize(results, by_task)
    version = f"lm_eval {importlib.metadata.version('lm_eval')}"
    out = Path(out_uri)
    rows = [{"task": task, "metric": name.split(",")[0], "filter": name.split(",", 1)[1] if "," in name else "none",
             "value": m["value"], "stderr": m["stderr"], "n": s["n"], "output_type": s["output_type"]}
            for task, s in summary.items() for name, m in s["metrics"].items()]
    table = pl.DataFrame(rows, schema={"task": pl.String, "metric": pl.String, "filter": pl.String,
                                       "value": pl.Float64, "stderr": pl.Float64, "n": pl.Int64,
                                       "output_type": pl.String})
    write_parquet(table, out / "data.parquet")
    atomic_write_json(out / "harness.json", {"library": version, "tasks": summary})
    atomic_write_json(out / "results.json", json.loads(json.dumps(
        {k: results.get(k) for k in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")},
        default=str)))
    write_jsonl([{"task": task, **_sample(s)} for task, samples in (results.get("samples") or {}).items()
                 for s in samples], out / "samples.jsonl")
    values = {task: {name: m["value"] for name, m in s["metrics"].items()} for task, s in summary.items()}
    metrics = {metric_key(task, name): v for task, ms in values.items() for name, v in ms.items() if v is not None}
    return HarnessResult(rows=table.height, columns=schema_of(table), tasks=values, library=version,
                         n={task: s["n"] for task, s in summary.items()}, metrics=metrics,
                         cost=Cost(provider="local", model=inputs["model"].path.name))


def _absolute(value: str | list[str], task_file: Path) -> str | list[str]:
    if isinstance(value, str):
        return str((task_file.parent / value).resolve())
    return [str((task_file.parent / v).resolve()) for v in value]


def _relative(path: str) -> str:
    from nexus_core.config import repo_root

    root = str(repo_root())
    return str(Path(path).relative_to(root)) if path.startswith(root + "/") else path


def _sample(s: dict[str, Any]) -> dict[str, Any]:
    """One logged document as plain JSON: its prompt, target, raw and filtered responses, metrics."""
    metrics = {m: _num(s.get(m)) for m in s.get("metrics", [])}
    args = s.get("arguments") or []
    return json.loads(json.dumps({
        "doc_id": s.get("doc_id"), "filter": s.get("filter"), "prompt": args[0][0] if args else None,
        "choices": [a[1] for a in args] if len(args) > 1 else None, "target": s.get("target"),
        "resps": s.get("resps"), "filtered_resps": s.get("filtered_resps"), "metrics": metrics,
        "doc": s.get("doc")}, default=str))
