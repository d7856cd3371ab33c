"""Who is using the dashboard, and the login gate. Closed by default (dashboards/serve.py):

- On a loopback address (the default, ``127.0.0.1``) without an ``[auth]`` section in
  ``.streamlit/secrets.toml``, nobody logs in: the user is the OS user who started the server.
- With an ``[auth]`` section (see dashboards/README.md), every page asks for an OIDC login first
  (``st.login``), and ``auth.allowed_domains`` (ours, optional) limits who gets in by e-mail domain.
- Served on any other address without ``[auth]``, every page refuses to render.

Reviewers' labels are attributed to :func:`current_user`, never to a name typed into the page.
"""

from __future__ import annotations

import getpass

import streamlit as st

from dashboards.serve import HOST_VAR, authlib_installed, is_loopback


def auth_configured() -> bool:
    """True when ``.streamlit/secrets.toml`` (or the app's secrets) has an ``[auth]`` section."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets file at all: local use
        return False


def server_address() -> str | None:
    """The address this Streamlit server is bound to (None or "": every interface)."""
    return st.get_option("server.address")


def exposed() -> bool:
    """True when the server listens beyond this machine (not a loopback address)."""
    return not is_loopback(server_address())


def code(text: object) -> str:
    """``text`` as a Markdown code span: shown as typed, never rendered as Markdown, links or HTML."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def current_user() -> str | None:
    """The logged-in user's e-mail (or name) when a login is configured; else, on a loopback
    address, the OS user running the server; None when nobody is identified."""
    if auth_configured():
        if not st.user.get("is_logged_in"):
            return None
        return str(st.user.get("email") or st.user.get("name") or "") or None
    if exposed():
        return None
    return getpass.getuser()


def require_login() -> None:
    """Stop the page unless its user is identified: a login button when auth is configured and nobody
    is logged in, a refusal when the server is exposed without auth. A no-op on loopback without auth."""
    if not auth_configured():
        if exposed():
            st.title("Nexus")
            st.error(f"This dashboard listens on {code(server_address() or 'every interface')} without a "
                     "login. Configure an OIDC login (an `[auth]` section in `.streamlit/secrets.toml`, see "
                     f"dashboards/README.md) or serve it on 127.0.0.1 (unset `{HOST_VAR}`).")
            st.stop()
        return
    if not st.user.get("is_logged_in"):
        st.title("Nexus")
        if not authlib_installed():
            st.error("A login is configured (`[auth]` in `.streamlit/secrets.toml`) but Authlib is not "
                     "installed on this host: `pip install -e '.[dashboards]'`, then restart the dashboard.")
            st.stop()
        st.write("This Nexus deployment is shared: log in with your organisation's account.")
        if st.button("Log in", type="primary"):
            st.login()
        st.stop()
    allowed = list(st.secrets["auth"].get("allowed_domains", []))
    email = str(st.user.get("email") or "")
    if allowed and email.rsplit("@", 1)[-1] not in allowed:
        who = code(email) if email else "This account"
        st.error(f"{who} is not allowed here (allowed domains: {', '.join(allowed)}).")
        if st.button("Log out"):
            st.logout()
        st.stop()
    st.sidebar.caption(f"Logged in as {code(current_user())}")
    if st.sidebar.button("Log out"):
        st.logout()
