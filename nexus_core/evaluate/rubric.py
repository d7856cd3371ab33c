"""Rubric judge: load a rubric, validate verdicts against its JSON schema, judge with an LLM or a heuristic.

Shared by the evaluation judge step and (for scoring teacher outputs) the distillation filters, so it
lives outside ``steps/``. Two judges:

* ``llm``: any litellm model through ``nexus_core.llm.client`` (bounded concurrency, response cache,
  retries honouring ``Retry-After``). JSON mode (``response_format``) is requested where litellm says
  the provider supports it; the verdict is the first balanced JSON object in the reply that passes
  the rubric's schema; a reply without one is re-asked once, with the reason; a verdict still
  unusable becomes a row with ``status="unparseable"`` and a reason; a judge still unreachable after
  its retries raises :class:`JudgeUnreachable` naming the model and endpoint.
* ``heuristic``: offline scoring from ordered-steps count, measurable-outcome wording and similarity to
  the teacher answer, for the project rubric's five dimensions only. Its rows carry
  ``judge_kind="heuristic"`` so it is never mistaken for an LLM.

A rubric may name any dimensions (``helpfulness``, ``tone``...): gates and reports follow its names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from nexus_core.config import NexusModel
from nexus_core.errors import ConfigError, InputError, StepError
from nexus_core.llm.client import LLMConfig
from nexus_core.secrets import scrub

# The project rubric's dimensions: the ones the heuristic judge knows how to score. Any rubric may name others.
KNOWN_DIMENSIONS = ("plausibility", "falsifiability", "method_rigour", "reproducibility", "teacher_agreement")
_DIMENSION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Columns the predict and judge steps write: a dimension of the same name would overwrite one.
RESERVED_NAMES = frozenset({
    "row_id", "input", "prediction", "reference", "generated_tokens", "latency_s", "ref_nll", "ref_tokens",
    "pred_label", "score", "pred_value", "label", "target", "meta", "domain", "title", "abstract", "quality",
    "judge", "judge_kind", "rubric", "status", "reason", "rationale", "raw_verdict", "steps_count",
    "has_methodology", "judge_reasked", "judge_attempts", "judge_prompt_tokens", "judge_completion_tokens",
    "judge_cost_usd", "judge_latency_s"})
KNOWN_SCALES: dict[str, tuple[int, int]] = {"1-5": (1, 5), "1-10": (1, 10)}
HEURISTIC_LABEL = "heuristic (rule-based, not an LLM judge)"


class Dimension(NexusModel):
    """One scored dimension of the rubric."""

    name: str = Field(description="Dimension name (lower-case letters, digits, _): the judged-table column "
                                  "and verdict key gates refer to")
    description: str = Field(description="What a high score means, shown to the judge")


class Rubric(NexusModel):
    """A judging rubric (configs/eval/rubric.json)."""

    name: str = Field(description="Rubric name, recorded with every verdict")
    version: int = Field(default=1, description="Bump when wording changes (it joins the cache key anyway)")
    scale: str = Field(default="1-5", description=f"Integer scale, one of {', '.join(KNOWN_SCALES)}")
    instructions: str = Field(description="System instructions for an LLM judge")
    dimensions: list[Dimension] = Field(description="Dimensions scored on the scale")

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) of the scale."""
        return KNOWN_SCALES[self.scale]

    @property
    def names(self) -> list[str]:
        """Dimension names in rubric order."""
        return [d.name for d in self.dimensions]


