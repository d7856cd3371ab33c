"""How the dashboard is served: bind address, when a login is required, input limits.

``deployments/up.sh`` starts Streamlit with the command line :func:`streamlit_command` builds
(``python -m dashboards.serve command``), and prints :func:`dashboard_url`. The rules:

- The app binds ``NEXUS_DASHBOARD_HOST`` (default ``127.0.0.1``: this machine only) on
  ``STREAMLIT_PORT`` (default 8501), with Streamlit's usage statistics off.
- On a loopback address nobody logs in; the reviewer is the OS user who started the server.
- On any other address (``0.0.0.0``, a LAN address, a host name) the dashboard is *exposed*: it
  refuses to start without an ``[auth]`` section (OIDC, see dashboards/README.md) in a
  ``secrets.toml`` Streamlit reads, or without Authlib (``pip install -e '.[dashboards]'``).
  The app checks the same at run time (:mod:`dashboards.auth`), for a server started by hand.

No Streamlit import at module level: up.sh runs this before the server starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from nexus_core.errors import ConfigError

APP = Path(__file__).resolve().parent / "app.py"
HOST_VAR, PORT_VAR, MAX_CHARS_VAR = "NEXUS_DASHBOARD_HOST", "STREAMLIT_PORT", "NEXUS_REVIEW_MAX_CHARS"
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_MAX_CHARS = "127.0.0.1", 8501, 20_000
# What st.login needs in [auth] whichever provider layout is used (flat or [auth.<provider>]).
AUTH_KEYS = ("redirect_uri", "cookie_secret")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback IPs; False for everything else, including ``None`` / ``""``
    (Streamlit's default address: every interface) and host names (they may resolve anywhere)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard_host(env: Mapping[str, str] | None = None) -> str:
    """The bind address: ``NEXUS_DASHBOARD_HOST``, default 127.0.0.1. One ConfigError if malformed."""
    env = os.environ if env is None else env
    host = env.get(HOST_VAR, DEFAULT_HOST).strip()
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        if _HOSTNAME.match(host):
            return host
    raise ConfigError([f"{HOST_VAR}={host!r}: not an IP address or host name "
                       f"(127.0.0.1 for this machine only, 0.0.0.0 for every interface)"], source="environment")


def dashboard_port(env: Mapping[str, str] | None = None) -> int:
    """The port: ``STREAMLIT_PORT``, default 8501."""
    env = os.environ if env is None else env
    raw = env.get(PORT_VAR, str(DEFAULT_PORT)).strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError([f"{PORT_VAR}={raw!r}: not a port number (1-65535)"], source="environment")
    return int(raw)


def review_max_chars(env: Mapping[str, str] | None = None) -> int:
    """Longest edit or note the Review page stores (``NEXUS_REVIEW_MAX_CHARS``, default 20,000)."""
    env = os.environ if env is None else env
    raw = env.get(MAX_CHARS_VAR, str(DEFAULT_MAX_CHARS)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError([f"{MAX_CHARS_VAR}={raw!r}: must be a positive whole number of characters"],
                          source="environment")
    return int(raw)


def secrets_files(cwd: Path | None = None) -> list[Path]:
    """The secrets files ``streamlit run`` reads from ``cwd`` (Streamlit's default ``secrets.files``):
    ``~/.streamlit/secrets.toml`` then ``<cwd>/.streamlit/secrets.toml``."""
    cwd = Path.cwd() if cwd is None else cwd
    return [Path.home() / ".streamlit" / "secrets.toml", cwd / ".streamlit" / "secrets.toml"]


def auth_problems(files: list[Path]) -> list[str]:
    """Why ``files`` do not configure a login ([] when one of them has a usable ``[auth]`` section)."""
    problems: list[str] = []
    for path in files:
        if not path.is_file():
            continue
        try:
            auth = tomllib.loads(path.read_text()).get("auth")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        if not isinstance(auth, dict):
            continue
        missing = [k for k in AUTH_KEYS if not auth.get(k)]
        if not missing:
            return []
        problems.append(f"{path}: [auth] lacks {', '.join(missing)}")
    where = " or ".join(str(p) for p in files)
    return problems or [f"no [auth] section in {where}"]


def authlib_installed() -> bool:
    """Whether ``st.login`` can work (it needs Authlib>=1.3.2)."""
    try:
        import authlib
    except ImportError:
        return False
    try:
        return tuple(int(p) for p in authlib.__version__.split(".")[:3]) >= (1, 3, 2)
    except ValueError:  # a pre-release spelling: assume recent enough
        return True


def streamlit_command(streamlit: str = "streamlit", *, env: Mapping[str, str] | None = None,
                      cwd: Path | None = None) -> list[str]:
    """The ``streamlit run`` command line for this environment, or one ConfigError when the
    dashboard would be exposed (non-loopback host) without a login configured."""
    host, port = dashboard_host(env), dashboard_port(env)
    if not is_loopback(host):
        problems = auth_problems(secrets_files(cwd))
        if not problems and not authlib_installed():
            problems = ["the login needs Authlib: pip install -e '.[dashboards]'"]
        if problems:
            raise ConfigError([f"{HOST_VAR}={host} exposes the dashboard beyond this machine, which needs an "
                               "OIDC login (dashboards/README.md), but: " + "; ".join(problems)
                               + f". Unset {HOST_VAR} to serve on 127.0.0.1 only."], source="environment")
    return [streamlit, "run", str(APP), "--server.headless", "true", "--server.address", host,
            "--server.port", str(port), "--browser.gatherUsageStats", "false"]


def dashboard_url(env: Mapping[str, str] | None = None) -> str:
    """The URL the dashboard is bound to (``0.0.0.0`` / ``::``: every interface)."""
    host, port = dashboard_host(env), dashboard_port(env)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    note = "  (every interface: use this machine's name)" if host in {"0.0.0.0", "::", "[::]"} else ""
    return f"http://{shown}:{port}{note}"


def main(argv: list[str] | None = None) -> int:
    """``python -m dashboards.serve command [STREAMLIT]`` prints the command line, one argument a line;
    ``python -m dashboards.serve url`` prints the bound URL. Errors: one ``error:`` line, exit 2."""
    from nexus_core.errors import NexusError

    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["command"]:
            print("\n".join(streamlit_command(*args[1:2])))
        elif args[:1] == ["url"]:
            print(dashboard_url())
        else:
            print("usage: python -m dashboards.serve command [STREAMLIT] | url", file=sys.stderr)
            return 2
    except NexusError as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
