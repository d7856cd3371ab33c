"""Human review: a real distill flow run pauses at the gate; the review page labels rows and resumes it."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from flows.common import load_flow_config
from flows.distill import DistillConfig, distill
from nexus_core.distill import review_store
from nexus_core.store import local_path

pytestmark = pytest.mark.integration


def test_review_page_resumes_paused_flow(prefect_harness, repo, monkeypatch):
    from streamlit.testing.v1 import AppTest

    cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/tiny.yaml"),
                           ["name=dhuman", "review.mode=human", "review.poll_interval_s=1", "review.timeout_s=300",
                            "inputs.templates=[hypothesis]", "regenerate.max_rounds=0"])
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", distill(cfg)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 240
    while not (reqs := [r for r in review_store.requests("waiting") if "dhuman_filtered" in r.dataset_uri]):
        assert worker.is_alive() and time.monotonic() < deadline, "flow never reached the review gate"
        time.sleep(0.5)
    req = reqs[0]
    assert "result" not in out  # really waiting

    # A second reviewer labels the first row at the same time: append-only, nothing lost.
    first_row = pl.read_parquet(local_path(req.dataset_uri) / "data.parquet")["row_id"][0]
    review_store.add_label(req.dataset_uri, first_row, "reject", "bob", note="parallel reviewer")

    monkeypatch.setattr("getpass.getuser", lambda: "alice")  # the reviewer is the identity: the OS user locally
    at = AppTest.from_file(str(repo / "dashboards/views/review.py"), default_timeout=60).run()
    assert not at.exception
    assert at.selectbox(key="dataset").value.startswith("waiting")
    at.button(key="accept").click().run()  # row 1 → accepted by alice (latest label wins over bob's)
    at.button(key="reject").click().run()  # row 2 → rejected
    at.text_area(key="edit-2").set_value("An edited answer by the reviewer.").run()
    at.button(key="edit").click().run()  # row 3 → edited
    at.button(key="submit").click().run()
    assert not at.exception and at.success, [e.value for e in at.error]

    worker.join(timeout=240)
    result = out["result"]
    reviewed = pl.read_parquet(result.artifacts['reviewed'].path / "data.parquet")
    ids = pl.read_parquet(local_path(req.dataset_uri) / "data.parquet")["row_id"].to_list()[:3]
    got = {r["row_id"]: r for r in reviewed.filter(pl.col("row_id").is_in(ids)).iter_rows(named=True)}
    assert [got[i]["decision"] for i in ids] == ["accept", "reject", "accept"]
    assert got[ids[0]]["reviewer"] == "alice" and got[ids[2]]["reviewed_output"] == "An edited answer by the reviewer."
    assert (reviewed.filter(~pl.col("row_id").is_in(ids))["decision_source"] == "filter").all()
    labels = review_store.all_labels(req.dataset_uri)
    assert {lb.reviewer for lb in labels} == {"alice", "bob"} and len(labels) == 4
    exported = [p.name for p in (result.artifacts["reviewed"].path / "labels").iterdir()]
    assert len(exported) == 1 and (result.artifacts["reviewed"].path / "accepted.jsonl").is_file()
    assert review_store.requests("waiting") == [] or all(r.id != req.id for r in review_store.requests("waiting"))
    sft = pl.read_parquet(result.artifacts['sft'].path / "data.parquet")
    assert "An edited answer by the reviewer." in sft["output"].to_list()


def test_regenerated_rows_go_back_to_review_before_packaging(prefect_harness, repo):
    from prefect.flow_runs import resume_flow_run

    cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/tiny.yaml"),
                           ["name=drecheck", "review.mode=human", "review.poll_interval_s=1", "review.timeout_s=300"])
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", distill(cfg)), daemon=True)
    worker.start()

    def waiting_for(suffix: str):
        deadline = time.monotonic() + 240
        while not (reqs := [r for r in review_store.requests("waiting") if f"drecheck_{suffix}" in r.dataset_uri]):
            assert worker.is_alive() and time.monotonic() < deadline, f"flow never reached the {suffix} gate"
            time.sleep(0.5)
        return reqs[0]

    def submit(req, reviewer: str) -> None:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + 60  # the request is recorded just before the run pauses
        with get_client(sync_client=True) as client:
            while not client.read_flow_run(req.flow_run_id).state.is_paused():
                assert time.monotonic() < deadline, "flow run never paused"
                time.sleep(0.2)
        resume_flow_run(req.flow_run_id, run_input={"reviewer": reviewer, "labels": 0,
                                                    "labels_digest": review_store.labels_digest(req.dataset_uri)})
        review_store.mark_submitted(req.id, reviewer)

    submit(waiting_for("filtered"), "alice")  # no labels: filter-rejected rows go to regeneration
    req = waiting_for("recheck")  # the second gate holds only the rows regeneration rescued
    queue = pl.read_parquet(local_path(req.dataset_uri) / "data.parquet")
    assert queue.height >= 2 and queue["keep"].all() and (queue["attempts"] >= 1).all()
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(repo / "dashboards/views/review.py"), default_timeout=60).run()
    assert not at.exception and "drecheck_recheck" in at.selectbox(key="dataset").value
    assert any(e.label.startswith("Earlier attempts") for e in at.expander)  # the reviewer sees the history
    dropped, edited = queue["row_id"][0], queue["row_id"][1]
    review_store.add_label(req.dataset_uri, dropped, "reject", "carol", note="still unfalsifiable")
    review_store.add_label(req.dataset_uri, edited, "edit", "carol", edited_output="Carol's corrected answer.")
    submit(req, "carol")

    worker.join(timeout=240)
    result = out["result"]
    assert {"recheck", "rereviewed"} <= set(result.artifacts)
    sft = pl.read_parquet(result.artifacts['sft'].path / "data.parquet")
    meta = {m["row_id"]: m for m in sft["meta"].to_list()}
    assert dropped not in meta  # rejected on the second review: not packaged
    row = sft.filter(pl.col("meta").struct.field("row_id") == edited)
    assert row["output"].to_list() == ["Carol's corrected answer."] and meta[edited]["quality"] == "human_reviewed"
    # the rest of the rescued rows passed the second gate unlabelled and keep their regenerated answer
    rest = set(queue["row_id"]) - {dropped, edited}
    assert rest <= set(meta) and all(meta[r]["quality"] == "regenerated" for r in rest)
