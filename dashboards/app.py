"""Nexus dashboards: a Streamlit multipage app.   streamlit run dashboards/app.py

Each page is a script in ``dashboards/views/`` (not ``pages/``, which Streamlit would also route on its own, skipping this shell and its login); this shell only lists them.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards.auth import require_login
from nexus_core.settings import configure_environment

configure_environment()

PAGES = Path(__file__).parent / "views"
st.set_page_config(page_title="Nexus", layout="wide")
require_login()  # OIDC login on shared deployments (dashboards/README.md); a no-op locally
pages = [st.Page(str(PAGES / "review.py"), title="Review", icon=":material/rate_review:", default=True)]
pages += [st.Page(str(p), title=p.stem.replace("_", " ").capitalize())
          for p in sorted(PAGES.glob("*.py")) if p.stem not in {"__init__", "review"}]
st.navigation(pages).run()
