"""The leaderboard keeps judge kinds and datasets apart, shows coverage, and never lets the heuristic
judge (or a run judged on a few rows) outrank a fully LLM-judged run; older catalogs gain the columns."""

from __future__ import annotations

import sqlite3

import pytest

from nexus_core import catalog
from nexus_core.catalog import EvalReportRow


@pytest.fixture
def fresh_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_CATALOG_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    return tmp_path / "catalog.db"


def _row(run_id: str, kind: str, score: float | None, passed: bool, coverage: float | None,
         dataset: str = "val") -> EvalReportRow:
    return EvalReportRow(run_id=run_id, model_name=f"m-{run_id}", dataset_name=dataset, judge_kind=kind,
                         judge="openai/judge" if kind == "llm" else "heuristic", score=score, gate_passed=passed,
                         coverage=coverage, report_uri=f"processed/evaluate/{run_id}_report_v1")


def test_default_view_groups_by_dataset_and_judge_kind_and_ranks_coverage_before_score(fresh_catalog, capsys):
    from flows.cli import main

    for row in [_row("heur-pass", "heuristic", 5.0, True, 1.0), _row("llm-thin", "llm", 5.0, False, 0.125),
                _row("llm-full", "llm", 3.2, False, 1.0), _row("llm-pass", "llm", 3.6, True, 0.95),
                _row("other-ds", "llm", 4.9, True, 1.0, dataset="aaa")]:
        catalog.add_eval_report(row)
    order = [r.run_id for r in catalog.leaderboard()]
    assert order == ["other-ds", "llm-pass", "llm-full", "llm-thin", "heur-pass"]
    assert [r.run_id for r in catalog.leaderboard(dataset_name="val", judge_kind="heuristic")] == ["heur-pass"]

    assert main(["leaderboard", "--dataset", "val"]) == 0
    out = capsys.readouterr().out
    assert out.index("dataset val · judge llm") < out.index("dataset val · judge heuristic (rule-based")
    lines = [ln for ln in out.splitlines() if ln.startswith(("1 ", "2 ", "3 "))]
    assert lines[0].split()[:2] == ["1", "m-llm-pass"] and "0.950" in lines[0]
    assert lines[2].split()[1] == "m-llm-thin" and "0.125" in lines[2] and "FAIL" in lines[2]
    assert lines[3].split()[:2] == ["1", "m-heur-pass"]  # rank restarts: its own group, never above an LLM


def test_a_catalog_made_before_coverage_gains_the_columns(fresh_catalog):
    with sqlite3.connect(fresh_catalog) as conn:  # the eval_reports table as the previous version made it
        conn.execute("CREATE TABLE eval_reports (id INTEGER PRIMARY KEY, run_id VARCHAR NOT NULL, "
                     "model_name VARCHAR, model_uri VARCHAR, model_digest VARCHAR, dataset_name VARCHAR, "
                     "dataset_digest VARCHAR, judge VARCHAR, judge_kind VARCHAR NOT NULL, score FLOAT, "
                     "gate_passed BOOLEAN NOT NULL, metrics_json VARCHAR NOT NULL, report_uri VARCHAR NOT NULL "
                     "UNIQUE, flow_run_id VARCHAR, created_at DATETIME NOT NULL)")
        conn.execute("INSERT INTO eval_reports (run_id, judge_kind, score, gate_passed, metrics_json, report_uri, "
                     "created_at) VALUES ('old', 'llm', 4.0, 1, '{}', 'processed/evaluate/old_v1', "
                     "'2026-01-01 00:00:00')")
    catalog.add_eval_report(_row("new", "llm", 3.0, True, 1.0))
    rows = {r.run_id: r for r in catalog.leaderboard()}
    assert rows["old"].coverage is None and rows["new"].coverage == 1.0
