"""Leaderboard: evaluation scores across models, the rubric breakdown, and gate verdicts."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.ui import empty, header, load

header("Leaderboard", "Evaluation reports per dataset and judge kind, ranked within each: gates passed first, "
                      "then coverage (rows the judge scored), then the rubric score.")

board: pl.DataFrame = load("leaderboard")
if board.is_empty():
    empty("No evaluation reports yet.", "nexus run evaluate configs/eval/tiny.yaml")
    st.stop()

f1, f2 = st.columns(2)
datasets = sorted({d for d in board["dataset"].to_list() if d})
ds = f1.selectbox("Dataset", ["(all)", *datasets])
kinds = sorted({k for k in board["judge_kind"].to_list() if k}, key=lambda k: (k != "llm", k))
# LLM-judged reports by default: a rule-based score must never look like it beats an LLM judge's
kind = f2.selectbox("Judge", [*kinds, "(all)"],
                    help="Heuristic scores come from rules, not an LLM judge: compare like with like. "
                         "(all) keeps each judge kind in its own group, LLM judges first.")
if ds != "(all)":
    board = board.filter(pl.col("dataset") == ds)
if kind != "(all)":
    board = board.filter(pl.col("judge_kind") == kind)

c1, c2, c3 = st.columns(3)
c1.metric("Reports", board.height)
c2.metric("Gates passed", int((board["gate"] == "pass").sum()))
best = board.filter(pl.col("score").is_not_null()).head(1)  # the board is in rank order, LLM judges first
c3.metric("Best score", f"{best['score'][0]:.2f}" if best.height else "–", best["model"][0] if best.height else None)

st.dataframe(board.drop("report_uri"), hide_index=True, width="stretch",
             column_config={"score": st.column_config.ProgressColumn("score", min_value=0, max_value=5, format="%.2f"),
                            "coverage": st.column_config.NumberColumn(
                                "coverage", format="%.3f", help="Rows the judge gave a usable verdict / rows")})

scored = board.filter(pl.col("score").is_not_null())
if not scored.is_empty():
    scored = scored.with_columns(pl.format("{} ({}, {} judge)", "model", "run_id", "judge_kind").alias("label"))
    chart = alt.Chart(scored.to_pandas()) \
        .mark_bar().encode(  # bars in rank order (judge kinds grouped), never re-sorted by raw score
            x=alt.X("score:Q"), y=alt.Y("label:N", sort=scored["label"].to_list(), title=None),
            color=alt.Color("gate:N", scale=alt.Scale(domain=["pass", "fail"], range=["#31a354", "#de2d26"])),
            tooltip=["model", "dataset", "score", "coverage", "gate", "judge_kind"])
    st.altair_chart(chart, width="stretch")

st.subheader("Rubric breakdown")
top = board.head(10)
reports = {f"{r['model']} ({r['run_id']})": load("report_details", r["report_uri"]) for r in top.iter_rows(named=True)}
rubric: pl.DataFrame = load("rubric_frame", reports)
if rubric.is_empty():
    st.caption("These reports carry no rubric scores.")
else:
    # One group of bars per rubric dimension, one bar per report within it.
    chart = alt.Chart(rubric.to_pandas()).mark_bar().encode(
        x=alt.X("median:Q", title="median score"), y=alt.Y("dimension:N", title=None), yOffset="model:N",
        color=alt.Color("model:N", legend=alt.Legend(orient="bottom", columns=1)),
        tooltip=["model", "dimension", "median"])
    st.altair_chart(chart, width="stretch")

st.subheader("Gate verdicts")
pick = st.selectbox("Report", list(reports))
gates = (reports.get(pick) or {}).get("gates") or []
if gates:
    st.dataframe(pl.DataFrame([{k: None if v is None else str(v) for k, v in g.items()} for g in gates]),
                 hide_index=True, width="stretch")
else:
    st.caption("This report has no gates.")
