"""The filter rules (``configs/distill/filters.yaml``): per-row checks and dataset gates, shared by
the filters and regeneration steps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from pydantic import Field, ValidationInfo, field_validator

from nexus_core.config import NexusModel, validate
from nexus_core.distill.near_dup import near_duplicates
from nexus_core.errors import ConfigError, InputError

# ---------------------------------------------------------------- filter rules


class Gates(NexusModel):
    """Dataset-level quality gates: minimum fractions."""

    falsifiable_hypothesis: float = Field(default=0.6, ge=0, le=1, description="Share of hypothesis rows that are falsifiable")
    methodology_present: float = Field(default=0.5, ge=0, le=1, description="Share of methodology rows that describe a method")
    length_format_valid: float = Field(default=0.9, ge=0, le=1, description="Share of answered rows with valid length and format")


class FilterRules(NexusModel):
    """The rules file (``configs/distill/filters.yaml``)."""

    min_chars: int = Field(default=120, ge=0, description="A response must be longer than this")
    action_verbs: list[str] = Field(description="At least one of these verb stems must occur")
    citation_patterns: list[str] = Field(description="Regexes of hallucinated citations or bracketed references")
    format_patterns: list[str] = Field(description="Regexes of broken formatting")
    falsifiable_patterns: list[str] = Field(description="Regexes; a hypothesis must match one")
    methodology_patterns: list[str] = Field(description="Regexes; a methodology must match one")
    falsifiable_templates: list[str] = Field(default_factory=lambda: ["hypothesis"],
                                             description="Templates whose rows must be falsifiable")
    methodology_templates: list[str] = Field(default_factory=lambda: ["methodology"],
                                             description="Templates whose rows must describe a method")
    dedupe: bool = Field(default=True, description="Remove exact and near duplicates (first occurrence kept)")
    near_duplicate_threshold: float = Field(default=0.8, gt=0, le=1, description="Jaccard similarity of word shingles "
                                            "at or above which a later answer is a near duplicate")
    shingle_words: int = Field(default=5, ge=1, le=32, description="Words per shingle (shorter texts: one shingle of "
                                                          "all their words)")
    minhash_permutations: int = Field(default=64, ge=8, le=1024, description="MinHash signature length: more is a "
                                                                     "finer Jaccard estimate, and slower")
    lsh_bands: int = Field(default=16, ge=1, le=512, description="LSH bands (divides minhash_permutations); more bands "
                                                        "propose candidates at lower similarity")
    gates: Gates = Field(default_factory=Gates, description="Quality gates")

    @field_validator("lsh_bands")
    @classmethod
    def _bands_divide_permutations(cls, bands: int, info: ValidationInfo) -> int:
        permutations = info.data.get("minhash_permutations")  # absent when it failed its own check
        if permutations and permutations % bands:
            raise ValueError(f"must divide minhash_permutations ({permutations})")
        return bands


def load_rules(path: str | Path) -> tuple[FilterRules, str]:
    """(rules, raw text) of a rules YAML; every regex is compiled so a bad one names its key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: filter rules file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not valid UTF-8 ({exc.reason} at byte {exc.start})"], str(path)) from None
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        detail = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if context is not None and getattr(exc, "context", None):
            detail += f"; {exc.context} on line {context.line + 1}"  # type: ignore[attr-defined]
        raise ConfigError([f"{where}not valid YAML ({detail})"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    rules = validate(FilterRules, data, str(path))
    problems = []
    for key in ("citation_patterns", "format_patterns", "falsifiable_patterns", "methodology_patterns"):
        for i, pattern in enumerate(getattr(rules, key)):
            try:  # polars' (Rust) regex dialect is the one that runs: no backreferences, no lookaround
                pl.Series([""]).str.contains(pattern)
            except Exception as exc:  # noqa: BLE001 - polars raises ComputeError for bad patterns
                problems.append(f"{key}[{i}]: bad regex ({str(exc).splitlines()[0]})")
    if problems:
        raise ConfigError(problems, str(path))
    return rules, text


def _any(patterns: list[str]) -> str:
    return "|".join(f"(?:{p})" for p in patterns) if patterns else r"$^"


def apply_rules(df: pl.DataFrame, rules: FilterRules, text_col: str = "response",
                template_col: str = "template_name") -> pl.DataFrame:
    """Add ``keep`` (bool), ``reasons`` (list[str]), ``reason`` (str) and per-check flags to ``df``.

    Rules run as polars expressions and duplicates as numpy arrays (no Python per row). Only
    answered rows take part in duplicate detection. Exact duplicates: the same stripped, lowercased
    text. Near duplicates (``nexus_core.distill.near_dup``): the rest whose word-shingle Jaccard similarity
    with any earlier answered row (kept or not) reaches ``near_duplicate_threshold``; MinHash and LSH
    find the candidates, the exact similarity decides. The first occurrence of each is kept.
    """
    text = pl.col(text_col).fill_null("")
    verbs = r"(?i)\b(?:" + "|".join(re.escape(v) for v in rules.action_verbs) + r")"
    fences = text.str.count_matches("```")
    checks = {
        "no_response": pl.col(text_col).is_null() | (text.str.strip_chars() == ""),
        "too_short": text.str.len_chars() <= rules.min_chars,
        "no_action_verb": ~text.str.contains(verbs),
        "citation": text.str.contains(_any(rules.citation_patterns)),
        "broken_format": text.str.contains(_any(rules.format_patterns)) | (fences % 2 == 1),
        "not_falsifiable": pl.col(template_col).is_in(rules.falsifiable_templates)
        & ~text.str.contains(_any(rules.falsifiable_patterns)),
        "no_methodology": pl.col(template_col).is_in(rules.methodology_templates)
        & ~text.str.contains(_any(rules.methodology_patterns)),
    }
    answered_expr = ~checks["no_response"]
    out = df.with_columns(**{f"chk_{k}": v if k == "no_response" else answered_expr & v for k, v in checks.items()})
    dup_exprs = []
    if rules.dedupe:
        stripped = text.str.strip_chars().str.to_lowercase()
        out = out.with_columns(chk_exact_duplicate=~pl.col("chk_no_response") & ~stripped.is_first_distinct())
        # An exact copy has the same shingles as its first occurrence, which is earlier: leaving copies
        # out changes no verdict and saves their signatures.
        rows = np.flatnonzero((~out["chk_no_response"] & ~out["chk_exact_duplicate"]).to_numpy())
        near = np.zeros(out.height, dtype=bool)
        near[rows] = near_duplicates(out[text_col].gather(rows), threshold=rules.near_duplicate_threshold,
                                     shingle_words=rules.shingle_words, permutations=rules.minhash_permutations,
                                     bands=rules.lsh_bands) >= 0
        out = out.with_columns(chk_near_duplicate=pl.Series(near))
        dup_exprs = ["exact_duplicate", "near_duplicate"]
    names = [*checks, *dup_exprs]
    reasons = pl.concat_list([pl.when(pl.col(f"chk_{n}")).then(pl.lit(n)).otherwise(pl.lit(None)) for n in names])
    out = out.with_columns(reasons=reasons.list.drop_nulls())
    return out.with_columns(keep=pl.col("reasons").list.len() == 0,
                            reason=pl.col("reasons").list.join("; "))


def gate_metrics(df: pl.DataFrame, rules: FilterRules, template_col: str = "template_name") -> dict[str, float]:
    """Share of rows meeting each gate and whether the gate passed (1.0/0.0), from ``apply_rules`` output."""
    answered = df.filter(~pl.col("chk_no_response"))
    hyp = answered.filter(pl.col(template_col).is_in(rules.falsifiable_templates))
    meth = answered.filter(pl.col(template_col).is_in(rules.methodology_templates))

    def share(frame: pl.DataFrame, bad: pl.Expr) -> float:
        return float(frame.select((~bad).mean()).item()) if frame.height else 0.0

    values = {
        "falsifiable_hypothesis": share(hyp, pl.col("chk_not_falsifiable")),
        "methodology_present": share(meth, pl.col("chk_no_methodology")),
        "length_format_valid": share(answered, pl.col("chk_too_short") | pl.col("chk_broken_format")),
    }
    out: dict[str, float] = {}
    for name, value in values.items():
        out[f"gate_{name}"] = value
        out[f"gate_{name}_pass"] = float(value >= getattr(rules.gates, name))
    return out
