"""Data: datasets and versions (DataQuery), schema, sample rows, filter reasons, row history."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.auth import code
from dashboards.ui import empty, header, load

header("Data", "Every dataset and version under the data root, with its schema, rows and rejection reasons.")

sets: pl.DataFrame = load("datasets")
if sets.is_empty():
    empty("No datasets yet.", "nexus run lifecycle configs/presets/tiny.yaml")
    st.stop()

tables = sets.filter(pl.col("kind") != "model")
c1, c2, c3 = st.columns(3)
c1.metric("Artifacts", sets.height)
c2.metric("Datasets", tables.height)
c3.metric("Rows (latest versions)", f"{int(tables['rows'].fill_null(0).sum()):,}")
st.dataframe(sets.drop("uri"), hide_index=True, width="stretch")

names = [f"{r['area']}/{r['name']}" for r in sets.iter_rows(named=True)]
# Open on the first table rather than a model: that is what people come here to look at.
first_table = next((i for i, r in enumerate(sets.iter_rows(named=True)) if r["kind"] != "model"), 0)
wanted = st.query_params.get("dataset")  # deep link: /data?dataset=area/name
choice = st.selectbox("Dataset", names, index=names.index(wanted) if wanted in names else first_table)
area, name = choice.split("/", 1)
vers: pl.DataFrame = load("versions", area, name)
version = st.selectbox("Version", vers["version"].to_list(), format_func=lambda v: f"v{v}")
uri = vers.filter(pl.col("version") == version)["uri"][0]

st.subheader(f"{name}@v{version}")
st.dataframe(vers.drop("uri"), hide_index=True, width="stretch")

cols: pl.DataFrame = load("schema", uri)
if cols.is_empty():
    st.info("This artifact has no table (data.parquet): see the Lineage page for what made it.")
    st.stop()

left, right = st.columns([1, 2])
with left:
    st.markdown("**Schema**")
    st.dataframe(cols, hide_index=True, width="stretch")
with right:
    st.markdown("**Rejections by reason**")
    reasons: pl.DataFrame = load("reason_histogram", uri)
    if reasons.is_empty():
        st.caption("No reason column in this table (filters and review write `reasons` / `review_reason`).")
    else:
        chart = alt.Chart(reasons.to_pandas()).mark_bar().encode(
            x=alt.X("rows:Q", title="rows"), y=alt.Y("reason:N", sort="-x", title=None), tooltip=["reason", "rows"])
        st.altair_chart(chart, width="stretch")

n = st.slider("Sample rows", 5, 500, 50, step=5)
rows: pl.DataFrame = load("sample", uri, n)
st.dataframe(rows, hide_index=True, width="stretch")

labels: pl.DataFrame = load("label_counts")
mine = labels.filter(pl.col("dataset_uri") == uri)
if not mine.is_empty():
    st.markdown("**Human review labels**")
    st.dataframe(mine.drop("dataset_uri"), hide_index=True)

if "row_id" in cols["column"].to_list():
    st.subheader("Row history")
    st.caption("One row through collection, filters, review labels and every regeneration round.")
    first = rows["row_id"][0] if rows.height else ""
    row_id = st.text_input("row_id", value=str(first))
    if row_id:
        hist: pl.DataFrame = load("row_history", row_id)
        if hist.is_empty():
            st.warning(f"No artifact holds row_id {code(row_id)}.")
        else:
            st.dataframe(hist, hide_index=True, width="stretch")
