"""Cache keys come from the spine: the step module and every in-repo module it imports, transitively,
the files the step declares it reads, its config (runtime knobs left out) and its inputs' digests."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from nexus_core import cachekey
from nexus_core.artifacts import raw_ref
from nexus_core.cachekey import module_closure, step_key
from nexus_core.config import NexusModel, runtime_field


class _Cfg(NexusModel):
    factor: int = Field(default=2, description="multiplier")
    workers: int = runtime_field(1, "how many threads (does not change the output)")
    rules: str = Field(default="", description="a file the step reads")


@pytest.fixture
def fake_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An in-repo package ``fakerepo``: step → helper_a → helper_b, and an unrelated module."""
    pkg = tmp_path / "fakerepo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper_b.py").write_text("FACTOR = 1\n")
    (pkg / "helper_a.py").write_text("from fakerepo import helper_b\n\ndef scale(x):\n    return x * helper_b.FACTOR\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    (pkg / "step_mod.py").write_text(textwrap.dedent("""
        from pathlib import Path

        from nexus_core.contract import step
        from nexus_core.runner import StepResult


        class Out(StepResult):
            pass


        @step(area="fake", reads=lambda cfg, inputs: [cfg.rules])
        def run_fake(cfg, *, inputs, out_uri, ctx) -> Out:
            from fakerepo.helper_a import scale

            Path(out_uri, "out.txt").write_text(str(scale(cfg.factor)))
            return Out(rows=1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cachekey, "REPO_PACKAGES", ("nexus_core", "fakerepo"))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("fakerepo")]:
        del sys.modules[name]


def _fn():  # noqa: ANN202
    return importlib.import_module("fakerepo.step_mod").run_fake


def _touch(path: Path, text: str) -> None:
    path.write_text(text)
    # mtime granularity: make sure the edit is seen even within the same clock tick
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_closure_follows_imports_transitively_including_lazy_ones(fake_repo):
    closure = module_closure("fakerepo.step_mod")
    assert {"fakerepo.step_mod", "fakerepo.helper_a", "fakerepo.helper_b"} <= set(closure)
    assert "fakerepo.unrelated" not in closure
    assert "nexus_core.runner" in closure  # the spine's own modules count too


def test_editing_a_helper_two_imports_away_misses(fake_repo):
    fn, cfg = _fn(), _Cfg()
    before = step_key(fn, cfg, {})
    _touch(fake_repo / "helper_b.py", "FACTOR = 3\n")
    assert step_key(fn, cfg, {}) != before


def test_editing_an_unrelated_module_keeps_the_key(fake_repo):
    fn, cfg = _fn(), _Cfg()
    before = step_key(fn, cfg, {})
    _touch(fake_repo / "unrelated.py", "X = 2\n")
    assert step_key(fn, cfg, {}) == before


def test_files_the_step_reads_join_by_content(fake_repo, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("a: 1\n")
    fn, cfg = _fn(), _Cfg(rules=str(rules))
    before = step_key(fn, cfg, {})
    rules.write_text("a: 2\n")
    assert step_key(fn, cfg, {}) != before


def test_runtime_knobs_stay_out_and_inputs_join(fake_repo, tmp_path):
    fn = _fn()
    assert step_key(fn, _Cfg(workers=1), {}) == step_key(fn, _Cfg(workers=8), {})
    assert step_key(fn, _Cfg(factor=2), {}) != step_key(fn, _Cfg(factor=3), {})
    data = tmp_path / "d.txt"
    data.write_text("x")
    first = step_key(fn, _Cfg(), {"data": raw_ref(data)})
    data.write_text("y")
    assert step_key(fn, _Cfg(), {"data": raw_ref(data)}) != first


def test_cache_version_forces_a_miss(fake_repo, monkeypatch):
    fn, cfg = _fn(), _Cfg()
    before = step_key(fn, cfg, {})
    monkeypatch.setenv("NEXUS_CACHE_VERSION", "2")
    assert step_key(fn, cfg, {}) != before


def test_run_step_reuses_until_shared_code_changes(fake_repo, data_root):
    """Through the runner: same key → the stored artifact; a helper edit → a new version."""
    from nexus_core.runner import run_step

    fn = _fn()
    first = run_step(fn, _Cfg(), name="fake")
    again = run_step(fn, _Cfg(), name="fake")
    assert again.reused and again.ref.version == first.ref.version
    _touch(fake_repo / "unrelated.py", "X = 5\n")
    assert run_step(fn, _Cfg(), name="fake").reused
    _touch(fake_repo / "helper_b.py", "FACTOR = 10\n")
    importlib.reload(importlib.import_module("fakerepo.helper_b"))
    third = run_step(fn, _Cfg(), name="fake")
    assert not third.reused and third.ref.version == first.ref.version + 1
    assert (third.ref.path / "out.txt").read_text() == "20"


def test_real_steps_see_their_shared_helpers():
    """The modules the issue named: metrics under score, train helpers under sft, rules under filters."""
    assert "nexus_core.evaluate.metrics" in module_closure("nexus_core.evaluate.score")
    sft = module_closure("nexus_core.train.sft")
    assert {"nexus_core.train.common", "nexus_core.train.data"} <= set(sft)
    filters = module_closure("nexus_core.distill.filters")
    assert {"nexus_core.distill.rules", "nexus_core.distill.near_dup"} <= set(filters)
    assert "nexus_core.flux.losses" not in filters
