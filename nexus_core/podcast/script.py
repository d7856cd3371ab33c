"""Two-speaker scripts: the strict parser and the rules it applies (shared by the check and speech steps).

A script is one turn per non-empty line, ``SPEAKER: what they say``, with the speaker names the config
lists (``HOST``/``GUEST`` by default, matched case-insensitively and written back in the config's
spelling). A script is rejected, with a reason, when it is empty, when any non-empty line is not such
a turn (``unparseable_line``), names a speaker the config does not list (``unknown_speaker``), when
fewer than two of the listed speakers talk (``one_speaker``), or when it has too few or too long turns.
Markdown emphasis around a speaker name (``**HOST:**``) is accepted; anything else is not guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from nexus_core.config import NexusModel

TURN = re.compile(r"^\s*[*_]{0,2}([A-Za-z][A-Za-z0-9 _-]{0,31}?)[*_]{0,2}\s*:[*_]{0,2}\s*(.*?)\s*$")


class ScriptRules(NexusModel):
    """What makes a teacher answer a usable two-speaker script."""

    speakers: list[str] = Field(default_factory=lambda: ["HOST", "GUEST"], min_length=2, max_length=2,
                                description="The two speaker names the script must use, in order of their voices")
    min_turns: int = Field(default=4, ge=2, description="Fewest turns a script may have")
    max_turns: int = Field(default=80, ge=2, description="Most turns a script may have")
    max_turn_chars: int = Field(default=600, ge=10, description="Longest turn in characters (longer: the speaker "
                                "is reading the document aloud, not talking)")

    @field_validator("speakers")
    @classmethod
    def _distinct(cls, speakers: list[str]) -> list[str]:
        if len({s.strip().upper() for s in speakers}) != len(speakers) or not all(s.strip() for s in speakers):
            raise ValueError("two distinct, non-empty speaker names")
        return [s.strip() for s in speakers]


@dataclass(frozen=True)
class Turn:
    """One line of a script."""

    speaker: str
    text: str


@dataclass(frozen=True)
class Parsed:
    """A parse: the turns when it is usable, else ``reason`` (a short code) and ``detail`` (for review)."""

    turns: list[Turn]
    reason: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """True when the script is usable."""
        return self.reason is None


def parse_script(text: str | None, rules: ScriptRules) -> Parsed:
    """Parse ``text`` strictly into turns (see the module docstring); never raises on bad text."""
    if text is None or not text.strip():
        return Parsed([], "no_script", "empty response")
    names = {s.upper(): s for s in rules.speakers}
    turns: list[Turn] = []
    for lineno, line in enumerate(text.strip().splitlines(), start=1):
        if not line.strip():
            continue
        m = TURN.match(line)
        if m is None or not m.group(2):
            return Parsed([], "unparseable_line", f"line {lineno}: {line.strip()[:80]!r} is not 'SPEAKER: text'")
        who = names.get(m.group(1).strip().upper())
        if who is None:
            return Parsed([], "unknown_speaker", f"line {lineno}: speaker {m.group(1).strip()!r} is not one of "
                          f"{', '.join(rules.speakers)}")
        turns.append(Turn(who, m.group(2)))
    spoken = {t.speaker for t in turns}
    if len(spoken) < 2:
        return Parsed([], "one_speaker", f"only {', '.join(sorted(spoken)) or 'nobody'} speaks")
    if len(turns) < rules.min_turns:
        return Parsed([], "too_few_turns", f"{len(turns)} turn(s), need {rules.min_turns}")
    if len(turns) > rules.max_turns:
        return Parsed([], "too_many_turns", f"{len(turns)} turns, at most {rules.max_turns}")
    longest = max(len(t.text) for t in turns)
    if longest > rules.max_turn_chars:
        return Parsed([], "turn_too_long", f"a turn of {longest} characters, at most {rules.max_turn_chars}")
    return Parsed(turns)


def render_script(turns: list[Turn]) -> str:
    """Turns back as script text (``SPEAKER: text`` per line): what the LLM is trained to write."""
    return "\n".join(f"{t.speaker}: {t.text}" for t in turns)
