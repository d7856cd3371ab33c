"""A scripted podcast teacher, served by the OpenAI stub: two-speaker scripts built from the request.

The battery document's first answer is a monologue (one speaker), so the script check rejects it and
regeneration ("Revision round N") asks again and gets a proper script. It also records the offline
cache of the tiny podcast preset:

    python -m tests.support.podcast_teacher record    # rewrites configs/podcast/recorded/tiny_teacher.jsonl
"""

from __future__ import annotations

import re
from typing import Any

from tests.support.openai_stub import Reply, chat_completion

MONOLOGUE_TITLE = "Why batteries lose capacity in the cold"


def script_for(title: str, text: str) -> str:
    """A six-turn HOST/GUEST conversation about a document."""
    sentences = [s.strip() for s in re.split(r"(?<=[.])\s+", text) if s.strip()][1:] or [text]
    key = sentences[0].rstrip(".")
    rest = " ".join(sentences[1:]) or key
    return "\n".join([
        f"HOST: Today we are talking about {title.lower()}. What did the study look at?",
        f"GUEST: In short: {key[0].lower() + key[1:]}.",
        "HOST: That sounds simple. Why does it matter?",
        f"GUEST: Because of what came next. {rest}",
        "HOST: So what is the one thing listeners should remember?",
        f"GUEST: That {title[0].lower() + title[1:]} has a mechanism you can measure, and they measured it.",
    ])


def monologue(title: str, text: str) -> str:
    """A one-speaker answer: the kind of script the check rejects (one_speaker)."""
    return "\n".join(f"HOST: {s}" for s in re.split(r"(?<=[.])\s+", text) if s.strip())


def answer(body: dict[str, Any]) -> str:
    """The scripted content for one chat request."""
    user = next((m["content"] for m in reversed(body.get("messages") or []) if m.get("role") == "user"), "")
    m = re.search(r"^Document: (.+)$", user, re.M)
    title = m.group(1).strip() if m else "this document"
    doc = re.search(r"^Document: [^\n]+\n\n(.+?)\n\n", user, re.M | re.S)
    text = doc.group(1).strip() if doc else title
    if title == MONOLOGUE_TITLE and "Revision round" not in user:
        return monologue(title, text)
    return script_for(title, text)


def handler(body: dict[str, Any], n: int) -> Reply:
    """Stub handler: scripted answers with usage."""
    content = answer(body)
    return Reply(body=chat_completion(content, model=body.get("model", "teacher"),
                                      prompt_tokens=len(str(body.get("messages"))) // 4,
                                      completion_tokens=len(content) // 4))


def record(out: str = "configs/podcast/recorded/tiny_teacher.jsonl") -> int:
    """Run the tiny podcast flow online against this teacher and write its response cache as JSONL."""
    import json
    import os
    import sqlite3
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="nexus-record-"))
    os.environ["NEXUS_HOME"], os.environ["NEXUS_DATA"] = str(tmp / "home"), str(tmp / "data")
    from nexus_core.settings import configure_environment

    configure_environment()
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.openai_stub import StubServer

    with prefect_test_harness(server_startup_timeout=180), StubServer(handler) as stub:
        from flows.common import load_flow_config
        from flows.podcast import PodcastConfig, podcast

        cfg = load_flow_config(PodcastConfig, "configs/podcast/tiny.yaml",
                               ["teacher.offline=false", f"teacher.api_base={stub.url}", "teacher.recorded_cache=[]"])
        result = podcast(cfg)
    conn = sqlite3.connect(tmp / "home" / "llm_cache.sqlite")
    rows = conn.execute("SELECT key, model, response FROM responses ORDER BY key").fetchall()
    with open(out, "w", encoding="utf-8") as fh:
        for key, model, response in rows:
            resp = json.loads(response)
            for volatile in ("id", "created", "system_fingerprint"):
                resp.pop(volatile, None)
            fh.write(json.dumps({"key": key, "model": model, "response": resp}, sort_keys=True) + "\n")
    print(f"recorded {len(rows)} responses to {out}; summary {result.summary}")
    return len(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["record"]:
        record()
    else:
        print(__doc__)
