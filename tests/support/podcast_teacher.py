"""A scripted podcast teacher, served by the OpenAI stub: two-speaker scripts built from the request.

The battery document's first answer is a monologue (one speaker), so the script check rejects it and
regeneration ("Revision round N") asks again and gets a proper script. It also records the offline
cache of the tiny podcast preset:

    python -m tests.support.podcast_teacher record    # rewrites configs/podcast/recorded/tiny_teacher.jsonl
"""

from __future__ import annotations

import re
from typing import Any

from tests.support.openai_stub import Reply, chat_completion, record_teacher

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
    return record_teacher(handler, "flows.podcast", "podcast", "PodcastConfig", "configs/podcast/tiny.yaml", out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["record"]:
        record()
    else:
        print(__doc__)
