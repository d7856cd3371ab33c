"""YAML configs: ``extends``, deep merge, ``a.b=c`` overrides, ``${ENV}`` interpolation, pydantic.

A config file may name one or more parents with ``extends:`` (paths relative to the file). Parents
are merged first, the child on top; mappings merge key by key, everything else is replaced.
``${NAME}`` and ``${NAME:-default}`` in strings are read from the environment. Validation collects
every problem and raises one :class:`ConfigError` naming the file and each dotted key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nexus_core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECRET_SUFFIXES = ("api_key", "apikey", "secret", "password", "auth_token", "access_token", "hf_token")


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
    """Read a YAML mapping, resolving ``extends`` recursively (no interpolation yet)."""
    path = Path(path).resolve()
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
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_yaml(path.parent / parent, (*_seen, path)))
    return deep_merge(merged, data)


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


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate ``data`` into ``model``, raising one ConfigError listing every problem by dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{_loc(err['loc'])}: {msg}")
        raise ConfigError(problems, source) from None


def load_config(
    path: str | Path | None,
    model: type[M],
    overrides: list[str] | tuple[str, ...] = (),
    section: str | None = None,
) -> M:
    """Load ``path`` (with extends), apply ``key=value`` overrides and env interpolation, validate.

    ``section`` picks one top-level key (e.g. a flow config that holds several steps) before
    validation. ``path=None`` validates overrides alone against the model's defaults.
    """
    source = str(path) if path else "defaults"
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    problems: list[str] = []
    data = _interpolate(data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    if section is not None:
        data = data.get(section, {})
    return validate(model, data, source)


def redact(value: Any) -> Any:
    """Copy of a plain config mapping with secret-looking keys replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: ("***" if str(k).lower().endswith(SECRET_SUFFIXES) and v else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def config_dict(cfg: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready, redacted mapping of a config (what manifests and MLflow params get)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return redact(data)


def runtime_field(default: Any, description: str, **kwargs: Any) -> Any:
    """A config field that tunes how a step runs, not what it produces (worker counts, log intervals):
    left out of cache keys, so changing it reuses finished results."""
    return Field(default, description=description, json_schema_extra={"nexus_runtime": True}, **kwargs)


def _without_runtime(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("nexus_runtime"):
                continue
            out[name] = _without_runtime(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {k: _without_runtime(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_runtime(v) for v in value]
    return value


def config_hash(cfg: BaseModel | dict[str, Any], exclude: set[str] | frozenset[str] = frozenset(),
                runtime: bool = True) -> str:
    """Stable sha256 of a config (top-level keys in ``exclude`` left out), 16 hex chars.

    ``runtime=False`` also leaves out fields declared with :func:`runtime_field` (cache keys).
    """
    if isinstance(cfg, BaseModel):
        data = cfg.model_dump(mode="json")
        if not runtime:
            from pydantic_core import to_jsonable_python

            data = to_jsonable_python(_without_runtime(cfg))
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
    """Flow config base: ``extends`` loads a YAML preset (with its own extends) under the given values."""

    extends: str | None = Field(None, description="YAML preset this config starts from (path from repo root)")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides applied last")
    budget_usd: float | None = Field(None, ge=0, description="Spend limit for one run of this flow (API + GPU); "
                                     "steps refuse to start once it is used up")

    @model_validator(mode="before")
    @classmethod
    def _resolve_extends(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("extends"):
            base = load_yaml(data["extends"])
            base.pop("overrides", None)
            data = deep_merge(base, data)
        if data.get("overrides"):
            data = deep_merge(data, parse_overrides(data["overrides"]))
        return data
