"""Lineage: from a model (or any artifact) back to its datasets, prompts, teacher and reviews."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards.ui import empty, header, load

header("Lineage", "Walks the manifests' input refs back from an artifact: datasets, prompts, teacher, reviews.")

models: pl.DataFrame = load("models")
anything = st.toggle("Any artifact, not only models", value=models.is_empty())
if anything:
    sets: pl.DataFrame = load("datasets")
    options = {f"{r['area']}/{r['name']}@{r['latest']}": r["uri"] for r in sets.iter_rows(named=True)}
else:
    options = {r["model"]: r["uri"] for r in models.iter_rows(named=True)}
if not options:
    empty("No artifacts yet.", "nexus run lifecycle configs/presets/tiny.yaml")
    st.stop()

label = st.selectbox("Start from", list(options))
dot, nodes = load("lineage_graph", options[label])
st.graphviz_chart(dot, width="stretch")
st.caption("Boxes: datasets · 3-D boxes: models · cylinders: raw files · ellipses: teacher/judge models · "
           "notes: prompt templates and rules · octagons: human review labels.")
table = pl.DataFrame(nodes, schema={"node": pl.Utf8, "kind": pl.Utf8, "step": pl.Utf8, "uri": pl.Utf8,
                                    "mlflow_run_id": pl.Utf8})
st.dataframe(table, hide_index=True, width="stretch")
with st.expander("Graphviz source"):
    st.code(dot, language="dot")