def load_rubric(path: str | Path) -> Rubric:
    """Read and validate a rubric JSON file; one ConfigError names the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(["file not found"], str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid JSON: {exc}"], str(path)) from None
    try:
        rubric = Rubric.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()], str(path)) from None
    problems = []
    if rubric.scale not in KNOWN_SCALES:
        problems.append(f"scale: unknown scale {rubric.scale!r} (known: {', '.join(KNOWN_SCALES)})")
    for i, dim in enumerate(rubric.dimensions):
        if not _DIMENSION_NAME.match(dim.name):
            problems.append(f"dimensions[{i}].name: {dim.name!r} is not a valid dimension name "
                            f"(lower-case letter first, then letters, digits or _, at most 48)")
        elif dim.name in RESERVED_NAMES:
            problems.append(f"dimensions[{i}].name: {dim.name!r} is a column the evaluation writes itself; "
                            f"choose another name")
    if len(set(rubric.names)) != len(rubric.names):
        problems.append("dimensions: duplicate names")
    if not rubric.dimensions:
        problems.append("dimensions: at least one is required")
    if problems:
        raise ConfigError(problems, str(path))
    return rubric


def verdict_schema(rubric: Rubric) -> dict[str, Any]:
    """JSON schema a verdict must satisfy: every dimension an integer on the scale, plus a rationale."""
    lo, hi = rubric.bounds
    props: dict[str, Any] = {d: {"type": "integer", "minimum": lo, "maximum": hi} for d in rubric.names}
    props["rationale"] = {"type": "string"}
    return {"type": "object", "properties": props, "required": rubric.names, "additionalProperties": True}


@lru_cache(maxsize=16)
def _validator(rubric_json: str):  # noqa: ANN202 - jsonschema validator; built once per rubric, not per verdict
    import jsonschema

    return jsonschema.Draft202012Validator(verdict_schema(Rubric.model_validate_json(rubric_json)))


def _schema_problem(verdict: Any, rubric: Rubric) -> str | None:
    """None when ``verdict`` satisfies the rubric's schema (integral floats become ints), else why not."""
    # integral floats (4.0) are common and harmless; anything else must fail the schema
    if isinstance(verdict, dict):
        for key in rubric.names:
            value = verdict.get(key)
            if isinstance(value, float) and value.is_integer():
                verdict[key] = int(value)
    errors = sorted(_validator(rubric.model_dump_json()).iter_errors(verdict), key=lambda e: list(e.path))
    if not errors:
        return None
    where = ".".join(map(str, errors[0].path)) or "(verdict)"
    return f"verdict fails schema at {where}: {errors[0].message}"


def parse_verdict(text: str | None, rubric: Rubric) -> tuple[dict[str, Any] | None, str | None]:
    """(verdict, None) when ``text`` holds a schema-valid JSON verdict, else (None, reason).

    The verdict is the first *balanced* JSON object in the text that passes the rubric's schema:
    judges wrap JSON in prose or ``` fences, and may write other braces before or after it (a greedy
    ``{.*}`` would swallow those and reject a good verdict). Each ``{`` is tried with the JSON decoder
    itself, so braces inside strings never confuse it.
    """
    if not text or not text.strip():
        return None, "empty verdict"
    cleaned = text.strip()
    decoder = json.JSONDecoder()
    schema_reason = json_reason = None
    start = cleaned.find("{")
    if start < 0:
        return None, f"no JSON object in verdict: {cleaned[:120]!r}"
    while start >= 0:
        try:
            candidate, _end = decoder.raw_decode(cleaned, start)
        except json.JSONDecodeError as exc:
            json_reason = json_reason or f"verdict is not valid JSON ({exc.msg} at char {exc.pos}): {cleaned[:120]!r}"
        else:
            if isinstance(candidate, dict):
                problem = _schema_problem(candidate, rubric)
                if problem is None:
                    return candidate, None
                schema_reason = schema_reason or problem
        start = cleaned.find("{", start + 1)
    # a JSON object that fails the schema says more than a fragment that is not JSON at all
    return None, schema_reason or json_reason


# ---------------------------------------------------------------- heuristic judge

