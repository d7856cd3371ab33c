"""Dashboards closed by default: loopback bind, login when exposed, reviewer = identity, plain-text rows.

Probes:
- `make up`'s dashboard block (deployments/up.sh, run here with a stub `start`) binds 127.0.0.1 with
  usage statistics off, and refuses an exposed host without an [auth] login configured;
- the app itself refuses to render when served beyond loopback without a login;
- the Review page shows the identified user read-only and writes labels under it, whatever the
  widget says; an over-long edit is refused with a message; row content is shown as text, not Markdown.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboards import serve
from nexus_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
UP = REPO / "deployments" / "up.sh"
REVIEW = REPO / "dashboards" / "views" / "review.py"
AUTH = {"redirect_uri": "https://nexus.example.org/oauth2callback", "cookie_secret": "not-a-real-secret",
        "client_id": "nexus", "client_secret": "not-a-real-secret",
        "server_metadata_url": "https://login.example.org/.well-known/openid-configuration"}
EVIL = "<img src=x onerror=alert(1)> [click me](javascript:alert(1)) **bold** :red[red]"


# ------------------------------------------------------------------ make up (deployments/up.sh)


def _dashboard_block() -> str:
    text = UP.read_text()
    match = re.search(r"^# >>> dashboard.*?^# <<< dashboard$", text, re.S | re.M)
    assert match, "deployments/up.sh lost its '# >>> dashboard' block"
    return match.group(0)


def _run_up_block(tmp_path: Path, env: dict[str, str] | None = None,
                  secrets: dict | None = None) -> subprocess.CompletedProcess:
    """Run up.sh's dashboard block as up.sh does (cd'ed to a root holding dashboards/), with a stub
    `start` that prints its arguments; HOME and the project .streamlit/ are the test's own."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "dashboards").symlink_to(REPO / "dashboards")
    (tmp_path / "home").mkdir()
    if secrets is not None:
        (root / ".streamlit").mkdir()
        (root / ".streamlit" / "secrets.toml").write_text(
            "[auth]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in secrets.items()))
    script = ("set -euo pipefail\nBIN=" + str(Path(sys.executable).parent) + "\n"
              "start() { printf 'START %s\\n' \"$*\"; }\n" + _dashboard_block() + '\necho "URL $DASHBOARD_URL"\n')
    clean = {k: v for k, v in os.environ.items() if k not in {serve.HOST_VAR, serve.PORT_VAR}}
    return subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**clean, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), **(env or {})})


def test_make_up_binds_the_dashboard_to_loopback_with_usage_stats_off(tmp_path):
    proc = _run_up_block(tmp_path)
    assert proc.returncode == 0, proc.stderr
    starts = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("START ")]
    assert len(starts) == 1 and starts[0][0] == "streamlit"
    args = starts[0]
    assert args[1].endswith("/streamlit") and args[2:4] == ["run", str(REPO / "dashboards" / "app.py")]
    assert args[args.index("--server.address") + 1] == "127.0.0.1"
    assert args[args.index("--browser.gatherUsageStats") + 1] == "false"
    assert "URL http://127.0.0.1:8501" in proc.stdout  # the URL printed is the one bound


def test_make_up_refuses_an_exposed_dashboard_without_a_login(tmp_path):
    proc = _run_up_block(tmp_path, env={serve.HOST_VAR: "0.0.0.0"})
    assert proc.returncode == 2
    assert "START" not in proc.stdout  # nothing started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "NEXUS_DASHBOARD_HOST=0.0.0.0" in errors[0] and "[auth]" in errors[0] and "secrets.toml" in errors[0]


def test_make_up_starts_an_exposed_dashboard_only_with_a_login(tmp_path):
    proc = _run_up_block(tmp_path, env={serve.HOST_VAR: "0.0.0.0", serve.PORT_VAR: "8600"}, secrets=AUTH)
    if serve.authlib_installed():
        assert proc.returncode == 0, proc.stderr
        start = next(line for line in proc.stdout.splitlines() if line.startswith("START "))
        assert "--server.address 0.0.0.0" in start and "--server.port 8600" in start
        assert "URL http://0.0.0.0:8600" in proc.stdout
    else:  # the login cannot work without Authlib: refused, saying what to install
        assert proc.returncode == 2 and "START" not in proc.stdout
        assert "Authlib" in proc.stderr and ".[dashboards]" in proc.stderr


