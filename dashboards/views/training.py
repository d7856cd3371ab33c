"""Training: runs from MLflow with loss, learning-rate and tokens/s curves; compare runs side by side."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.ui import empty, header, load

header("Training", "Training runs logged to MLflow: curves per step, and a side-by-side comparison.")

runs: pl.DataFrame = load("training_runs", 200)
if runs.is_empty():
    empty("No training runs in MLflow yet.", "nexus run llm_train configs/llm_train/tiny.yaml")
    st.stop()

st.dataframe(runs.drop("run_id"), hide_index=True, width="stretch")
labels = {r["run_id"]: f"{r['name']} · {r['artifact'] or r['run_id'][:8]}" for r in runs.iter_rows(named=True)}
picked = st.multiselect("Compare runs", list(labels), default=list(labels)[:3], format_func=labels.get)
if not picked:
    st.caption("Pick one or more runs to draw their curves.")
    st.stop()

data: pl.DataFrame = load("curves", tuple(picked), labels)
if data.is_empty():
    st.info("These runs logged no per-step curves (train/loss, train/learning_rate, train/tokens_per_s).")
else:
    titles = {"loss": "Loss", "learning_rate": "Learning rate", "tokens_per_s": "Tokens / s"}
    tabs = st.tabs([titles[k] for k in titles])
    for tab, key in zip(tabs, titles, strict=True):
        part = data.filter(pl.col("metric") == key)
        with tab:
            if part.is_empty():
                st.caption(f"No {titles[key].lower()} logged for these runs.")
                continue
            chart = alt.Chart(part.to_pandas()).mark_line(point=part.height < 200).encode(
                x=alt.X("step:Q"), y=alt.Y("value:Q", title=titles[key], scale=alt.Scale(zero=False)), color=alt.Color("run:N", title="run"),
                tooltip=["run", "step", "value"])
            st.altair_chart(chart, width="stretch")

st.subheader("Side by side")
cmp = runs.filter(pl.col("run_id").is_in(picked)).with_columns(
    pl.col("run_id").replace_strict(labels, default=None).alias("run"))
st.dataframe(cmp.drop("run_id").select(pl.all().cast(pl.Utf8)).transpose(include_header=True, header_name="field", column_names="run"),
             hide_index=True, width="stretch")
