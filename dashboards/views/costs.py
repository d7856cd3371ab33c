"""Costs: spend by flow, step, provider and day from the cost ledger, against flow budgets."""

from __future__ import annotations

import datetime as dt

import altair as alt
import polars as pl
import streamlit as st

from dashboards.ui import empty, header, load

header("Costs", "The cost ledger (API tokens, GPU time) grouped the way you ask, against budgets.")

ledger: pl.DataFrame = load("cost_frame")
if ledger.is_empty():
    empty("No spend recorded yet: API and GPU steps write the ledger.", "nexus run distill configs/distill/tiny.yaml")
    st.stop()

c1, c2, c3, c4 = st.columns(4)
c1.metric("Spend (USD)", f"${ledger['usd'].sum():,.2f}")
c2.metric("GPU hours", f"{ledger['gpu_seconds'].sum() / 3600:,.2f}")
c3.metric("Tokens in / out", f"{ledger['tokens_in'].sum():,} / {ledger['tokens_out'].sum():,}")
c4.metric("Ledger entries", f"{ledger.height:,}")

by = st.segmented_control("Spend by", ["flow", "step", "provider", "day"], default="flow") or "flow"
grouped = (ledger.group_by(by).agg(pl.col("usd").sum(), (pl.col("gpu_seconds").sum() / 3600).alias("gpu_hours"),
                                   pl.col("tokens_in").sum(), pl.col("tokens_out").sum(), pl.len().alias("entries"))
           .sort("usd", descending=True))
if by == "day":
    daily = grouped.sort("day").with_columns(pl.col("usd").cum_sum().alias("cumulative_usd"))
    base = alt.Chart(daily.to_pandas()).encode(x=alt.X("day:T"))
    st.altair_chart(base.mark_bar().encode(y=alt.Y("usd:Q", title="USD per day"), tooltip=["day", "usd"])
                    + base.mark_line(color="#de2d26").encode(y="cumulative_usd:Q"), width="stretch")
else:
    by_kind = ledger.group_by(by, "kind").agg(pl.col("usd").sum())
    st.altair_chart(alt.Chart(by_kind.to_pandas()).mark_bar().encode(
        x=alt.X("usd:Q", title="USD"), y=alt.Y(f"{by}:N", sort="-x", title=None), color="kind:N",
        tooltip=[by, "kind", "usd"]), width="stretch")
st.dataframe(grouped, hide_index=True, width="stretch",
             column_config={"usd": st.column_config.NumberColumn(format="$%.4f")})

st.subheader("Budgets")
budgets: dict[str, float] = load("flow_budgets")
runs = (ledger.filter(pl.col("flow_run_id").is_not_null()).group_by("flow", "flow_run_id")
        .agg(pl.col("usd").sum(), pl.col("created_at").max().alias("last_entry")).sort("last_entry", descending=True))
if not budgets:
    st.caption("No flow sets `budget_usd` yet: set it in a flow config to check runs against it "
               "(steps refuse to start past it).")
for flow, budget in sorted(budgets.items()):
    mine = runs.filter(pl.col("flow") == flow)
    latest = float(mine["usd"][0]) if mine.height else 0.0
    share = latest / budget if budget else 0.0
    st.progress(min(share, 1.0), text=f"{flow}: newest run ${latest:,.2f} of ${budget:,.2f} ({share:.0%})")
    if share > 1:
        st.error(f"{flow}: the newest run is over its budget.")
monthly = st.sidebar.number_input("Monthly budget (USD)", min_value=0.0, value=0.0, step=50.0,
                                  help="Compares this month's spend across every flow; 0 hides it.")
if monthly:
    month = ledger.filter(pl.col("day") >= dt.date.today().replace(day=1))["usd"].sum()
    st.progress(min(month / monthly, 1.0), text=f"This month: ${month:,.2f} of ${monthly:,.2f}")
st.dataframe(runs.head(50), hide_index=True, width="stretch")
