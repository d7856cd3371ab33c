"""No secrets at rest: a provider that echoes the ``Authorization`` header in its error bodies leaves
the API key nowhere the run writes (tables, manifests, MLflow, the catalog, Prefect's database, logs),
and a key written into a config is refused before it can reach Prefect's flow-run parameters."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path

import polars as pl
import pytest

from nexus_core.config import load_config, redact
from nexus_core.errors import ConfigError
from nexus_core.llm.client import LLMClient, LLMConfig
from nexus_core.secrets import scrub
from tests.support import distill_teacher
from tests.support.openai_stub import StubServer

# Shaped like no well-known key (no sk-/hf_ prefix) and held in a variable whose name does not look
# secret: only the client's own key and the header patterns can catch it.
PLANTED = "plnt-7f3a9c1e5b2d4f60a8e1-c0ffee"
ENV = "NEXUS_TEST_TEACHER_CRED"


def _readable_bytes(path: Path) -> bytes:
    """A file's bytes; for Parquet (compressed pages) its decoded rows as JSON, for gzip the inflated bytes."""
    data = path.read_bytes()
    if data[:4] == b"PAR1":
        return pl.read_parquet(path).write_json().encode()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def _files_holding(needle: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` that holds ``needle`` (also UTF-16 and JSON-escaped forms)."""
    forms = {needle.encode(), needle.encode("utf-16-le"), json.dumps(needle).encode()[1:-1]}
    hits = []
    for root in roots:
        if not root.exists():
            continue
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = _readable_bytes(path)
                if any(f in data for f in forms):
                    hits.append(str(path))
    return hits


def test_client_error_rows_hold_no_key(monkeypatch):
    """A 401 that echoes the headers (permanent) and a 500 that does (retried): the stub saw the key,
    the rows keep the error type but not the key."""
    monkeypatch.setenv(ENV, PLANTED)
    for status, kind in ((401, "AuthenticationError"), (500, "InternalServerError")):
        with StubServer(echo_headers=lambda body, n: True, echo_status=status) as stub:
            client = LLMClient(LLMConfig(model="openai/t", api_base=stub.url, api_key_env=ENV, max_retries=1,
                                         backoff_s=0, max_backoff_s=0, cache=False))
            [done] = client.map_sync([[{"role": "user", "content": "hi"}]])
            client.close()
        assert set(stub.auth) == {f"Bearer {PLANTED}"}  # the key went out and came back in the body
        assert done.status == "failed" and done.error
        assert done.error.split(":")[0] == kind and done.attempts == (1 if status == 401 else 2)
        assert PLANTED not in done.error and "***" in done.error


def test_judge_unreachable_error_holds_no_key(monkeypatch, repo):
    from nexus_core.evaluate.rubric import JudgeSettings, JudgeUnreachable, judge_llm, load_rubric

    monkeypatch.setenv(ENV, PLANTED)
    rubric = load_rubric(repo / "configs/eval/rubric.json")
    with StubServer(echo_headers=lambda body, n: True, echo_status=500) as stub:
        settings = JudgeSettings(api_base=stub.url, api_key_env=ENV, max_retries=0, cache=False)
        with pytest.raises(JudgeUnreachable) as info:
            judge_llm([{"question": "q", "answer": "a", "reference": "r"}], rubric, settings)
    assert stub.auth == [f"Bearer {PLANTED}"]
    assert "InternalServerError" in str(info.value) and PLANTED not in str(info.value)


def test_scrub_removes_env_values_headers_and_key_shapes(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_PASSWD", "hunter2hunter2")
    text = ("down: {'Authorization': 'Bearer abcdefgh12345678', 'x-api-key': 'zzzz9999zzzz'} "
            "key sk-proj-ABCDEFGHIJKLMNOP pw=hunter2hunter2 extra my-own-value-123")
    out = scrub(text, ["my-own-value-123"])
    for leaked in ("abcdefgh12345678", "zzzz9999zzzz", "sk-proj-ABCDEFGHIJKLMNOP", "hunter2hunter2",
                   "my-own-value-123"):
        assert leaked not in out
    assert out.startswith("down: ")
    assert scrub("max_tokens: 512, token count 5, basic arithmetic") == "max_tokens: 512, token count 5, basic arithmetic"


def test_redact_value_equal_to_a_secret_env_var(monkeypatch):
    monkeypatch.setenv("ACME_TOKEN", "tok-0123456789abcdef")
    out = redact({"note": "tok-0123456789abcdef", "url": "https://x?k=tok-0123456789abcdef", "n": 3})
    assert out == {"note": "***", "url": "https://x?k=***", "n": 3}


def test_key_in_yaml_is_refused_without_echoing_it(tmp_path):
    cfg = tmp_path / "configs" / "t.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"model: openai/x\napi_key: {PLANTED}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, LLMConfig)
    msg = str(info.value)
    assert str(cfg) in msg and "api_key:" in msg and "api_key_env" in msg and PLANTED not in msg


@pytest.mark.slow
@pytest.mark.integration
def test_distill_flow_against_an_echoing_teacher_writes_the_key_nowhere(prefect_harness, repo, data_root,
                                                                         monkeypatch, caplog, capfd):
    """The scientific config against a teacher that answers some requests (collection and
    regeneration) with a 500 echoing every header; then every file of the run is searched for the key."""
    import prefect.settings
    from prefect.logging.handlers import APILogHandler

    from flows.common import load_flow_config
    from flows.distill import DistillConfig, distill

    monkeypatch.setenv(ENV, PLANTED)
    caplog.set_level(logging.INFO)

    def echo(body, n):  # about a third of all prompts, whatever the stage
        return distill_teacher._bucket(body["messages"][-1]["content"]) < 3

    with StubServer(distill_teacher.handler, echo_headers=echo, echo_status=500) as stub:
        cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/scientific.yaml"),
                               ["name=dsecret", "teacher.model=openai/gpt-4o-mini", f"teacher.api_base={stub.url}",
                                f"teacher.api_key_env={ENV}",
                                "teacher.rpm=6000", "teacher.max_retries=1", "teacher.backoff_s=0",
                                "teacher.max_backoff_s=0", "review.mode=auto"])
        try:
            result = distill(cfg)
        except Exception as exc:  # noqa: BLE001 - a failed run must not leak either; its message is scanned
            result, failure = None, str(exc)
        else:
            failure = ""
    APILogHandler().flush()  # logs of the run reach the Prefect database before the scan
    out, err = capfd.readouterr()

    assert PLANTED not in failure
    assert set(stub.auth) == {f"Bearer {PLANTED}"}
    assert len(stub.auth) > 40  # every prompt asked, the echoed ones twice (one retry)
    assert result is not None, failure
    col = pl.read_parquet(result.artifacts['collected'].path / "data.parquet")
    errors = col.filter(pl.col("status") == "failed")["error"].to_list()
    assert errors and all(re.match(r"\w+Error: ", e) and "Bearer ***" in e for e in errors)
    regen = pl.read_parquet(result.artifacts['regenerated'].path / "data.parquet")
    assert regen["history_json"].str.contains("teacher failed: ", literal=True).any()  # regeneration met it too

    home = Path(os.environ["NEXUS_HOME"])
    prefect_db = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    scanned = [data_root, home, prefect_db.parent, Path(os.environ.get("PREFECT_HOME", home / "prefect"))]
    assert (home / "mlflow.db").exists() or any(home.glob("*.db")) or any(home.rglob("*.sqlite"))
    assert prefect_db.exists()
    assert _files_holding(PLANTED, *scanned) == []
    assert PLANTED not in out and PLANTED not in err and PLANTED not in caplog.text
