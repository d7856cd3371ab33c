"""Remotion explainer checks: does generated scene code parse as TSX and look like a Remotion composition?

The remotion-explainer capability maps a concept ("why the sum of 1..n is n(n+1)/2") to a Remotion
(React/TypeScript) composition. A generated answer is checked in two layers:

1. **Syntax**: the code is parsed with tree-sitter's TSX grammar (``tree-sitter`` + ``tree-sitter-typescript``
   wheels). The first ``ERROR`` or ``MISSING`` node is the syntax error, reported with a 1-based line and
   column (characters, not bytes) in the code itself.
2. **Structure** (``checks``, each can be turned off): ``imports_remotion`` (an ``import`` from
   ``'remotion'``), ``exports_component`` (an exported capitalised function/arrow component, or an
   ``export default``), ``uses_current_frame`` (a call of ``useCurrentFrame()``), ``composition_config``
   (an exported ``compositionConfig`` object with a positive integer ``durationInFrames``) and
   ``remotion_names_imported`` (every Remotion API used — ``interpolate``, ``spring``, ``Sequence`` … — is
   imported or declared: ``tsc`` would reject it otherwise).

An answer wrapped in a Markdown code fence is read from its first fenced block (``extract_code_block``).

The score step uses it for the ``remotion_parse_rate`` metric: it adds a ``remotion_ok`` column to the
predictions and writes per-prompt records to ``remotion_checks.parquet``. With ``render: true`` and a Node
project that has ``remotion`` installed (``project_dir``; ``npx --no-install remotion versions`` must
work offline), each passing composition is rendered to MP4; without Node or Remotion the render is
skipped with the reason, which is not an error. ``python -m nexus_core.evaluate.remotion check|render``
does the same for one file.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field

from nexus_core.config import NexusModel

CheckName = Literal["imports_remotion", "exports_component", "uses_current_frame", "composition_config",
                    "remotion_names_imported"]
ALL_CHECKS: list[CheckName] = ["imports_remotion", "exports_component", "uses_current_frame",
                               "composition_config", "remotion_names_imported"]
# Remotion's public API names whose use without an import is a compile error.
REMOTION_API = frozenset({
    "AbsoluteFill", "Sequence", "Series", "Loop", "Freeze", "Img", "Audio", "Video", "OffthreadVideo",
    "IFrame", "Composition", "Still", "interpolate", "interpolateColors", "spring", "measureSpring", "Easing",
    "useCurrentFrame", "useVideoConfig", "staticFile", "random", "delayRender", "continueRender",
    "registerRoot",
})
_FENCE = re.compile(r"```[ \t]*(?:tsx|typescript|ts|jsx|javascript|js)?[ \t]*\n(.*?)```", re.DOTALL)


class RemotionConfig(NexusModel):
    """How generated Remotion compositions are checked (and, optionally, rendered)."""

    checks: list[CheckName] = Field(default_factory=lambda: list(ALL_CHECKS),
                                    description="Structural checks a parsed composition must pass "
                                                f"(any of {', '.join(ALL_CHECKS)}); syntax is always checked")
    extract_code_block: bool = Field(default=True, description="Read an answer's first ```tsx fenced block "
                                                               "when it has one (else the whole answer)")
    render: bool = Field(default=False, description="Render each passing composition to MP4 with the Remotion "
                                                    "CLI (skipped, with the reason, without Node/Remotion)")
    project_dir: str | None = Field(default=None, description="Node project with `remotion` and `@remotion/cli` "
                                                              "in node_modules, where renders run")
    render_timeout_s: int = Field(default=600, ge=1, description="Longest one render may take")
    browser_executable: str | None = Field(default=None, description="Chrome/Chromium for the render (Remotion's "
                                           "--browser-executable); default: the browser Remotion downloads itself")


@dataclass
class TsxCheck:
    """What the checks found in one piece of code."""

    ok: bool
    parses: bool
    error: str | None = None            # first syntax error, "line L, col C: ..."
    line: int | None = None             # 1-based
    col: int | None = None              # 1-based, characters
    problems: list[str] = field(default_factory=list)   # "check: why" for each failed structural check
    component: str | None = None        # the exported component's name ("default" for an anonymous default)
    default_export: bool = False        # the component is the module's default export
    duration_in_frames: int | None = None


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (```tsx ... ```), or ``text`` itself without one."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


@cache
def _parser() -> Any:
    import tree_sitter
    import tree_sitter_typescript

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_typescript.language_tsx()))


def _walk(node: Any):  # noqa: ANN202 - generator of tree-sitter nodes
    yield node
    for child in node.children:
        yield from _walk(child)


def _text(node: Any) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text is not None else ""


_OPENERS = {"}": "{", ")": "(", "]": "["}


def _position(node: Any, src: bytes) -> tuple[int, int]:
    row, byte_col = node.start_point
    line = src.split(b"\n")[row] if row <= src.count(b"\n") else b""
    return row + 1, len(line[:byte_col].decode("utf-8", "replace")) + 1


def _error_point(node: Any, src: bytes) -> tuple[Any, str]:
    """Where inside an ERROR node the mistake is, and what it is. Its leading complete statements parsed
    fine; an error running to the end of the file is usually a bracket never closed (the last one open)."""
    kids = list(node.children)
    while kids and kids[0].is_named and not kids[0].has_error and kids[0].type.endswith(("statement", "declaration")):
        kids.pop(0)
    if not src[node.end_byte:].strip():
        stack: list[Any] = []
        for k in kids:
            if k.type in _OPENERS.values():
                stack.append(k)
            elif k.type in _OPENERS and stack and stack[-1].type == _OPENERS[k.type]:
                stack.pop()
        if stack:
            return stack[-1], f"{stack[-1].type!r} is not closed by the end of the code"
    at = kids[0] if kids else node
    snippet = _text(at).strip().splitlines()[0][:40] if _text(at).strip() else "end of input"
    return at, f"unexpected {snippet!r}"


def _first_error(root: Any, src: bytes) -> tuple[int, int, str] | None:
    """(line, col, message) of the first syntax error, 1-based, col in characters: the first innermost
    ERROR/MISSING node (tree-sitter's recovery can wrap a whole file in one ERROR; a nested one is nearer
    the mistake), or a JSX closing tag that does not match its opening tag (the grammar accepts those)."""
    found = []
    for node in _walk(root):
        if (node.is_missing or node.is_error) and not any(c.has_error or c.is_missing for c in node.children):
            at, msg = (node, f"missing {node.type!r}") if node.is_missing else _error_point(node, src)
            found.append((*_position(at, src), msg))
            break
    for node in _walk(root):
        if node.type == "jsx_element":
            opening, closing = node.child_by_field_name("open_tag"), node.child_by_field_name("close_tag")
            want = _text(opening.child_by_field_name("name")) if opening is not None else ""
            got = _text(closing.child_by_field_name("name")) if closing is not None else ""
            if closing is not None and want != got:
                found.append((*_position(closing, src), f"closing tag </{got}> does not match <{want}>"))
                break
    return min(found) if found else None


def _imports(root: Any) -> tuple[bool, set[str], set[str]]:
    """(imports from 'remotion', local names bound by remotion imports, local names bound by any import)."""
    from_remotion, remotion_names, all_names = False, set(), set()
    for node in root.children:
        if node.type != "import_statement":
            continue
        source = _text(node.child_by_field_name("source")).strip("'\"`")
        bound = set()
        for sub in _walk(node):
            if sub.type == "import_specifier":
                alias = sub.child_by_field_name("alias") or sub.child_by_field_name("name")
                bound.add(_text(alias))
            elif sub.type == "namespace_import" or (sub.type == "identifier" and sub.parent.type == "import_clause"):
                bound.add(_text(sub.named_children[-1] if sub.named_children else sub))
        all_names |= bound
        if source == "remotion":
            from_remotion, remotion_names = True, remotion_names | bound
    return from_remotion, remotion_names, all_names


def _exports(root: Any) -> tuple[str | None, bool, Any]:
    """(exported component name, whether it is the default export, the compositionConfig object node)."""
    component, default, config = None, False, None
    for node in root.children:
        if node.type != "export_statement":
            continue
        is_default = any(c.type == "default" for c in node.children)
        decl = node.child_by_field_name("declaration")
        value = node.child_by_field_name("value")
        if decl is not None and decl.type in ("function_declaration", "generator_function_declaration"):
            name = _text(decl.child_by_field_name("name"))
            if (name[:1].isupper() or is_default) and component is None:
                component, default = name or "default", is_default
        elif decl is not None and decl.type == "lexical_declaration":
            for var in decl.named_children:
                if var.type != "variable_declarator":
                    continue
                name, val = _text(var.child_by_field_name("name")), var.child_by_field_name("value")
                if name == "compositionConfig" and val is not None:
                    config = val
                elif name[:1].isupper() and val is not None and val.type in (
                        "arrow_function", "function_expression", "function", "call_expression"):
                    component = component or name
        elif is_default and value is not None and component is None and value.type in (
                "identifier", "arrow_function", "function_expression", "function", "call_expression"):
            component, default = (_text(value) if value.type == "identifier" else "default"), True
    return component, default, config


def _duration(config: Any) -> tuple[int | None, str | None]:
    """durationInFrames of the compositionConfig object, or why it is not a positive integer."""
    if config is None:
        return None, "no exported `compositionConfig`"
    if config.type in ("satisfies_expression", "as_expression"):
        config = config.named_children[0]
    if config.type != "object":
        return None, f"`compositionConfig` is a {config.type}, not an object literal"
    for pair in config.named_children:
        if pair.type == "pair" and _text(pair.child_by_field_name("key")).strip("'\"") == "durationInFrames":
            raw = _text(pair.child_by_field_name("value"))
            if re.fullmatch(r"\d+", raw.replace("_", "")) and int(raw.replace("_", "")) > 0:
                return int(raw.replace("_", "")), None
            return None, f"durationInFrames is {raw!r}, not a positive integer literal"
    return None, "`compositionConfig` has no durationInFrames"


def check_tsx(code: str, checks: list[CheckName] | None = None) -> TsxCheck:
    """Parse ``code`` as TSX and run the structural ``checks`` (default: all) on it."""
    checks = ALL_CHECKS if checks is None else checks
    src = code.encode("utf-8")
    root = _parser().parse(src).root_node
    err = _first_error(root, src)
    if err is not None or not code.strip():
        line, col, msg = err or (1, 1, "empty code")
        return TsxCheck(ok=False, parses=False, error=f"line {line}, col {col}: {msg}", line=line, col=col,
                        problems=[f"syntax: line {line}, col {col}: {msg}"])
    from_remotion, remotion_names, imported = _imports(root)
    component, default_export, config = _exports(root)
    duration, duration_problem = _duration(config)
    nodes = list(_walk(root))
    calls = {_text(n.child_by_field_name("function")) for n in nodes if n.type == "call_expression"}
    declared = {_text(n.child_by_field_name("name")) for n in nodes
                if n.type in ("variable_declarator", "function_declaration", "class_declaration")}
    used = {_text(n) for n in nodes if n.type == "identifier" and n.parent is not None
            and n.parent.type not in ("import_specifier", "namespace_import", "import_clause")}
    problems = []
    if "imports_remotion" in checks and not from_remotion:
        problems.append("imports_remotion: no import from 'remotion'")
    if "exports_component" in checks and component is None:
        problems.append("exports_component: no exported component (export a capitalised function or const, "
                        "or export default)")
    if "uses_current_frame" in checks and "useCurrentFrame" not in calls:
        problems.append("uses_current_frame: useCurrentFrame() is never called")
    elif "uses_current_frame" in checks and "useCurrentFrame" not in remotion_names | declared:
        problems.append("uses_current_frame: useCurrentFrame is not imported from 'remotion'")
    if "composition_config" in checks and duration_problem:
        problems.append(f"composition_config: {duration_problem}")
    if "remotion_names_imported" in checks:
        missing = sorted((used & REMOTION_API) - imported - declared)
        if missing:
            problems.append(f"remotion_names_imported: {', '.join(missing)} used but not imported")
    return TsxCheck(ok=not problems, parses=True, problems=problems, component=component,
                    default_export=default_export, duration_in_frames=duration)


def remotion_available(project_dir: str | Path | None) -> str | None:
    """None when the Remotion CLI runs offline in ``project_dir``; otherwise why rendering is skipped."""
    if project_dir is None:
        return "no remotion.project_dir (a Node project with remotion and @remotion/cli installed)"
    if not Path(project_dir).is_dir():
        return f"remotion.project_dir {project_dir} is not a directory"
    if shutil.which("node") is None or shutil.which("npx") is None:
        return "node/npx not on PATH"
    try:
        proc = subprocess.run(["npx", "--no-install", "remotion", "versions"], cwd=project_dir,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`npx --no-install remotion versions` failed: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"the Remotion CLI is not installed in {project_dir} (npx --no-install remotion: {tail[0]})"
    return None


_ROOT_TSX = """import React from 'react';
import {{Composition, registerRoot}} from 'remotion';
import {component_import}
import {{compositionConfig}} from './Scene';

