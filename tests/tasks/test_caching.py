"""Our cache policy: a second run is Cached; editing the *step module* or a module it imports (not the
wrapper) misses."""

import importlib
import shutil
import sys
import textwrap

import pytest

HELPER = '''
SUFFIX = ""
'''

STEP = '''
from pathlib import Path
from nexus_core.config import NexusModel
from nexus_core.contract import step
from nexus_core.runner import StepResult
from cachepkg import helper


class EchoConfig(NexusModel):
    text: str = "hello"


class EchoResult(StepResult):
    pass


@step(area="test")
def run_echo(cfg: EchoConfig, *, inputs, out_uri: str, ctx) -> EchoResult:
    Path(out_uri, "echo.txt").write_text(cfg.text + helper.SUFFIX)
    return EchoResult(rows=1)
'''

WRAPPER = '''
from prefect import flow
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context
from {step} import EchoConfig, EchoResult, run_echo


@nexus_task(run_echo, name="echo", runtime=["workers"])
def echo(cfg: EchoConfig, workers: int = 1) -> EchoResult:
    return run_step(run_echo, cfg, name="echo", context=run_context())


@flow
def echo_flow(text: str, workers: int = 1):
    state = echo(EchoConfig(text=text), workers=workers, return_state=True)
    return state.name, state.result().ref.version
'''


@pytest.fixture
def modules(tmp_path, monkeypatch, data_root):
    pkg = tmp_path / "cachepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text(HELPER)
    (pkg / "step_echo.py").write_text(STEP)
    (pkg / "wrap_echo.py").write_text(WRAPPER.format(step="cachepkg.step_echo"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from nexus_core import cachekey

    monkeypatch.setattr(cachekey, "REPO_PACKAGES", ("nexus_core", "cachepkg"))  # as if it were in the repo
    yield pkg
    for name in [m for m in sys.modules if m.startswith("cachepkg")]:
        del sys.modules[name]


def test_second_run_cached_then_step_edit_misses(prefect_harness, modules, data_root):
    wrap = importlib.import_module("cachepkg.wrap_echo")
    assert wrap.echo_flow("a") == ("Completed", 1)
    assert wrap.echo_flow("a") == ("Cached", 1)
    # a runtime knob is outside the key
    assert wrap.echo_flow("a", workers=8) == ("Cached", 1)
    # different input: a new execution and a new version
    assert wrap.echo_flow("b") == ("Completed", 2)

    # edit the step module's source (not the task wrapper): the cache misses, the step re-runs
    step_file = modules / "step_echo.py"
    step_file.write_text(step_file.read_text() + textwrap.dedent("""
        # a behaviour-neutral edit still changes the code identity
    """))
    assert wrap.echo_flow("a") == ("Completed", 3)
    assert wrap.echo_flow("a") == ("Cached", 3)

    # edit a helper the step imports (the wrapper never names it): the cache misses too
    (modules / "helper.py").write_text("SUFFIX = ''  # reformatted\n")
    assert wrap.echo_flow("a") == ("Completed", 4)
    assert wrap.echo_flow("a") == ("Cached", 4)

    # the data root deleted (Prefect's result store kept): run again rather than return a ref to nothing
    shutil.rmtree(data_root)
    state, version = wrap.echo_flow("a")
    assert state == "Completed"
    assert (data_root / "processed" / "test" / f"echo_v{version}" / "echo.txt").read_text() == "a"