_STEP_LINE = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|step\s+\d{1,2}\b|[ivx]{1,4}[.)])\s*\S", re.IGNORECASE | re.MULTILINE)
_MEASURABLE = re.compile(
    r"\b(measur\w*|quantif\w*|percent\w*|rate|ratio|significan\w*|p\s*[<=]|n\s*=|sample size|control\w*|"
    r"compar\w*|predict\w*|increase\w*|decrease\w*|reduc\w*|threshold|error|mean|median|variance|"
    r"correlat\w*|replicat\w*|randomi[sz]\w*|\d+(?:\.\d+)?\s*(?:%|mg|ml|kg|g|s|h|°c|degrees|mm|cm|m))\b",
    re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")


def count_ordered_steps(text: str | None) -> int:
    """Lines that start an ordered step: ``1.``, ``2)``, ``(3)``, ``Step 4``, ``iv.``."""
    return len(_STEP_LINE.findall(text or ""))


def token_f1(a: str | None, b: str | None) -> float:
    """Bag-of-words F1 between two texts (0..1): the similarity the heuristic judge uses."""
    ta, tb = _WORD.findall((a or "").lower()), _WORD.findall((b or "").lower())
    if not ta or not tb:
        return 0.0
    counts: dict[str, int] = {}
    for t in tb:
        counts[t] = counts.get(t, 0) + 1
    common = 0
    for t in ta:
        if counts.get(t, 0) > 0:
            common += 1
            counts[t] -= 1
    if not common:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def heuristic_unknown(rubric: Rubric) -> list[str]:
    """Dimensions of ``rubric`` the heuristic judge has no rule for (it must not invent scores for them)."""
    return [d for d in rubric.names if d not in KNOWN_DIMENSIONS]


def heuristic_verdict(answer: str | None, reference: str | None, rubric: Rubric) -> dict[str, Any]:
    """Rule-based scores for each rubric dimension (clamped to the scale) plus the raw features."""
    lo, hi = rubric.bounds
    steps = count_ordered_steps(answer)
    measurable = len(_MEASURABLE.findall(answer or ""))
    sim = token_f1(answer, reference)
    numbers = len(re.findall(r"\d+(?:\.\d+)?", answer or ""))

    def scale(x: float) -> int:  # x in [0, 1] -> integer on the scale
        return int(round(lo + (hi - lo) * max(0.0, min(1.0, x))))

    raw = {
        "plausibility": 0.5 * sim + 0.25 * min(1.0, len(_WORD.findall(answer or "")) / 40) + 0.25 * min(1.0, steps / 3),
        "falsifiability": min(1.0, measurable / 4),
        "method_rigour": min(1.0, steps / 5),
        "reproducibility": 0.6 * min(1.0, steps / 4) + 0.4 * min(1.0, numbers / 3),
        "teacher_agreement": sim,
    }
    verdict: dict[str, Any] = {d: scale(raw[d]) for d in rubric.names}
    verdict["rationale"] = (f"{HEURISTIC_LABEL}: {steps} ordered steps, {measurable} measurable-outcome terms, "
                            f"token-F1 {sim:.2f} to the teacher answer")
    verdict["_features"] = {"steps": steps, "measurable_terms": measurable, "similarity": round(sim, 4)}
    return verdict


# ---------------------------------------------------------------- LLM judge


class JudgeSettings(LLMConfig):
    """How to reach an LLM judge: an llm_client config (litellm) with a judge's defaults."""

    model: str = Field(default="openai/judge", description="litellm model name, e.g. openai/<served name>")
    max_retries: int = Field(default=3, ge=0, description="Retries per request on connection errors, 429, 5xx, bad bodies")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each retry (Retry-After wins)")
    max_backoff_s: float = Field(default=30.0, ge=0, description="Longest single wait between retries")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature of the judge")
    max_tokens: int = Field(default=256, ge=16, description="Longest verdict the judge may write")
    json_mode: Literal["auto", "json_schema", "json_object", "off"] = Field(
        default="auto", description="response_format to request: auto asks litellm what the provider supports "
                                    "(json_schema with the rubric's schema, else json_object, else none)")
    reask: bool = Field(default=True, description="Ask once more, with the reason, when a verdict is unusable")


class JudgeUnreachable(StepError):
    """The judge model could not be reached after its retries."""


def _answer_format(rubric: Rubric) -> str:
    lo, hi = rubric.bounds
    keys = ", ".join(f'"{n}": <int {lo}-{hi}>' for n in rubric.names)
    return f'{{{keys}, "rationale": "<one sentence>"}}'


def judge_messages(rubric: Rubric, question: str, answer: str, reference: str | None) -> list[dict[str, str]]:
    """Chat messages asking the judge for a JSON verdict on one answer."""
    lo, hi = rubric.bounds
    dims = "\n".join(f"- {d.name}: {d.description}" for d in rubric.dimensions)
    # "JSON" must appear in the messages: OpenAI-style JSON mode refuses requests that never say it
    system = (f"{rubric.instructions}\nRubric '{rubric.name}' v{rubric.version}, scale {lo}-{hi}:\n{dims}\n"
              f"Reply with only this JSON object: {_answer_format(rubric)}")
    user = f"Question:\n{question}\n\nTeacher reference answer:\n{reference or '(none)'}\n\nStudent answer:\n{answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def reask_messages(first: list[dict[str, str]], reply: str | None, reason: str, rubric: Rubric) -> list[dict[str, str]]:
    """The conversation of a re-ask: the first request, the unusable reply, and what was wrong with it."""
    return [*first, {"role": "assistant", "content": reply or ""},
            {"role": "user", "content": f"That reply is not a usable verdict ({reason[:200]}). Reply with only "
                                        f"the JSON object, every key present, integers on the scale: "
                                        f"{_answer_format(rubric)}"}]


def response_format(settings: JudgeSettings, rubric: Rubric) -> dict[str, Any] | None:
    """The ``response_format`` to send: what ``settings.json_mode`` asks for, or (``auto``) what litellm
    says the provider supports: a JSON schema of the verdict, else plain JSON mode, else none."""
    mode = settings.json_mode
    if mode == "auto":
        import litellm

        try:
            model, provider, _, _ = litellm.get_llm_provider(settings.model, api_base=settings.api_base)
            params = litellm.get_supported_openai_params(model=model, custom_llm_provider=provider) or []
            schema_ok = litellm.supports_response_schema(model=model, custom_llm_provider=provider)
        except Exception:  # noqa: BLE001 - an unknown model: no JSON mode, the extractor and re-ask still apply
            params, schema_ok = [], False
        mode = "off" if "response_format" not in params else "json_schema" if schema_ok else "json_object"
    if mode == "json_schema":
        schema = verdict_schema(rubric)
        return {"type": "json_schema",
                "json_schema": {"name": re.sub(r"[^a-zA-Z0-9_-]", "_", rubric.name)[:64] or "verdict",
                                "schema": schema}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


# Errors that mean "nobody answered", as opposed to an answer we could not use.
_UNREACHABLE = ("APIConnectionError", "Timeout", "InternalServerError", "ServiceUnavailableError",
                "BadGatewayError", "RateLimitError", "AuthenticationError", "NotFoundError", "PermissionDeniedError")


def judge_llm(items: list[dict[str, Any]], rubric: Rubric, settings: JudgeSettings,
              progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Judge ``items`` (dicts with question, answer, reference) with an LLM; one result dict per item.

    Each result: status (ok | unparseable | failed), reason, verdict (dict or None), raw text,
    ``reasked`` (the first verdict was unusable and the judge was asked once more), attempts,
    latency_s, token counts and cost_usd (both requests together). When no row got an answer and the
    failures say the endpoint is down, raises :class:`JudgeUnreachable` naming the model and endpoint.
    ``progress(done, total)`` is called as each answer arrives.
    """
    from nexus_core.llm.client import LLMClient, check_model, run_async

    check_model(settings, "judge")  # unknown provider, missing key, or a cost cap nothing could trigger
    rf = response_format(settings, rubric)
    client = LLMClient(settings, extra={"response_format": rf} if rf else None)
    try:
        batch = [judge_messages(rubric, it["question"], it["answer"], it.get("reference")) for it in items]
        answered = [0]

        def one_done(_i: int, _c: Any) -> None:
            answered[0] += 1
            if progress is not None:
                progress(answered[0], len(batch))

        done = run_async(client.map(batch, on_done=one_done))
        refused = [i for i, c in enumerate(done) if rf and c.status != "ok" and "response_format" in (c.error or "")]
        if refused:  # litellm allowed it but this server refuses JSON mode (400): ask those rows without it
            client.extra = {}
            for i, c in zip(refused, run_async(client.map([batch[i] for i in refused])), strict=True):
                done[i] = c
        json_mode = "none" if not rf else f"{rf['type']} (refused by the server: none)" if refused else rf["type"]
        out = []
        for c in done:
            row = {"attempts": c.attempts, "latency_s": c.latency_s, "prompt_tokens": c.prompt_tokens,
                   "completion_tokens": c.completion_tokens, "cost_usd": c.cost_usd, "raw": c.content,
                   "reasked": False, "json_mode": json_mode}
            if c.status != "ok":
                row.update(status="failed", reason=scrub(c.error) or c.status, verdict=None)
            else:
                verdict, reason = parse_verdict(c.content, rubric)
                row.update(status="ok" if verdict else "unparseable", reason=scrub(reason), verdict=verdict)
            out.append(row)
        bad = [i for i, r in enumerate(out) if r["status"] == "unparseable"] if settings.reask else []
        if bad:  # one re-ask each, all together; a second unusable verdict stays unparseable
            again = run_async(client.map([reask_messages(batch[i], out[i]["raw"], out[i]["reason"] or "", rubric)
                                          for i in bad]))
            for i, c in zip(bad, again, strict=True):
                row = out[i]
                row["reasked"] = True
                for key in ("attempts", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s"):
                    row[key] += getattr(c, key)
                if c.status != "ok":
                    row["reason"] = f"{row['reason']}; re-ask failed: {scrub(c.error) or c.status}"
                    continue
                verdict, reason = parse_verdict(c.content, rubric)
                if verdict is not None:
                    row.update(status="ok", reason=None, verdict=verdict, raw=c.content)
                else:
                    row["reason"] = f"{row['reason']}; re-ask: {scrub(reason)}"
                    row["raw"] = f"{row['raw']}\n--- re-ask ---\n{c.content}"
    finally:
        client.close()
    failed = [c for c in done if c.status != "ok"]
    if done and len(failed) == len(done) and all((c.error or "").split(":")[0] in _UNREACHABLE for c in failed):
        where = settings.api_base or "the provider's default endpoint"
        raise JudgeUnreachable(f"judge model {settings.model!r} at {where} unreachable after "
                               f"{settings.max_retries + 1} attempt(s) per request: {scrub(failed[0].error)}")
    return out


def judge_items(items: list[dict[str, Any]], rubric: Rubric, kind: str = "heuristic",
                settings: JudgeSettings | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Judge items (question, answer, reference) with ``kind`` = ``llm`` or ``heuristic``; uniform result dicts.

    The entry point for other areas too: e.g. a distillation filter scoring teacher outputs calls
    ``judge_items([{"question": prompt, "answer": response, "reference": None}], load_rubric(path))``.
    Heuristic results say so in their rationale (:data:`HEURISTIC_LABEL`). ``progress(done, total)``
    reports an LLM judge's answers as they arrive (the heuristic is instant).
    """
    if kind == "llm":
        return judge_llm(items, rubric, settings or JudgeSettings(), progress)
    if kind != "heuristic":
        raise ValueError(f"judge kind must be 'llm' or 'heuristic', got {kind!r}")
    unknown = heuristic_unknown(rubric)
    if unknown:
        raise ConfigError([f"judge.kind: the heuristic judge cannot score {', '.join(map(repr, unknown))} "
                           f"(it knows {', '.join(KNOWN_DIMENSIONS)}); use an LLM judge (kind: llm)"])
    out = []
    for item in items:
        verdict = heuristic_verdict(item.get("answer"), item.get("reference"), rubric)
        verdict.pop("_features")
        out.append({"status": "ok", "reason": None, "verdict": verdict, "raw": json.dumps(verdict), "attempts": 1,
                    "latency_s": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                    "reasked": False})
    return out


def judged_dimensions(judged: Any, columns: list[str]) -> list[str]:
    """The rubric dimensions of a judged table: what its judge step recorded (any names), else the
    project rubric's that the table has (tables judged before rubrics could name their own)."""
    from nexus_core.artifacts import read_manifest

    try:
        recorded = read_manifest(judged.uri).result.get("dimensions")
    except InputError:  # a table without a manifest (built by hand): fall back
        recorded = None
    if recorded:
        return [d for d in recorded if d in columns]
    return [d for d in KNOWN_DIMENSIONS if d in columns]
