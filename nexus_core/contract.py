"""Step contracts: what a step reads and writes, declared next to the step and checked before work.

A step module marks its ``run_<step>`` function with :func:`step`::

    @step(area="distill", inputs={"collected": table("response", "prompt")},
          reads=lambda cfg, inputs: [cfg.rules])
    def run_distill_filters(cfg: FiltersConfig, *, inputs, out_uri, ctx) -> FiltersResult: ...

The runner reads the contract to (1) check every input before any work — a missing input, a table
without the columns, a model directory without ``config.json`` — and (2) build the cache key: the
files named by ``reads`` (rules, templates, rubric, caption files, images) join it by content digest.
A dry run calls :func:`check_inputs` for every stage of a flow before the first one starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from nexus_core.artifacts import MANIFEST, ArtifactRef
from nexus_core.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])
ReadsFn = Callable[[Any, dict[str, ArtifactRef]], Iterable[str | Path | None]]


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a step."""

    kind: Literal["table", "model", "dir", "file", "any"] = "any"
    one_of: tuple[tuple[str, ...], ...] = ()
    optional: bool = False
    description: str = ""

    def describe(self) -> str:
        """Human text of what this input must be, for error messages."""
        if self.kind == "table" and self.one_of:
            return "a table with column(s) " + " or ".join("/".join(c) for c in self.one_of)
        return {"table": "a table", "model": "a Hugging Face model directory (config.json)", "dir": "a directory",
                "file": "a file", "any": "an artifact"}[self.kind]


def table(*columns: str, one_of: Iterable[Iterable[str]] = (), optional: bool = False,
          description: str = "") -> InputSpec:
    """A table input that has all of ``columns``, or one of the column sets in ``one_of``."""
    layouts = tuple(tuple(c) for c in one_of) or ((tuple(columns),) if columns else ())
    return InputSpec("table", layouts, optional, description)


def model(optional: bool = False, description: str = "") -> InputSpec:
    """A model directory input (``config.json`` at its root)."""
    return InputSpec("model", (), optional, description)


def directory(optional: bool = False, description: str = "") -> InputSpec:
    """Any directory input (an image folder, a pipeline, precomputed shards)."""
    return InputSpec("dir", (), optional, description)


def anything(optional: bool = False, description: str = "") -> InputSpec:
    """An input whose shape the step checks itself."""
    return InputSpec("any", (), optional, description)


@dataclass(frozen=True)
class StepContract:
    """What a step declares: its area and artifact kind, its inputs, and the files its config names."""

    area: str
    kind: str = "dataset"
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    reads: ReadsFn | None = None
    outputs: tuple[str, ...] = ()

    def files_read(self, cfg: Any, inputs: dict[str, ArtifactRef]) -> list[Path]:
        """The files (or directories) the step reads besides its inputs, as named by its config."""
        if self.reads is None:
            return []
        return [Path(p) for p in self.reads(cfg, inputs) if p]


def step(*, area: str, kind: str = "dataset", inputs: dict[str, InputSpec] | None = None,
         reads: ReadsFn | None = None, outputs: Iterable[str] = ()) -> Callable[[F], F]:
    """Declare a step's contract on its ``run_<step>`` function (the function itself is unchanged)."""
    contract = StepContract(area=area, kind=kind, inputs=dict(inputs or {}), reads=reads, outputs=tuple(outputs))

    def mark(fn: F) -> F:
        fn.__nexus_contract__ = contract  # type: ignore[attr-defined]
        return fn

    return mark


def contract_of(fn: Callable[..., Any]) -> StepContract:
    """The contract declared on a step function; a TypeError if it has none (a programming error)."""
    contract = getattr(fn, "__nexus_contract__", None)
    if contract is None:
        raise TypeError(f"{fn.__module__}.{fn.__name__} is not a step (no @step contract)")
    return contract


# ---------------------------------------------------------------- checks before work