def test_exposed_command_needs_a_complete_auth_section(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "authlib_installed", lambda: True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / ".streamlit").mkdir()
    secrets = tmp_path / ".streamlit" / "secrets.toml"
    secrets.write_text('[auth]\nclient_id = "nexus"\nredirect_uri = "https://x/oauth2callback"\n')
    env = {serve.HOST_VAR: "10.0.0.5"}
    with pytest.raises(ConfigError, match="cookie_secret"):
        serve.streamlit_command(env=env, cwd=tmp_path)
    secrets.write_text("[auth]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in AUTH.items()))
    cmd = serve.streamlit_command(env=env, cwd=tmp_path)
    assert cmd[cmd.index("--server.address") + 1] == "10.0.0.5"
    # loopback spellings need no login; a malformed host is one clear error
    for host in ("127.0.0.1", "localhost", "::1"):
        assert serve.is_loopback(host)
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback(None) and not serve.is_loopback("nexus.lan")
    with pytest.raises(ConfigError, match=serve.HOST_VAR):
        serve.dashboard_host({serve.HOST_VAR: "0.0.0.0 --server.enableCORS=false"})


def test_prefect_and_mlflow_bind_loopback_and_streamlit_config_is_closed():
    text = UP.read_text()
    assert re.search(r"prefect\" server start --host 127\.0\.0\.1 ", text)
    assert re.search(r"mlflow\" ui .*--host 127\.0\.0\.1 ", text)
    outside = text.replace(_dashboard_block(), "")
    assert not re.search(r"start streamlit|streamlit\"? run", outside), "a streamlit start outside the dashboard block"
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1" and config["browser"]["gatherUsageStats"] is False
    ignored = subprocess.run(["git", "check-ignore", "-q", ".streamlit/secrets.toml"], cwd=REPO)
    assert ignored.returncode == 0, ".streamlit/secrets.toml (OIDC client secret) is not git-ignored"


# ------------------------------------------------------------------ the app


@pytest.mark.parametrize("page", ["review.py", "data.py"])
def test_pages_refuse_to_render_when_exposed_without_a_login(page, monkeypatch):
    monkeypatch.setattr("dashboards.auth.server_address", lambda: "0.0.0.0")
    at = AppTest.from_file(str(REPO / "dashboards" / "views" / page), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error and "without a login" in at.error[0].value
    assert not at.button and not at.text_area and not at.selectbox


@pytest.fixture(scope="module")
def review_dataset(tmp_path_factory) -> str:
    """A real filtered distill dataset (ingest + the real filters through run_step) with one row whose
    response is Markdown/HTML that must never render."""
    from nexus_core.artifacts import raw_ref
    from nexus_core.corpus.ingest import IngestConfig, run_ingest
    from nexus_core.distill.filters import FiltersConfig, run_distill_filters
    from nexus_core.runner import run_step

    good = ("We measure soil respiration in 12 randomised control plots and compare drought cycles. If "
            "rewetting drives the pulse then respiration predicts carbon loss; a flat response would refute it.")
    rows = [{"row_id": "x1", "template_name": "hypothesis", "status": "ok", "input": "Soil?", "domain": EVIL,
             "response": good + " " + EVIL},
            {"row_id": "x2", "template_name": "hypothesis", "status": "ok", "input": "Hive?", "domain": "ecology",
             "response": good.replace("soil", "hive")}]
    raw = tmp_path_factory.mktemp("rel-dash") / "rows.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    collected = run_step(run_ingest, IngestConfig(sources=[str(raw)], required_columns=["row_id", "response"],
                                                  dedupe_on=None), name="reldash_collected",
                         inputs={"source_0": raw_ref(raw)})
    filtered = run_step(run_distill_filters, FiltersConfig(rules=str(REPO / "configs/distill/filters.yaml")),
                        name="reldash_filtered", inputs={"collected": collected.ref})
    return filtered.ref.uri


def _review(auth: dict | None = None, user: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(REVIEW), default_timeout=60)
    if auth:
        at.secrets["auth"] = auth
    if user is not None:
        at.user = user
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    label = next(o for o in at.selectbox(key="dataset").options if o.startswith("reldash_filtered"))
    at.selectbox(key="dataset").select(label).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _labels(uri: str) -> list:
    from nexus_core.distill import review_store

    return review_store.all_labels(uri)


def test_review_page_shows_the_os_user_read_only_and_labels_under_it(review_dataset):
    at = _review()
    box = at.text_input(key="reviewer")
    assert box.value == getpass.getuser() and box.disabled
    before = len(_labels(review_dataset))
    at.session_state["reviewer"] = "mallory"  # a forged widget value (a browser cannot edit it) changes nothing
    at.run()
    assert at.text_input(key="reviewer").value == getpass.getuser()
    at.button(key="accept").click().run()
    assert not at.exception
    new = _labels(review_dataset)[before:]
    assert [(lb.decision, lb.reviewer) for lb in new] == [("accept", getpass.getuser())]


def test_review_page_labels_under_the_oidc_login(review_dataset, monkeypatch):
    at = _review(AUTH, {"is_logged_in": True, "email": "ana@example.org", "name": "Ana"})
    assert at.text_input(key="reviewer").value == "ana@example.org" and at.text_input(key="reviewer").disabled
    before = len(_labels(review_dataset))
    at.button(key="reject").click().run()
    assert not at.exception
    assert [(lb.decision, lb.reviewer) for lb in _labels(review_dataset)[before:]] == [("reject", "ana@example.org")]


def test_review_page_refuses_an_over_long_edit(review_dataset, monkeypatch):
    monkeypatch.delenv(serve.MAX_CHARS_VAR, raising=False)
    at = _review()
    before = len(_labels(review_dataset))
    edit = next(t for t in at.text_area if t.key.startswith("edit-"))
    edit.set_value("y" * (serve.DEFAULT_MAX_CHARS + 1)).run()
    at.button(key="edit").click().run()
    assert not at.exception
    assert any("Not saved" in e.value and "20,001 characters" in e.value and "20,000" in e.value for e in at.error)
    assert len(_labels(review_dataset)) == before  # nothing stored
    edit = next(t for t in at.text_area if t.key.startswith("edit-"))
    edit.set_value("A fixed answer.").run()
    at.button(key="edit").click().run()
    got = _labels(review_dataset)[before:]
    assert [(lb.decision, lb.edited_output) for lb in got] == [("edit", "A fixed answer.")]


def test_review_page_shows_row_content_as_plain_text(review_dataset):
    at = _review()
    at.session_state["idx"] = 0
    at.run()
    shown = [t.value for t in at.text]
    assert any(EVIL in t for t in shown) and any(t.startswith(f"x1 · {EVIL}") for t in shown), shown
    rendered = [str(m.value) for kind in ("markdown", "caption", "error", "info", "success", "title")
                for m in getattr(at, kind)]
    assert not any("onerror" in r or "javascript:" in r for r in rendered), rendered
