"""Sort raw dataset files into ``<out>/<capability>/`` by what their keys say they hold.

Behind ``nexus data organize DIR``. Only a little of each file is read: the first rows of JSONL
(also ``.jsonl.gz`` / ``.jsonl.zst`` / ``.ndjson``), the schema and first rows of Parquet, the
document of a ``.json`` file. The first match wins:

- ``video-understanding`` / ``audio-understanding`` / ``vision-qa`` — a ``videos`` / ``audios`` /
  ``images`` column (the media columns of :mod:`nexus_core.train.modalities`); the media files
  themselves are not moved, so point the stage's ``media_dir`` at them
- ``preference`` — ``chosen`` + ``rejected`` (DPO, ORPO, reward)
- ``tools``, ``thinking``, ``reasoning``, ``cot``, ``safety``, ``anti_refusal`` — the capability keys
  of :mod:`nexus_core.train.capabilities`, at the top level or on a ``messages`` entry (``tool_calls``,
  ``reasoning_content``); ``<think>`` in the first rows' text also means ``thinking``
- ``sft`` — ``messages``, ``prompt`` + ``completion`` or ``input`` + ``output``
- ``grpo`` — ``prompt`` or ``input`` without ``completion`` / ``output`` (prompts for RL)
- ``cpt`` — ``text``

A file that cannot be read, or whose keys match none of these, is reported with the reason and left
in place. Nothing is ever overwritten: a destination that already holds the same bytes counts as done
(so re-running is safe), one with other bytes (or claimed by another file of the same run) is a
conflict, reported, and its source is left in place.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus_core.artifacts import atomic_path
from nexus_core.errors import InputError
from nexus_core.io.tables import JSONL_SUFFIXES, iter_jsonl
from nexus_core.train.capabilities import CAPABILITY_KEYS, detect_capability

DATA_SUFFIXES = (".parquet", ".json", *JSONL_SUFFIXES)
SAMPLE_ROWS = 20
MEDIA = [("videos", "video-understanding"), ("audios", "audio-understanding"), ("images", "vision-qa")]


@dataclass
class Placement:
    """One file's verdict: ``status`` is ``copy``/``move`` (to do), ``copied``/``moved`` (done),
    ``present`` (same bytes already there), ``conflict``, ``unknown`` or ``unreadable``."""

    source: Path
    capability: str | None
    reason: str
    status: str
    dest: Path | None = None


def sample_rows(path: Path, n: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """The first ``n`` rows of a data file (Parquet: every column, even if the first rows are null)."""
    if path.name.endswith(".parquet"):
        import polars as pl

        try:
            columns = pl.read_parquet_schema(path)
            rows = pl.scan_parquet(path).head(n).collect().to_dicts()
        except Exception as exc:  # polars raises several error types for corrupt files
            raise InputError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None
        return rows or [dict.fromkeys(columns)]
    if path.name.endswith(".json"):
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        rows = doc[:n] if isinstance(doc, list) else [doc]
        return [r for r in rows if isinstance(r, dict)]
    rows = []
    for row in iter_jsonl(path):
        rows.append(row)
        if len(rows) == n:
            break
    return rows


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = row.get("messages")
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except ValueError:
            return []
    return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []


def _by_capability_keys(keys: set[str], where: str) -> tuple[str, str] | None:
    capability = detect_capability(keys)
    if capability is None:
        return None
    markers = dict(CAPABILITY_KEYS)[capability]
    return capability, f"{where}{next(m for m in markers if m in keys)}"


def classify(rows: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(capability, the key that decided it) of a file's first rows; (None, why) when none fits."""
    keys = {k for r in rows for k, v in r.items() if v is not None} or {k for r in rows for k in r}
    for column, capability in MEDIA:
        if column in keys:
            return capability, f"column {column} (the media files themselves are not moved)"
    if {"chosen", "rejected"} <= keys:
        return "preference", "columns chosen+rejected"
    found = _by_capability_keys(keys, "key ")
    found = found or _by_capability_keys({k for r in rows for m in _messages(r) for k in m}, "key messages[].")
    if found:
        return found
    if "<think>" in json.dumps(rows, default=str):
        return "thinking", "<think> in the text"
    for cols in (("messages",), ("prompt", "completion"), ("input", "output")):
        if set(cols) <= keys:
            return "sft", "column" + ("s " if len(cols) > 1 else " ") + "+".join(cols)
    for col in ("prompt", "input"):
        if col in keys:
            return "grpo", f"column {col} without completion/output"
    if "text" in keys:
        return "cpt", "column text"
    return None, f"no capability keys (has: {', '.join(sorted(keys)) or 'no rows'})"


def _same(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def plan(src_dir: str | Path, out: str | Path, move: bool = False) -> list[Placement]:
    """What organizing every data file under ``src_dir`` into ``out`` would do (nothing is changed).
    Files already under ``out`` and hidden files are skipped; ``src_dir`` must be a readable dir."""
    src_dir, out = Path(src_dir), Path(out).resolve()
    if not src_dir.is_dir() or not os.access(src_dir, os.R_OK | os.X_OK):
        raise InputError(f"{src_dir}: not a readable directory")
    files = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES)
                   and not p.name.startswith(".") and not p.resolve().is_relative_to(out))
    placements, claimed = [], set()
    for path in files:
        try:
            capability, reason = classify(sample_rows(path))
        except (InputError, OSError) as exc:
            placements.append(Placement(path, None, str(exc), "unreadable"))
            continue
        if capability is None:
            placements.append(Placement(path, None, reason, "unknown"))
            continue
        dest = out / capability / path.name
        status = "move" if move else "copy"
        if dest in claimed:
            status, reason = "conflict", f"{reason}; {dest} is taken by another file of this run, left in place"
        elif dest.exists() and _same(path, dest):
            status, reason = "present", f"{reason}; same bytes already at {dest}"
        elif dest.exists():
            status, reason = "conflict", f"{reason}; {dest} exists with other content, left in place"
        claimed.add(dest)
        placements.append(Placement(path, capability, reason, status, dest))
    return placements


def _place(src: Path, dest: Path, move: bool) -> None:
    if dest.exists():  # appeared since the plan was made
        raise InputError(f"{dest}: exists; not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if move:
        try:
            os.link(src, dest)  # same filesystem: no copy, and it fails rather than overwrite
            src.unlink()
            return
        except FileExistsError:
            raise InputError(f"{dest}: exists; not overwritten") from None
        except OSError:
            pass  # another filesystem (or no hard links): copy, then remove
    with atomic_path(dest) as tmp:
        shutil.copy2(src, tmp)
    if move:
        src.unlink()


def apply(placements: list[Placement]) -> list[Placement]:
    """Carry out the ``copy``/``move`` entries of a :func:`plan` (marking them ``copied``/``moved``)."""
    for p in placements:
        if p.status in ("copy", "move") and p.dest is not None:
            _place(p.source, p.dest, p.status == "move")
            p.status = "moved" if p.status == "move" else "copied"
    return placements


def organize_file(path: str | Path, out: str | Path, move: bool = False) -> Path:
    """Copy (or move) one data file to ``out/<capability>/``; InputError if it cannot be placed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        capability, reason = classify(sample_rows(path))
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    if capability is None:
        raise InputError(f"{path}: unknown capability: {reason}")
    dest = Path(out) / capability / path.name
    if dest.exists() and _same(path, dest):
        return dest
    _place(path, dest, move)
    return dest
