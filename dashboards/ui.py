"""Streamlit glue shared by the pages: cached calls into :mod:`dashboards.lib` and empty states."""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboards import lib
from dashboards.auth import require_login

TTL_S = 30  # figures may lag a running flow by this much; the Refresh button clears it at once


@st.cache_data(ttl=TTL_S, show_spinner=False)
def _call(name: str, store: tuple[str, str, str], args: tuple[Any, ...]) -> Any:
    return getattr(lib, name)(*args)


def load(name: str, *args: Any) -> Any:
    """``lib.<name>(*args)``, cached per store (data root, catalog, MLflow) for ``TTL_S`` seconds."""
    return _call(name, lib.store_key(), args)


def header(title: str, caption: str) -> None:
    """Login gate, page title, one-line purpose, and a refresh button that drops cached figures."""
    # Also gated here, not only in app.py: a cold server routes a deep link (/data) straight to the page.
    require_login()
    st.title(title)
    st.caption(caption)
    if st.sidebar.button("Refresh", key=f"refresh-{title}", help="Re-read the catalog, manifests and MLflow"):
        _call.clear()


def empty(what: str, command: str) -> None:
    """An empty state that says what to run to fill the page."""
    st.info(f"{what} Run `{command}` to fill it.", icon=":material/info:")
