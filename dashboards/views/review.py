"""Review: label filtered distill rows (accept / reject / edit) and submit the batch.

Keyboard: ``a`` accept, ``x`` reject, ``e`` save edit, ``j``/``k`` next/previous. Labels are
appended to the catalog (two reviewers at once lose nothing; the latest label of a row wins).
Submitting resumes the flow run paused at the review gate with the batch's typed input.

The reviewer is the identified user (``dashboards.auth.current_user``: the OIDC login, or the OS user
on a loopback-only server), shown read-only. Row content and edits are shown as plain text, never
rendered; an edit or note longer than ``NEXUS_REVIEW_MAX_CHARS`` (default 20,000) is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import streamlit as st

from dashboards.auth import code, current_user, require_login
from dashboards.serve import review_max_chars
from nexus_core.distill import review_store
from nexus_core.settings import configure_environment
from nexus_core.store import local_path

configure_environment()

require_login()
reviewer = current_user()
if not reviewer:
    st.error("Nobody is identified: log in to review.")
    st.stop()
max_chars = review_max_chars()

st.title("Review")
st.caption("Accept, reject or edit distilled rows; submitting resumes the waiting distill flow run.")

waiting = review_store.requests(status="waiting")
options: dict[str, tuple[str, int | None, str | None]] = {}
for req in waiting:
    options[f"waiting · {Path(req.dataset_uri).name} · run {req.flow_run_id}"] = (
        req.dataset_uri, req.id, req.flow_run_id)
try:
    from nexus_core import catalog

    for art in catalog.artifacts(area="distill"):
        if art.name.endswith("_filtered"):
            options.setdefault(f"{art.name}@v{art.version}", (art.uri, None, None))
except Exception:  # noqa: BLE001 - an empty or missing catalog just means nothing to review
    pass
if not options:
    st.info("Nothing to review yet: run `nexus run distill configs/distill/tiny.yaml review.mode=human`.")
    st.stop()

choice = st.selectbox("Dataset", list(options), key="dataset")
dataset_uri, request_id, flow_run_id = options[choice]
# Read-only and refreshed every run from the identity: labels are written under `reviewer`, not the widget.
st.session_state["reviewer"] = reviewer
st.text_input("Reviewer", key="reviewer", disabled=True, help="Who the labels are recorded under (your login)")

table = local_path(dataset_uri) / "data.parquet"
if not table.is_file():
    st.error(f"{code(table)}: not found")
    st.stop()
df = pl.read_parquet(table)
labels = review_store.latest_labels(dataset_uri)
n = df.height
idx = min(st.session_state.get("idx", 0), n - 1)
st.session_state["idx"] = idx
row = df.row(idx, named=True)

st.progress(len(labels) / n if n else 0.0, text=f"{len(labels)} of {n} rows labelled")
verdict = "keep" if row.get("keep") else f"reject ({row.get('reason') or ''})"
st.markdown(f"**Row {idx + 1}/{n}**")
st.text(f"{row['row_id']} · {row.get('domain')} · template {row.get('template_name')} · filters: {verdict}")
current = labels.get(row["row_id"])
if current is not None:
    st.text(f"Latest label: {current.decision} by {current.reviewer} at {current.created_at:%Y-%m-%d %H:%M}")
with st.expander("Prompt", expanded=False):
    st.text(row.get("system_prompt") or "")
    st.text(row.get("user_prompt") or "")
if row.get("history_json"):  # a regenerated row on its second review: what was asked and rejected before
    with st.expander(f"Earlier attempts ({row.get('attempts')})", expanded=False):
        st.json(json.loads(row["history_json"]))
st.markdown("**Response**")
st.text(row.get("response") or "(no response)")
edited = st.text_area("Edit the response (then press Save edit)", value=row.get("response") or "", key=f"edit-{idx}",
                      help=f"At most {max_chars:,} characters; stored and shown as plain text")
note = st.text_input("Note (optional)", key=f"note-{idx}", help=f"At most {max_chars:,} characters")


def _label(decision: str) -> bool:
    """Append the label under the identified reviewer; False (with a message) when input is too long."""
    too_long = [f"{what} has {len(text):,} characters" for what, text in
                (("The edit", edited if decision == "edit" else ""), ("The note", note or ""))
                if len(text) > max_chars]
    if too_long:
        st.error(f"Not saved: {' and '.join(too_long)}; the limit is {max_chars:,} (NEXUS_REVIEW_MAX_CHARS).")
        return False
    review_store.add_label(dataset_uri, row["row_id"], decision, reviewer,
                           edited_output=edited if decision == "edit" else None, note=note or None)
    st.session_state["idx"] = min(idx + 1, n - 1)
    return True


cols = st.columns(5)
if cols[0].button("Accept", key="accept", shortcut="a", type="primary") and _label("accept"):
    st.rerun()
if cols[1].button("Reject", key="reject", shortcut="x") and _label("reject"):
    st.rerun()
if cols[2].button("Save edit", key="edit", shortcut="e") and _label("edit"):
    st.rerun()
if cols[3].button("Previous", key="prev", shortcut="k"):
    st.session_state["idx"] = max(idx - 1, 0)
    st.rerun()
if cols[4].button("Next", key="next", shortcut="j"):
    st.session_state["idx"] = min(idx + 1, n - 1)
    st.rerun()

st.divider()
if request_id is None:
    st.caption("No flow run is waiting for this dataset: labels are stored and used by the next human-mode run.")
elif st.button(f"Submit batch ({len(labels)} labels) and resume the flow", key="submit"):
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    run_input = {"reviewer": reviewer, "labels_digest": review_store.labels_digest(dataset_uri),
                 "labels": len(labels)}
    try:
        # The flow records its request just before it pauses: a quick reviewer can get here first.
        deadline = time.monotonic() + 30
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(flow_run_id).state
                if state is None or state.is_paused() or state.is_final():
                    break
                time.sleep(0.5)
        resume_flow_run(flow_run_id, run_input=run_input)
    except Exception as exc:  # noqa: BLE001 - show the reason (not paused, timed out, API down)
        st.error(f"Could not resume flow run {code(flow_run_id)}: {code(f'{type(exc).__name__}: {exc}')}")
    else:
        review_store.mark_submitted(request_id, reviewer)
        st.success(f"Submitted {len(labels)} labels; flow run {flow_run_id} resumed.")
        st.code(json.dumps(run_input), language="json")
