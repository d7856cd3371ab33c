"""Filter throughput: rows/s of our rules (nexus_core.distill.prompts.apply_rules: polars expressions plus
numpy MinHash near duplicates) vs plain pandas implementing the same rules.
python -m bench.distill_filters [ROWS]   (default 1,000,000)

Near duplicates have no plain-pandas form that finishes on 1M rows (comparing all pairs is
quadratic), so the pandas baseline calls the same ``nexus_core.distill.near_dup.near_duplicates`` on its
answered, not exactly duplicated rows; the two differ in everything around it (the regex rules,
exact duplicates, handing the texts over). On 100k rows the near-duplicate search is about 3/4 of
either time.

The rows: the scripted teacher's good and weak answers (as before), each but the short ones and the
exact duplicates followed by a distinct 25-word note, so rows of a kind share a long frame (Jaccard
~0.4, which crowds LSH buckets) without being near duplicates; every 10th row copies a recent one
with one note word changed (Jaccard ~0.86; about 94 % reach 0.8), which the rule must catch.
"""

from __future__ import annotations

import re
import sys
import time

import numpy as np
import pandas as pd
import polars as pl

from nexus_core.distill.near_dup import near_duplicates
from nexus_core.distill.rules import apply_rules, load_rules
from tests.support.distill_teacher import WEAK_KINDS, good_answer, weak_answer

# Note words: consonant-vowel syllables over consonants that start no action verb and no pattern the
# rules look for, so the notes change no rule's verdict.
_SYLLABLES = [c + v for c in "bdgklnvz" for v in "aeiou"]
_VOCAB = np.array([a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in _SYLLABLES])


def _pandas(df: pd.DataFrame, rules) -> pd.Series:  # noqa: ANN001
    text = df["response"].fillna("")
    any_ = lambda ps: "|".join(f"(?:{p})" for p in ps)  # noqa: E731
    bad = text.str.len() <= rules.min_chars
    bad |= ~text.str.contains(r"(?i)\b(?:" + "|".join(map(re.escape, rules.action_verbs)) + ")", regex=True)
    bad |= text.str.contains(any_(rules.citation_patterns), regex=True)
    bad |= text.str.contains(any_(rules.format_patterns), regex=True) | (text.str.count("```") % 2 == 1)
    hyp = df["template_name"].isin(rules.falsifiable_templates)
    bad |= hyp & ~text.str.contains(any_(rules.falsifiable_patterns), regex=True)
    meth = df["template_name"].isin(rules.methodology_templates)
    bad |= meth & ~text.str.contains(any_(rules.methodology_patterns), regex=True)
    stripped = text.str.strip().str.lower()
    exact = stripped.duplicated()
    rest = (stripped != "") & ~exact
    near = pd.Series(False, index=df.index)
    near[rest] = near_duplicates(text[rest].tolist(), threshold=rules.near_duplicate_threshold,
                                 shingle_words=rules.shingle_words, permutations=rules.minhash_permutations,
                                 bands=rules.lsh_bands) >= 0
    bad |= exact | near
    return ~bad


def rows(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(template names, responses) of ``n`` synthetic rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    notes = _VOCAB[rng.integers(0, _VOCAB.size, size=(n, 25))]
    kinds = ["hypothesis", "methodology"]
    texts: list[str] = []
    with_note: list[int] = []
    for i in range(n):
        kind = kinds[i % 2]
        if i % 10 == 9 and with_note:  # a near copy of a recent row that has a note
            j = with_note[-1 - int(rng.integers(0, min(len(with_note), 50)))]
            words = texts[j].split(" ")
            words[-1 - int(rng.integers(1, 24))] = str(_VOCAB[rng.integers(0, _VOCAB.size)])
            texts.append(" ".join(words))
            continue
        weak = WEAK_KINDS[i % 5] if i % 3 == 0 else None
        base = weak_answer(weak, kind, f"topic {i}") if weak else good_answer(kind, f"system {i}")
        if weak in ("short", "duplicate"):
            texts.append(base)
        else:
            with_note.append(i)
            texts.append(f"{base} Note: {' '.join(notes[i])}.")
    return [kinds[i % 2] for i in range(n)], texts


def main(n: int = 1_000_000) -> None:
    """Print rows/s for both and the ratio."""
    rules, _ = load_rules("configs/distill/filters.yaml")
    tpl, texts = rows(n)
    pdf = pd.DataFrame({"template_name": tpl, "response": texts})
    plf = pl.DataFrame({"template_name": tpl, "response": texts})
    t0 = time.perf_counter()
    out = apply_rules(plf, rules)
    t_pl = time.perf_counter() - t0
    kept_pl, near_pl = int(out["keep"].sum()), int(out["chk_near_duplicate"].sum())
    t0 = time.perf_counter()
    kept_pd = int(_pandas(pdf, rules).sum())
    t_pd = time.perf_counter() - t0
    print(f"{n:,} rows   nexus (polars + numpy): {n / t_pl:12,.0f} rows/s ({t_pl:.1f} s, kept {kept_pl:,}, "
          f"near duplicates {near_pl:,})")
    print(f"{n:,} rows   plain pandas:           {n / t_pd:12,.0f} rows/s ({t_pd:.1f} s, kept {kept_pd:,})")
    print(f"ratio nexus / pandas: {t_pd / t_pl:.1f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
