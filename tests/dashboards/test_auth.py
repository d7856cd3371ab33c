"""The login gate: off on loopback without [auth], a login wall with one, a refusal when exposed without."""

from __future__ import annotations

import getpass

import pytest
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


@pytest.fixture
def authlib(monkeypatch):
    """Pretend Authlib is installed (st.login needs it; the test environment does not)."""
    monkeypatch.setattr("dashboards.auth.authlib_installed", lambda: True)


def test_local_use_has_no_login_and_the_user_is_the_os_user():
    at = _run()
    assert not at.exception
    assert [m.value for m in at.markdown] == [f"INSIDE as {getpass.getuser()}"]


def test_shared_deployment_asks_for_login_and_hides_the_page(authlib):
    at = _run(AUTH)
    assert not at.exception
    assert [b.label for b in at.button] == ["Log in"]
    assert not any("INSIDE" in m.value for m in at.markdown)


def test_login_without_authlib_says_what_to_install(monkeypatch):
    monkeypatch.setattr("dashboards.auth.authlib_installed", lambda: False)
    at = _run(AUTH)
    assert not at.exception
    assert "Authlib" in at.error[0].value and "[dashboards]" in at.error[0].value
    assert not at.button and not any("INSIDE" in m.value for m in at.markdown)


def test_logged_in_user_of_an_allowed_domain_gets_in():
    at = _run(AUTH, {"is_logged_in": True, "email": "ana@example.org", "name": "Ana"})
    assert not at.exception
    assert "INSIDE as ana@example.org" in [m.value for m in at.markdown]
    assert "Logged in as `ana@example.org`" in [c.value for c in at.sidebar.caption]


def test_other_domains_are_turned_away():
    at = _run(AUTH, {"is_logged_in": True, "email": "eve@elsewhere.net"})
    assert not at.exception
    assert "not allowed here" in at.error[0].value
    assert not any("INSIDE" in m.value for m in at.markdown)
