"""Review queue: flow runs suspended or paused at their review gate, waiting for a human."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards import lib
from dashboards.ui import header

header("Review queue", "Flow runs waiting at their review gate (Prefect state Suspended or Paused).")

try:
    # Not cached: the queue is live (a run resumed a second ago must leave it now).
    queue: pl.DataFrame = lib.review_queue()
except Exception as exc:  # noqa: BLE001 - any client/transport error means the same thing here
    st.warning(f"Cannot reach the Prefect API ({type(exc).__name__}: {exc}). Start it with `make up`, "
               "or set PREFECT_API_URL.")
    st.stop()

if queue.is_empty():
    st.info("No flow runs are waiting for review. A distill run in human mode pauses here: run "
            "`nexus run distill configs/distill/tiny.yaml review.mode=human`.", icon=":material/info:")
    st.stop()

st.metric("Waiting", queue.height)
st.dataframe(queue, hide_index=True, width="stretch")
for row in queue.iter_rows(named=True):
    what = f"{row['rows']} rows of {row['dataset_uri']}" if row["dataset_uri"] else "no review request recorded"
    st.text(f"- {row['flow']} / {row['flow_run']} — {row['state']} since {row['since']}: {what}")  # plain text
st.caption("Label the rows and submit on the Review page: it resumes the flow run with your labels.")
