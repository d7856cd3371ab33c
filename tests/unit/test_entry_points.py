"""Entry points set Nexus's environment; importing ``flows`` or ``tasks`` does not. A failure prints one
``error:`` line, and tracebacks stay off the console unless asked for."""

import json
import logging
import subprocess
import sys

from flows.report import _WithoutTraceback, report_failure
from nexus_core.errors import InputError

BASE_ENV = {"PATH": "/usr/bin:/bin"}  # nothing of this shell leaks in

# Snapshot the environment and the files under the cwd and HOME, import, snapshot again. Prefect and
# polars are imported first: their own import-time effects (polars sets a jemalloc variable) are theirs.
_PROBE = r"""
import json, os, sys
from pathlib import Path
def files():
    return sorted(str(p) for root in (Path.cwd(), Path.home()) for p in root.rglob("*"))
import polars, prefect  # noqa: F401
env, before = dict(os.environ), files()
import flows.lifecycle, tasks.train_sft, tasks.ingest  # noqa: F401
changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
print(json.dumps({"env": sorted(changed), "new": sorted(set(files()) - set(before))}))
"""


def _clean_env(tmp_path, repo) -> dict[str, str]:
    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    home.mkdir()
    prefect_home.mkdir()  # prefect itself creates its home at import when it is missing
    return {**BASE_ENV, "HOME": str(home), "PYTHONPATH": str(repo), "PREFECT_HOME": str(prefect_home)}


def test_importing_flows_and_tasks_changes_no_environment_and_creates_nothing(tmp_path, repo):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=_clean_env(tmp_path, repo),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env": [], "new": []}
    assert not any(cwd.iterdir())  # no .nexus, no data


def test_python_m_entry_point_reloads_prefect_settings_imported_before_it(tmp_path, repo):
    """``python -m flows.X`` imports Prefect before main() runs: prepare_process points it at NEXUS_HOME."""
    probe = ("import prefect, flows.common\n"
             "from prefect.settings import get_current_settings\n"
             "flows.common.prepare_process()\n"
             "print(get_current_settings().home)\n")
    env = {**_clean_env(tmp_path, repo), "NEXUS_HOME": str(tmp_path / "nexus")}
    env.pop("PREFECT_HOME")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "nexus" / "prefect")


def _record_with_traceback() -> logging.LogRecord:
    try:
        raise InputError("/x.jsonl:2: not valid JSON")
    except InputError:
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", None,
                                 sys.exc_info())


def test_console_formatter_drops_the_traceback_but_leaves_the_record_for_other_handlers():
    record = _record_with_traceback()
    plain = logging.Formatter("%(levelname)s %(message)s")
    assert _WithoutTraceback(plain).format(record) == "ERROR Task run failed"
    assert record.exc_info is not None  # the API handler (Prefect UI) still gets the traceback
    assert "Traceback" in plain.format(record)
    assert _WithoutTraceback(plain).format(record) == "ERROR Task run failed"  # even once exc_text is cached


def test_report_failure_prints_one_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path / "home"))
    assert report_failure(InputError("/x.jsonl:2: not valid JSON")) == 1
    assert capsys.readouterr().err == "error: /x.jsonl:2: not valid JSON\n"

    try:
        {}["missing"]
    except KeyError as exc:
        assert report_failure(exc) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected KeyError: 'missing'") and "--debug" in err
    assert "Traceback" in (tmp_path / "home" / "last_error.txt").read_text()  # kept, not printed

    try:
        {}["missing"]
    except KeyError as exc:
        report_failure(exc, debug=True)
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("error: unexpected KeyError")
