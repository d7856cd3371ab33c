"""Cache keys, computed in one place for the runner (manifest reuse) and Prefect (task cache).

A step's key covers everything its result depends on:

- the config hash (fields marked ``runtime`` left out: worker counts, log intervals);
- every input's digest (a model input's digest is its weights digest, or its hub revision);
- the code: the step module's source **and every in-repo module it imports, transitively**
  (found by reading the import statements, so an edit to a helper two imports away misses);
- the content digest of every file the step's contract says it reads (rules, templates, rubric,
  caption files, images);
- ``NEXUS_CACHE_VERSION`` from the environment, to force a miss everywhere by hand.

Nothing about *where* a run happens (run ids, worker counts, paths of the machine) enters it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef, dir_digest, file_sha256
from nexus_core.config import config_hash

REPO_PACKAGES = ("nexus_core",)


def _module_file(name: str, packages: tuple[str, ...] | None = None) -> Path | None:
    """Source file of a module of ``packages``, found on ``sys.path`` without importing anything (None for
    modules outside them and for names that are not modules, like ``pkg.SomeClass``)."""
    parts = name.split(".")
    if parts[0] not in (packages or REPO_PACKAGES):
        return None
    for root in _package_roots(parts[0]):
        base = root.joinpath(*parts[1:]) if len(parts) > 1 else root
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if len(parts) == 1 and candidate.suffix == ".py" and candidate.name != "__init__.py":
                continue
            if candidate.is_file():
                return candidate
    return None


def _package_roots(top: str) -> list[Path]:
    """Directories of the top-level package ``top`` (where it is imported from)."""
    module = sys.modules.get(top)
    if module is not None and getattr(module, "__path__", None):
        return [Path(p) for p in module.__path__]
    return [Path(p) / top for p in sys.path if (Path(p or ".") / top / "__init__.py").is_file()]


@lru_cache(maxsize=4096)
def _imports_of(path: str, mtime_ns: int, size: int, package: str,
                packages: tuple[str, ...]) -> tuple[str, ...]:
    """Module names of ``packages`` a source file imports (at any depth of the file, lazy imports included)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return tuple(sorted(n for n in found if n.split(".")[0] in packages))


def module_closure(module: str, packages: tuple[str, ...] | None = None) -> dict[str, Path]:
    """``module`` and every module of ``packages`` (default: the repo's, ``REPO_PACKAGES``) it imports,
    transitively (with their packages' ``__init__``)."""
    packages = packages or REPO_PACKAGES
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, packages)
        if path is None:
            continue
        seen[name] = path
        stat = path.stat()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(_imports_of(str(path), stat.st_mtime_ns, stat.st_size, package, packages))
        if "." in name:
            todo.append(name.rpartition(".")[0])
    return seen


def code_hash(fn: Callable[..., Any]) -> str:
    """sha256 over the source of the step's module closure (names and contents), 16 hex chars."""
    h = hashlib.sha256()
    for name, path in sorted(module_closure(fn.__module__).items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def files_digest(paths: Iterable[str | Path]) -> dict[str, str]:
    """Content digest of each file or directory read by a step (a missing one is recorded as missing)."""
    out = {}
    for p in paths:
        path = Path(p)
        if path.is_file():
            out[str(p)] = file_sha256(path)
        elif path.is_dir():
            out[str(p)] = dir_digest(path, exclude=())[0]
        else:
            out[str(p)] = "missing"
    return out


def files_read(fn: Callable[..., Any], cfg: Any, inputs: Mapping[str, ArtifactRef | None]) -> dict[str, str]:
    """Content digest of every file step ``fn``'s contract says it reads for ``cfg`` (prompt templates,
    rules, rubrics), in the contract's order: path -> sha256 (manifests keep it for lineage)."""
    from nexus_core.contract import contract_of

    refs = {k: v for k, v in inputs.items() if v is not None}
    return files_digest(contract_of(fn).files_read(cfg, refs))


def step_key(fn: Callable[..., Any], cfg: Any, inputs: Mapping[str, ArtifactRef | None],
             extra: dict[str, Any] | None = None, code: str | None = None,
             files: dict[str, str] | None = None) -> str:
    """The cache key of running step ``fn`` on ``cfg`` and ``inputs`` (see the module docstring).

    ``extra`` holds anything else the caller's result depends on (a task's artifact name); ``code``
    is :func:`code_hash` of ``fn`` and ``files`` is :func:`files_read` when the caller has them already.
    """
    return _key(fn, cfg, inputs, config_hash(cfg, runtime=False), extra, code, files)


def resume_key(fn: Callable[..., Any], cfg: Any, inputs: Mapping[str, ArtifactRef | None],
               code: str | None = None, files: dict[str, str] | None = None) -> str:
    """The key of a step's work dir (where its checkpoints wait for a re-run): :func:`step_key` less
    the config fields marked :data:`~nexus_core.config.RESUME_NEUTRAL` (a training stage's
    ``max_steps``, ``epochs``, ``num_processes``, checkpoint interval). A killed run re-started with
    more steps or another process count finds its checkpoints; anything else that changes the result
    (data, model, method, hyper-parameters, code, files read) starts a new work dir. For a config
    with no such field it equals the step key."""
    return _key(fn, cfg, inputs, config_hash(cfg, runtime=False, resume_neutral=False), None, code, files)


def _key(fn: Callable[..., Any], cfg: Any, inputs: Mapping[str, ArtifactRef | None], config: str,
         extra: dict[str, Any] | None, code: str | None, files: dict[str, str] | None) -> str:
    refs = {k: v for k, v in inputs.items() if v is not None}
    files = files if files is not None else files_read(fn, cfg, refs)
    parts = {
        "step": f"{fn.__module__}.{fn.__name__}",
        "config": config,
        "inputs": {k: v.digest for k, v in sorted(refs.items())},
        "code": code or code_hash(fn),
        # paths are machine-specific: the files' contents count, in the order the contract lists them
        # (so swapping two caption files' texts changes the key)
        "files": list(files.values()),
        "cache_version": os.environ.get("NEXUS_CACHE_VERSION", ""),
        "extra": extra or {},
    }
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
