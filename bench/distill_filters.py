"""Filter throughput: rows/s of the polars rules (nexus_core.distill_lib.apply_rules) vs plain pandas
implementing the same rules.   python -m bench.distill_filters [ROWS]   (default 1,000,000)
"""

from __future__ import annotations

import re
import sys
import time

import pandas as pd
import polars as pl

from nexus_core.distill_lib import apply_rules, load_rules
from tests.support.distill_teacher import WEAK_KINDS, good_answer, weak_answer


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
    fp = text.str.lower().str.replace(r"[^a-z]+", " ", regex=True).str.strip().str.replace(r"\s+", " ", regex=True)
    bad |= stripped.duplicated() | fp.duplicated()
    return ~bad


def _word(i: int) -> str:
    """A distinct letters-only name per row: the near-duplicate fingerprint drops digits, and rows
    that differ only in a number would all collapse into one."""
    out = ""
    while True:
        i, r = divmod(i, 26)
        out += chr(97 + r)
        if not i:
            return out


def main(n: int = 1_000_000) -> None:
    """Print rows/s for both and the ratio."""
    rules, _ = load_rules("configs/distill/filters.yaml")
    kinds = ["hypothesis", "methodology"]
    texts, tpl = [], []
    for i in range(n):
        kind = kinds[i % 2]
        base = good_answer(kind, f"system {_word(i)}") if i % 3 else weak_answer(WEAK_KINDS[i % 5], kind,
                                                                                f"topic {_word(i)}")
        texts.append(base)
        tpl.append(kind)
    pdf = pd.DataFrame({"template_name": tpl, "response": texts})
    plf = pl.DataFrame({"template_name": tpl, "response": texts})
    t0 = time.perf_counter()
    kept_pl = int(apply_rules(plf, rules)["keep"].sum())
    t_pl = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept_pd = int(_pandas(pdf, rules).sum())
    t_pd = time.perf_counter() - t0
    print(f"{n:,} rows   polars (nexus): {n / t_pl:12,.0f} rows/s ({t_pl:.1f} s, kept {kept_pl:,})")
    print(f"{n:,} rows   plain pandas:   {n / t_pd:12,.0f} rows/s ({t_pd:.1f} s, kept {kept_pd:,})")
    print(f"ratio polars / pandas: {t_pd / t_pl:.1f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
