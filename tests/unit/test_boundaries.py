"""DESIGN.md §2 boundaries: nexus_core never imports prefect/tasks/flows; dashboards never import
tasks/flows; no step module imports another step module."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_nexus_core_never_imports_prefect_tasks_or_flows():
    bad = {f"{p.relative_to(REPO)}: {m}" for p in _files("nexus_core") for m in _imports(p)
           if m.split(".")[0] in {"prefect", "tasks", "flows"}}
    assert not bad, bad


def test_dashboards_never_import_tasks_or_flows():
    bad = {f"{p.relative_to(REPO)}: {m}" for p in _files("dashboards") for m in _imports(p)
           if m.split(".")[0] in {"tasks", "flows"}}
    assert not bad, bad


def test_step_modules_do_not_import_each_other():
    steps = REPO / "nexus_core" / "steps"
    step_modules = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in steps.rglob("*.py")
                    if p.name != "__init__.py"}
    assert step_modules, "no step modules found"
    bad = set()
    for p in steps.rglob("*.py"):
        me = ".".join(p.relative_to(REPO).with_suffix("").parts)
        for m in _imports(p):
            if m in step_modules and m != me:
                bad.add(f"{me} imports {m}")
    assert not bad, bad


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from prefect import flow\nimport flows.lifecycle\n")
    assert {"prefect", "flows.lifecycle"} <= _imports(bad)