const cfg: Record<string, unknown> = compositionConfig;
const Root: React.FC = () => (
  <Composition id="Scene" component={{SceneComponent}} durationInFrames={{{duration}}}
    fps={{(cfg.fps as number) ?? 30}} width={{(cfg.width as number) ?? 1280}} height={{(cfg.height as number) ?? 720}} />
);
registerRoot(Root);
"""


def render_tsx(code: str, out_mp4: Path, cfg: RemotionConfig) -> tuple[str, str]:
    """Render one composition to ``out_mp4``: ("rendered", path), ("skipped", why) or ("failed", why).
    The code must pass :func:`check_tsx` with a named exported component and a compositionConfig."""
    why = remotion_available(cfg.project_dir)
    if why is not None:
        return "skipped", why
    check = check_tsx(code)
    if not check.ok or check.component is None or check.duration_in_frames is None:
        return "failed", "not renderable: " + ("; ".join(check.problems) or "no component or durationInFrames")
    assert cfg.project_dir is not None
    work = Path(cfg.project_dir) / ".nexus_render" / hashlib.sha256(src := code.encode()).hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    (work / "Scene.tsx").write_bytes(src)
    component_import = ("SceneComponent from './Scene';" if check.default_export
                        else f"{{{check.component} as SceneComponent}} from './Scene';")
    (work / "index.tsx").write_text(_ROOT_TSX.format(component_import=component_import,
                                                     duration=check.duration_in_frames))
    out_mp4.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["npx", "--no-install", "remotion", "render", str(work / "index.tsx"), "Scene", str(out_mp4.resolve())]
    if cfg.browser_executable:
        cmd.append(f"--browser-executable={cfg.browser_executable}")
    try:
        proc = subprocess.run(cmd, cwd=cfg.project_dir, capture_output=True, text=True, timeout=cfg.render_timeout_s)
    except subprocess.TimeoutExpired:
        return "failed", f"render took over {cfg.render_timeout_s} s"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0 or not out_mp4.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return "failed", f"remotion render exited {proc.returncode}: {tail}"
    return "rendered", str(out_mp4)


def check_predictions(preds: pl.DataFrame, cfg: RemotionConfig, where: str,
                      out_dir: Path | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``preds`` with a ``remotion_ok`` column, and per-prompt records (row id, prompt, code checked,
    parses, error line/col, problems, component, render outcome). Renders into ``out_dir/renders`` when
    ``cfg.render``. ``preds`` needs a ``prediction`` column; InputError naming ``where`` otherwise."""
    from nexus_core.errors import InputError

    if "prediction" not in preds.columns:
        raise InputError(f"{where}: remotion_parse_rate needs a prediction column (has: {', '.join(preds.columns)})")
    codes = [extract_code(p or "") if cfg.extract_code_block else (p or "") for p in preds["prediction"].to_list()]
    results = [check_tsx(c, cfg.checks) for c in codes]
    renders: list[str | None] = [None] * len(codes)
    if cfg.render:
        skip = remotion_available(cfg.project_dir)
        for i, (code, res) in enumerate(zip(codes, results, strict=True)):
            if not res.ok:
                renders[i] = "not rendered: failed the checks"
            elif skip is not None:
                renders[i] = f"skipped: {skip}"
            else:
                status, detail = render_tsx(code, (out_dir or Path(".")) / "renders" / f"{i:04d}.mp4", cfg)
                renders[i] = f"{status}: {detail}"
    out = preds.with_columns(pl.Series("remotion_ok", [r.ok for r in results], dtype=pl.Boolean))
    records = out.select([c for c in ("row_id", "input", "prediction") if c in out.columns]).with_columns(
        pl.Series("code", codes, dtype=pl.String),
        pl.Series("remotion_ok", [r.ok for r in results], dtype=pl.Boolean),
        pl.Series("parses", [r.parses for r in results], dtype=pl.Boolean),
        pl.Series("error_line", [r.line for r in results], dtype=pl.Int64),
        pl.Series("error_col", [r.col for r in results], dtype=pl.Int64),
        pl.Series("problems", ["; ".join(r.problems) for r in results], dtype=pl.String),
        pl.Series("component", [r.component for r in results], dtype=pl.String),
        pl.Series("render", renders, dtype=pl.String))
    return out, records


def main(argv: list[str] | None = None) -> int:
    """``check FILE.tsx`` prints the verdict (exit 1 when it fails); ``render FILE.tsx OUT.mp4 PROJECT_DIR
    [BROWSER]`` renders it (exit 0 when rendered or skipped, 1 when the render failed)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "check":
        res = check_tsx(Path(args[1]).read_text(encoding="utf-8"))
        print(f"{args[1]}: " + ("ok" if res.ok else "; ".join(res.problems)))
        return 0 if res.ok else 1
    if len(args) in (4, 5) and args[0] == "render":
        status, detail = render_tsx(Path(args[1]).read_text(encoding="utf-8"), Path(args[2]),
                                    RemotionConfig(render=True, project_dir=args[3],
                                                   browser_executable=args[4] if len(args) == 5 else None))
        print(f"{args[1]}: {status}: {detail}")
        return 1 if status == "failed" else 0
    print("usage: python -m nexus_core.evaluate.remotion check FILE.tsx | "
          "render FILE.tsx OUT.mp4 PROJECT_DIR [BROWSER_EXECUTABLE]")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
