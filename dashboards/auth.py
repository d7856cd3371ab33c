"""Login for shared deployments: Streamlit's OIDC (``st.login``), on only when configured.

Locally there is no ``[auth]`` section in ``.streamlit/secrets.toml``, so :func:`require_login`
does nothing. On a shared deployment, an ``[auth]`` section (see dashboards/README.md) turns it on:
every page then asks for an OIDC login first, and ``auth.allowed_domains`` (ours, optional) limits
who gets in by e-mail domain. Reviewers' labels are attributed to the logged-in e-mail.
"""

from __future__ import annotations

import streamlit as st


def auth_configured() -> bool:
    """True when ``.streamlit/secrets.toml`` (or the app's secrets) has an ``[auth]`` section."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets file at all: local use
        return False


def current_user() -> str | None:
    """The logged-in user's e-mail (or name), None when auth is off or nobody is logged in."""
    if not auth_configured() or not st.user.get("is_logged_in"):
        return None
    return st.user.get("email") or st.user.get("name")


def require_login() -> None:
    """Stop the page behind a login button when auth is configured and nobody is logged in."""
    if not auth_configured():
        return
    if not st.user.get("is_logged_in"):
        st.title("Nexus")
        st.write("This Nexus deployment is shared: log in with your organisation's account.")
        if st.button("Log in", type="primary"):
            st.login()
        st.stop()
    allowed = list(st.secrets["auth"].get("allowed_domains", []))
    email = str(st.user.get("email") or "")
    if allowed and email.rsplit("@", 1)[-1] not in allowed:
        st.error(f"{email or 'This account'} is not allowed here (allowed domains: {', '.join(allowed)}).")
        if st.button("Log out"):
            st.logout()
        st.stop()
    st.sidebar.caption(f"Logged in as {email or st.user.get('name')}")
    if st.sidebar.button("Log out"):
        st.logout()
