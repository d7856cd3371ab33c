"""OIDC login gate: off without an [auth] secrets section, a login wall with one."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

SCRIPT = """
import streamlit as st
from dashboards.auth import current_user, require_login
require_login()
st.write(f"INSIDE as {current_user()}")
"""
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "not-a-real-secret",
        "client_id": "nexus", "client_secret": "not-a-real-secret", "allowed_domains": ["example.org"],
        "server_metadata_url": "https://login.example.org/.well-known/openid-configuration"}


def _run(auth: dict | None = None, user: dict | None = None) -> AppTest:
    at = AppTest.from_string(SCRIPT, default_timeout=30)
    if auth:
        at.secrets["auth"] = auth
    if user is not None:
        at.user = user
    return at.run()


def test_local_use_has_no_login():
    at = _run()
    assert not at.exception
    assert [m.value for m in at.markdown] == ["INSIDE as None"]


def test_shared_deployment_asks_for_login_and_hides_the_page():
    at = _run(AUTH)
    assert not at.exception
    assert [b.label for b in at.button] == ["Log in"]
    assert not any("INSIDE" in m.value for m in at.markdown)


def test_logged_in_user_of_an_allowed_domain_gets_in():
    at = _run(AUTH, {"is_logged_in": True, "email": "ana@example.org", "name": "Ana"})
    assert not at.exception
    assert "INSIDE as ana@example.org" in [m.value for m in at.markdown]
    assert "Logged in as ana@example.org" in [c.value for c in at.sidebar.caption]


def test_other_domains_are_turned_away():
    at = _run(AUTH, {"is_logged_in": True, "email": "eve@elsewhere.net"})
    assert not at.exception
    assert "not allowed here" in at.error[0].value
    assert not any("INSIDE" in m.value for m in at.markdown)
