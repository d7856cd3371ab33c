"""A scripted scientific teacher for the distill pipeline, served by the OpenAI stub.

Deterministic answers from the request: most are good, some weak on purpose (too short, a
hallucinated citation, not falsifiable, no method, a chatty preamble, a duplicate), so filters,
review and regeneration all have work. Regeneration prompts ("Revision round N") get good answers,
except that a few need a second round.

It also records the offline cache of the tiny preset:

    python -m tests.support.distill_teacher record    # rewrites configs/distill/recorded/tiny_teacher.jsonl
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from tests.support.openai_stub import Reply, chat_completion, record_teacher

WEAK_KINDS = ("short", "citation", "vague", "chatty", "duplicate")


def write_teacher_inputs(directory: Path, prompts: list[str], row_ids: list[str] | None = None) -> Path:
    """A minimal teacher-inputs table (the columns the collect step needs) as ``directory/data.parquet``;
    row ids ``r0, r1, ...`` unless given. Returns ``directory``."""
    import polars as pl

    n = len(prompts)
    directory.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"row_id": row_ids or [f"r{i}" for i in range(n)], "domain": ["ecology"] * n,
                  "template_name": ["hypothesis"] * n, "template_hash": ["h"] * n,
                  "system_prompt": ["You are a scientist."] * n,
                  "user_prompt": prompts}).write_parquet(directory / "data.parquet")
    return directory


def _title(user: str) -> str:
    m = re.search(r"^Study: (.+)$", user, re.M)
    return m.group(1).strip() if m else "this system"


def _bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10


def good_answer(kind: str, title: str) -> str:
    """A well-formed answer that passes every filter for its template."""
    t = title.rstrip(".").lower()
    if kind == "hypothesis":
        return (f"If the mechanism proposed for {t} is real, then strengthening its driver in a controlled "
                f"experiment should increase the measured effect in proportion. We would measure the response "
                f"in treated and control groups and compare them; a flat dose-response curve would refute it.")
    return (f"To test the central claim about {t}:\n1. Prepare matched treated and control samples with a sample "
            f"size fixed in advance.\n2. Measure the outcome blind to group, with replicates.\n3. Compare groups "
            f"with a pre-registered test and evaluate the effect size against the predicted one.")


def weak_answer(which: str, kind: str, title: str) -> str:
    """A deliberately weak answer of the given flavour."""
    t = title.rstrip(".").lower()
    return {
        "short": f"More data on {t} is needed.",
        "citation": (f"As shown before [3], {t} depends on several factors (Smith et al., 2019); we would "
                     f"measure and compare them across conditions to evaluate the claim in more detail."),
        "vague": (f"The findings on {t} are interesting and open many questions for the field. Future work "
                  f"could look at related aspects and broader contexts, which may be informative overall."),
        "chatty": f"Sure! Here is an idea about {t}: " + "we could look into it a lot more " * 4,
        "duplicate": good_answer(kind, "the studied system"),
    }[which]


def answer(body: dict[str, Any]) -> str:
    """The scripted content for one chat request."""
    messages = body.get("messages") or []
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    kind = "methodology" if "Propose a methodology" in user else "hypothesis"
    title = _title(user)
    m = re.search(r"Revision round (\d+)", user)
    if m:
        # A few rows need two rounds: their first revision is still too short.
        if int(m.group(1)) == 1 and _bucket(user.split("Revision round")[0]) < 3:
            return weak_answer("short", kind, title)
        return good_answer(kind, title)
    b = _bucket(user)
    if b < len(WEAK_KINDS) - 1 or (b == 4 and kind == "methodology"):
        return weak_answer(WEAK_KINDS[b] if b < 4 else "duplicate", kind, title)
    return good_answer(kind, title)


def _logprobs(content: str) -> list[dict[str, Any]]:
    words = content.split()[:3]
    return [{"token": w, "logprob": -0.1 * (i + 1),
             "top_logprobs": [{"token": w, "logprob": -0.1 * (i + 1)}, {"token": w.upper(), "logprob": -2.5}]}
            for i, w in enumerate(words)]


def handler(body: dict[str, Any], n: int) -> Reply:
    """Stub handler: scripted answers with usage and (when asked) logprobs."""
    content = answer(body)
    lp = _logprobs(content) if body.get("logprobs") else None
    return Reply(body=chat_completion(content, model=body.get("model", "teacher"),
                                      prompt_tokens=len(str(body.get("messages"))) // 4,
                                      completion_tokens=len(content) // 4, logprobs=lp))


def record(out: str = "configs/distill/recorded/tiny_teacher.jsonl") -> int:
    """Run the tiny distill flow online against this teacher and write its response cache as JSONL."""
    return record_teacher(handler, "flows.distill", "distill", "DistillConfig", "configs/distill/tiny.yaml", out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["record"]:
        record()
    else:
        print(__doc__)
