"""Layer boundaries: nexus_core never imports prefect/tasks/flows; dashboards never import
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


def _is_step_module(path: Path) -> bool:
    """A step module declares a step: a function decorated with ``@step(...)``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "step"
               for node in tree.body if isinstance(node, ast.FunctionDef) for d in node.decorator_list)


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_step_modules_do_not_import_each_other():
    steps = {_module(p): p for p in _files("nexus_core") if _is_step_module(p)}
    assert len(steps) >= 30, f"expected every lifecycle step to declare @step, found {sorted(steps)}"
    bad = {f"{me} imports {m}" for me, p in steps.items() for m in _imports(p) if m in steps and m != me}
    assert not bad, bad


def test_one_package_per_area_and_no_catch_all_modules():
    """Steps live in nexus_core/<area>/ beside their helpers; no *_lib.py or steps/ grab-bags."""
    areas = {"corpus", "distill", "train", "flux", "compress", "evaluate", "podcast", "videogen"}
    for me in (_module(p) for p in _files("nexus_core") if _is_step_module(p)):
        assert me.split(".")[1] in areas, f"{me}: a step outside nexus_core/<area>/"
    catch_alls = [p for p in _files("nexus_core") if p.stem.endswith("_lib") or "steps" in p.parts]
    assert not catch_alls, catch_alls


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from prefect import flow\nimport flows.lifecycle\n")
    assert {"prefect", "flows.lifecycle"} <= _imports(bad)
