"""YAML configs: ``extends``, deep merge, ``a.b=c`` overrides, ``${ENV}`` interpolation, pydantic.

One loader serves every entry point: ``nexus run`` and ``python -m flows.X`` (:func:`load_config`),
deployment parameters such as ``{"extends": "configs/presets/tiny.yaml", "overrides": [...]}``
(:class:`FlowConfig`'s validator) and tests. The rules:

- ``extends:`` names one or more parent files, at the top of a file or inside any section. Parents are
  merged first, the mapping that names them on top; mappings merge key by key, everything else is
  replaced. A relative ``extends`` is relative to the file that names it; one that no file names (a
  deployment parameter) is relative to the repository root.
- ``${NAME}`` and ``${NAME:-default}`` in strings are read from the environment, wherever the value
  came from (file, override or parameter).
- Fields typed :data:`ConfigPath` (or :data:`PathOrName`) are paths: a relative one is resolved against
  the repository root, the directory holding the ``configs/`` directory the config file lies in (for a
  file elsewhere, a parameter or an override: :func:`repo_root`). So a shipped config means the same
  files whatever the working directory. In JSON (manifests, cache keys, Prefect parameters) a path under
  the repository root is written relative to it again, so nothing machine-specific enters a cache key.
- Validation collects every problem and raises one :class:`ConfigError` naming the file and each
  dotted key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from nexus_core.errors import ConfigError
from nexus_core.secrets import is_secret_name, redact_value

M = TypeVar("M", bound=BaseModel)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# key of the validation context entry that carries the root relative config paths are resolved against
_ROOT = "nexus_config_root"


def repo_root() -> Path:
    """The repository root for paths no config file places: ``NEXUS_REPO`` if set (``make up`` sets it
    for deployments), else the checkout this code is imported from when it holds ``configs/``, else the
    working directory."""
    if os.environ.get("NEXUS_REPO"):
        return Path(os.environ["NEXUS_REPO"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "configs").is_dir() else Path.cwd()


def config_root(path: str | Path) -> Path:
    """The root relative paths in config file ``path`` are resolved against: the directory holding the
    ``configs/`` directory the file lies in, else :func:`repo_root` (a config file kept elsewhere)."""
    for parent in Path(path).resolve().parents:
        if parent.name == "configs":
            return parent.parent
    return repo_root()


def _context_root(info: ValidationInfo | None) -> Path:
    context = info.context if info is not None else None
    return Path(context[_ROOT]) if isinstance(context, dict) and context.get(_ROOT) else repo_root()


def _resolve_path(value: str, info: ValidationInfo) -> str:
    text = os.path.expanduser(value)
    if not text or "://" in text or os.path.isabs(text):  # unset, a URI (s3://, hf://), or absolute
        return text
    return os.path.normpath(_context_root(info) / text)


def _resolve_existing_path(value: str, info: ValidationInfo) -> str:
    resolved = _resolve_path(value, info)
    return resolved if resolved == value or os.path.exists(resolved) else value


def _path_json(value: str) -> str:
    # relative to the repository root again, so manifests and cache keys are the same on every machine
    root = str(repo_root())
    return os.path.relpath(value, root) if value.startswith(root + os.sep) else value


ConfigPath = Annotated[str, AfterValidator(_resolve_path), PlainSerializer(_path_json, when_used="json")]
"""A config field that is a file or directory path. A relative value is resolved against the repository
root (see the module docstring), so ``cfg.field`` is an absolute path whatever the working directory;
its JSON form is relative to the root again. A relative *default* is resolved too only when the field
says ``Field(..., validate_default=True)``."""

PathOrName = Annotated[str, AfterValidator(_resolve_existing_path),
                       PlainSerializer(_path_json, when_used="json")]
"""A config field that is a path *or* a name (an artifact spec ``NAME@vN``, a hub id, a stage name): a
relative value is resolved like :data:`ConfigPath` only when that file or directory exists; otherwise
it is kept as written, for the name lookup."""


class NexusModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``over`` merged on top: mappings recursively, other values replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def interpolate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``data`` with ``${NAME}`` / ``${NAME:-default}`` in every string replaced from the environment.

    Raises one ConfigError listing every variable that is unset and has no default.
    """
    problems: list[str] = []
    out = _interpolate(data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return out


def _interpolate(value: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{where}: environment variable ${{{name}}} is not set")
        return m.group(0)

    return _ENV.sub(repl, value)


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping with every ``extends`` in it merged (at any depth; relative to this file).

    No interpolation yet: :func:`load_data` does that once overrides are in.
    """
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError([f"extends: cycle {chain}"], str(path))
    if not path.is_file():
        where = f" (extended by {_seen[-1]})" if _seen else ""
        raise ConfigError([f"file not found{where}"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    return merge_extends(data, path.parent, str(path), (*_seen, path))


def merge_extends(data: dict[str, Any], base: Path, source: str = "config",
                  _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``data`` with each ``extends`` in it, at any depth, replaced by the files it names merged underneath.

    A relative ``extends`` is relative to ``base`` (the directory of the file that names it).
    """
    out = {key: merge_extends(value, base, source, _seen) if isinstance(value, dict) else value
           for key, value in data.items() if key != "extends"}
    parents = data.get("extends") or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError([f"extends: expected a file or a list of files, got {parents!r}"], source)
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_yaml(base / Path(parent).expanduser(), _seen))
    return deep_merge(merged, out)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is both a value and a mapping")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "command line")
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(model: type[M], data: dict[str, Any], source: str = "config", root: Path | None = None) -> M:
    """Validate ``data`` into ``model``, raising one ConfigError listing every problem by dotted key.

    ``root`` is what relative :data:`ConfigPath` values are resolved against (default :func:`repo_root`).
    A secret-named key given a value (``api_key: sk-...``) is an error (:func:`reject_secrets`).
    """
    reject_secrets(data, source)
    try:
        return model.model_validate(data, context={_ROOT: str(root)} if root else None)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{_loc(err['loc'])}: {msg}")
        raise ConfigError(problems, source) from None


def load_data(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The plain mapping a config file stands for: ``path`` with its extends, then ``key=value``
    overrides, then ``${VAR}`` interpolation. ``path=None``: the overrides alone."""
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return interpolate(data, str(path) if path else "command line")


def load_config(
    path: str | Path | None,
    model: type[M],
    overrides: list[str] | tuple[str, ...] = (),
    section: str | None = None,
) -> M:
    """Load ``path`` (with extends), apply ``key=value`` overrides and env interpolation, validate.

    ``section`` picks one top-level key (e.g. a flow config that holds several steps) before
    validation. ``path=None`` validates overrides alone against the model's defaults. Relative paths
    are resolved against the root of ``path`` (:func:`config_root`).
    """
    data = load_data(path, overrides)
    if section is not None:
        data = data.get(section, {})
    return validate(model, data, str(path) if path else "defaults", config_root(path) if path else None)


def redact(value: Any) -> Any:
    """Copy of a plain config mapping with secrets replaced by ``***``: the value of every key that looks
    like a secret (:func:`nexus_core.secrets.is_secret_name`: ``api_key``, ``aws_secret_access_key``,
    ``authorization``, ``passwd``, ``api-key``, ... any case, ``-`` and ``_`` alike), and any string holding
    the value of a secret-looking environment variable."""
    if isinstance(value, dict):
        return {k: ("***" if is_secret_name(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_value(value)
    return value


def secret_problems(data: Any, where: str = "") -> list[str]:
    """One problem per secret-named key of ``data`` (at any depth) given a literal value. Keys belong in
    environment variables; a config names the variable (``api_key_env``). The value is never quoted."""
    problems: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{where}.{key}" if where else str(key)
            if is_secret_name(str(key)) and value not in (None, "", {}, []) and not isinstance(value, dict | bool):
                problems.append(f"{name}: looks like a secret; configs must not hold keys (they end up in "
                                f"manifests, logs and Prefect's flow-run parameters). Put the key in an "
                                f"environment variable and name it with api_key_env (e.g. api_key_env: "
                                f"OPENAI_API_KEY)")
            else:
                problems.extend(secret_problems(value, name))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            problems.extend(secret_problems(value, f"{where}[{i}]"))
    return problems


def reject_secrets(data: Any, source: str = "config") -> None:
    """Raise one ConfigError naming every secret-named key of ``data`` given a literal value
    (:func:`secret_problems`)."""
    problems = secret_problems(data)
    if problems:
        raise ConfigError(problems, source)


def config_dict(cfg: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready, redacted mapping of a config (what manifests and MLflow params get)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return redact(data)


def runtime_field(default: Any, description: str, **kwargs: Any) -> Any:
    """A config field that tunes how a step runs, not what it produces (worker counts, log intervals):
    left out of cache keys, so changing it reuses finished results."""
    return Field(default=default, description=description, json_schema_extra={"nexus_runtime": True}, **kwargs)


RESUME_NEUTRAL: dict[str, Any] = {"nexus_resume_neutral": True}
"""``json_schema_extra`` of a config field that changes a step's result but not whether its checkpoints
still apply (how long it trains, how many processes share the batch, how often it checkpoints): kept
in the cache key, left out of the work-dir key (:func:`nexus_core.cachekey.resume_key`), so a killed
run re-started with another value continues from its checkpoints. Runtime fields are left out of both."""


def _without_flagged(value: Any, dumped: Any, flags: tuple[str, ...]) -> Any:
    """``dumped`` (the JSON dump of ``value``) less the fields whose ``json_schema_extra`` sets any of
    ``flags`` (``nexus_runtime``: :func:`runtime_field`; ``nexus_resume_neutral``: :data:`RESUME_NEUTRAL`),
    at any depth. Walking the dump keeps each field's JSON form (a :data:`ConfigPath` relative to the root)."""
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        out = {}
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra
            if name not in dumped or (isinstance(extra, dict) and any(extra.get(f) for f in flags)):
                continue
            out[name] = _without_flagged(getattr(value, name), dumped[name], flags)
        return out
    if isinstance(value, dict) and isinstance(dumped, dict) and len(value) == len(dumped):
        return {key: _without_flagged(v, d, flags)
                for v, (key, d) in zip(value.values(), dumped.items(), strict=True)}
    if isinstance(value, list | tuple) and isinstance(dumped, list) and len(value) == len(dumped):
        return [_without_flagged(v, d, flags) for v, d in zip(value, dumped, strict=True)]
    return dumped


def config_hash(cfg: BaseModel | dict[str, Any], exclude: set[str] | frozenset[str] = frozenset(),
                runtime: bool = True, resume_neutral: bool = True) -> str:
    """Stable sha256 of a config (top-level keys in ``exclude`` left out), 16 hex chars.

    ``runtime=False`` also leaves out fields declared with :func:`runtime_field` (cache keys);
    ``resume_neutral=False`` also those marked :data:`RESUME_NEUTRAL` (work-dir keys).
    """
    if isinstance(cfg, BaseModel):
        data = cfg.model_dump(mode="json")
        flags = (() if runtime else ("nexus_runtime",)) + (() if resume_neutral else ("nexus_resume_neutral",))
        if flags:
            data = _without_flagged(cfg, data, flags)
    else:
        data = dict(cfg)
    data = {k: v for k, v in data.items() if k not in exclude}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


class FlowConfig(NexusModel):
    """Flow config base. As a deployment parameter it can start from a preset and override fields:
    ``{"extends": "configs/presets/tiny.yaml", "overrides": ["name=t2"], ...}`` goes through the same
    loader as a config file (extends, overrides, ``${VAR}``; see the module docstring)."""

    extends: str | None = Field(default=None, description="YAML preset this config starts from (relative to the repo root); "
                                "merged in and cleared during validation")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides applied last")
    budget_usd: float | None = Field(default=None, ge=0, description="Spend limit for one run of this flow (API + GPU); "
                                     "steps refuse to start once it is used up")
    dry_run: bool = Field(default=False, description="Check every stage's inputs and config files and print the plan; "
                                             "run nothing")

    @model_validator(mode="before")
    @classmethod
    def _resolve_extends(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        source = f"{cls.__name__} parameters"
        data = merge_extends(data, _context_root(info), source)
        if data.get("overrides"):
            data = deep_merge(data, parse_overrides(data["overrides"]))
        data = interpolate(data, source)
        reject_secrets(data, source)  # a deployment parameter or its preset: no key reaches the flow run
        return data