def columns_of(ref: ArtifactRef) -> list[str] | None:
    """Column names of a table input without loading it (parquet schema, first JSONL row); None if
    the input is not a table we can read cheaply."""
    path = ref.path
    if path.is_dir():
        m = path / MANIFEST
        if m.is_file():
            schema = json.loads(m.read_text(encoding="utf-8")).get("schema")
            if schema:
                return list(schema)
        for name in ("data.parquet", "data.jsonl"):
            if (path / name).is_file():
                return columns_of(ref.model_copy(update={"uri": str(path / name)}))
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means the file is unreadable
            raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    if path.suffix in {".jsonl", ".zst", ".json"}:
        from nexus_core.io import iter_jsonl

        for row in iter_jsonl(path):
            return list(row)
        raise InputError(f"{path}: empty table")
    return None


def input_problems(fn: Callable[..., Any], inputs: Mapping[str, ArtifactRef | None],
                   partial: bool = False) -> list[str]:
    """Every way ``inputs`` break the step's contract (empty when they fit). Reads no more than schemas.

    ``partial``: only check the inputs given (a flow's plan, where earlier stages make the rest).
    """
    contract = contract_of(fn)
    name = fn.__name__.removeprefix("run_")
    problems = []
    for key, spec in contract.inputs.items():
        ref = inputs.get(key)
        if ref is None:
            if not spec.optional and not partial:
                problems.append(f"{name}: missing input {key!r} ({spec.describe()})")
            continue
        path = ref.path
        where = f"{name}: input {key!r} ({path})"
        if not path.exists():
            problems.append(f"{where}: does not exist")
        elif spec.kind == "model" and not (path / "config.json").is_file():
            problems.append(f"{where}: not a Hugging Face model directory (no config.json)")
        elif spec.kind == "dir" and not path.is_dir():
            problems.append(f"{where}: not a directory")
        elif spec.kind == "file" and not path.is_file():
            problems.append(f"{where}: not a file")
        elif spec.kind == "table" and spec.one_of:
            try:
                cols = columns_of(ref)
            except InputError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if cols is not None and not any(all(c in cols for c in layout) for layout in spec.one_of):
                problems.append(f"{where}: needs {spec.describe()}; has: {', '.join(cols) or 'no columns'}")
    return problems


def check_inputs(fn: Callable[..., Any], inputs: Mapping[str, ArtifactRef | None]) -> None:
    """Raise one InputError listing every contract problem of ``inputs`` (nothing when they fit)."""
    problems = input_problems(fn, inputs)
    if problems:
        raise InputError(problems[0] if len(problems) == 1 else "\n  - ".join(["inputs do not fit:", *problems]))


def plan_problems(fn: Callable[..., Any], cfg: Any, inputs: Mapping[str, ArtifactRef | None],
                  label: str | None = None) -> list[str]:
    """What would stop a planned step: the inputs known now break its contract, or a file its config
    names is missing. Flows call this for every stage before the first one starts."""
    known: dict[str, ArtifactRef | None] = {k: v for k, v in inputs.items() if v is not None}
    problems = input_problems(fn, known, partial=True)
    try:
        files = contract_of(fn).files_read(cfg, {k: v for k, v in known.items() if v is not None})
    except (OSError, ValueError, InputError) as exc:
        files, problems = [], [*problems, f"{fn.__name__.removeprefix('run_')}: {exc}"]
    problems += [f"{fn.__name__.removeprefix('run_')}: file not found: {p}" for p in files if not p.exists()]
    return [f"{label}: {p}" for p in problems] if label else problems


def check_plan(planned: Iterable[tuple[Callable[..., Any], Any, dict[str, ArtifactRef | None], str]]) -> None:
    """Raise one InputError listing every problem of every planned ``(step, cfg, inputs, label)``."""
    problems = [p for fn, cfg, inputs, label in planned for p in plan_problems(fn, cfg, inputs, label)]
    if problems:
        raise InputError("\n  - ".join(["the run cannot start:", *problems]))
