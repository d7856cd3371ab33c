"""Option tables for the README, generated from the config models so they cannot drift.

    python -m nexus_core.config_docs flows.flux:FluxConfig                      # print the table
    python -m nexus_core.config_docs flows.flux:FluxConfig --write README.md    # replace the marked block
    python -m nexus_core.config_docs flows.flux:FluxConfig --check README.md    # exit 1 when out of date

:func:`options_table` walks a pydantic model's fields in declaration order; a nested model (a config
section) becomes dotted keys (``train.lora.rank``), a list of models ``key[].field``. Each row is
``key | default | description``: defaults as YAML writes them (``null``, ``true``, ``[9, 18, 27]``), a
section as ``(section)``, a field without a default as ``required``; the allowed values of a ``Literal``
field are added when the description does not list them; fields declared with
:func:`nexus_core.config.runtime_field` are marked *runtime* (they do not enter cache keys).

In a Markdown file the table lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; ``NAME``
defaults to ``<module tail>-options`` (``flux-options`` for ``flows.flux:FluxConfig``).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

RUNTIME_NOTE = " *(runtime: not in cache keys)*"


def _section(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(model class, optional, list of models) when ``annotation`` is a config section, else (None, …)."""
    optional = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        if len(args) != 1:
            return None, optional, False
        annotation = args[0]
    is_list = get_origin(annotation) is list
    if is_list:
        (annotation,) = get_args(annotation) or (Any,)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, optional, is_list
    return None, optional, False


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else []."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [c for a in get_args(annotation) for c in _choices(a)]
    return [_yaml(c) for c in get_args(annotation)] if get_origin(annotation) is Literal else []


def _yaml(value: Any) -> str:
    """A default as a user would write it in YAML."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value else json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    return f"`{_cell(_yaml(info.get_default(call_default_factory=True)))}`"


def option_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, description)`` for every field of ``model``, sections expanded."""
    rows: list[tuple[str, str, str]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = _cell(info.description or "")
        extra = info.json_schema_extra
        choices = _choices(info.annotation)
        if choices and not all(re.search(rf"(?<![\w.-]){re.escape(c)}(?![\w-])", desc) for c in choices):
            desc += f" (one of: {', '.join(choices)})"
        if isinstance(extra, dict) and extra.get("nexus_runtime"):
            desc += RUNTIME_NOTE
        sub, optional, is_list = _section(info.annotation)
        if sub is None:
            rows.append((key, _default(info), desc))
            continue
        if is_list:
            rows.append((key, _default(info), f"{desc} (a list; each item's keys below)"))
            rows += option_rows(sub, f"{key}[].")
        else:
            rows.append((key, "`null` (section)" if optional else "(section)", desc))
            rows += option_rows(sub, f"{key}.")
    return rows


def options_table(model: type[BaseModel]) -> str:
    """The Markdown table ``key | default | description`` of every option of ``model``."""
    lines = ["| key | default | description |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {desc} |" for key, default, desc in option_rows(model)]
    return "\n".join(lines) + "\n"


def load_model(spec: str) -> type[BaseModel]:
    """``package.module:ClassName`` → the model class."""
    module, _, name = spec.partition(":")
    model = getattr(importlib.import_module(module), name, None) if name else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"{spec!r}: expected module:ClassName naming a pydantic model")
    return model


def default_marker(spec: str) -> str:
    """``flows.flux:FluxConfig`` → ``flux-options``."""
    return spec.partition(":")[0].rsplit(".", 1)[-1] + "-options"


def markers(name: str) -> tuple[str, str]:
    """The start and end comment lines around a generated block."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``name``'s markers replaced by ``body``; raises when a marker is missing."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} … {end} not found (in that order)")
    head = text[: i + len(start)]
    return f"{head}\n{body}{text[j:]}"


def current_block(text: str, name: str) -> str | None:
    """What lies between ``name``'s markers now (None when they are missing)."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    return text[i + len(start) + 1: j] if 0 <= i < j else None


def regenerate_command(spec: str, path: str) -> str:
    """The one command that rewrites the block (for failure messages)."""
    return f"python -m nexus_core.config_docs {spec} --write {path}"


def main(argv: list[str] | None = None) -> int:
    """Print, write or check the option table of a config model."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("model", help="module:ClassName, e.g. flows.flux:FluxConfig")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's table differs from the models")
    ap.add_argument("--marker", default=None, help="block name (default: <module tail>-options)")
    args = ap.parse_args(argv)
    table = options_table(load_model(args.model))
    name = args.marker or default_marker(args.model)
    if args.write:
        path = Path(args.write)
        path.write_text(replace_block(path.read_text(encoding="utf-8"), name, table), encoding="utf-8")
        print(f"{path}: {name} table written ({table.count(chr(10)) - 2} rows)")
    elif args.check:
        if current_block(Path(args.check).read_text(encoding="utf-8"), name) != table:
            print(f"{args.check}: the {name} table is out of date; run: {regenerate_command(args.model, args.check)}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
