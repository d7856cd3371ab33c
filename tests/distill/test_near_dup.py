"""Near-duplicate detection (nexus_core.distill.near_dup) and its place in the filter rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from nexus_core.config import validate
from nexus_core.distill.near_dup import near_duplicates
from nexus_core.distill.rules import FilterRules, apply_rules, load_rules
from nexus_core.errors import ConfigError
from tests.support.distill_teacher import good_answer

ANSWER = (
    "If nitrogen deposition speeds up litter decomposition in boreal forests, then plots that receive "
    "added ammonium nitrate should lose leaf litter mass faster than untreated plots over two seasons. "
    "We would place mesh litter bags in twenty paired plots, fertilise one plot of each pair every month, "
    "and weigh the remaining litter every eight weeks. Soil moisture and temperature would be logged at "
    "each bag so that weather cannot explain the difference. A decay constant in treated plots that is no "
    "larger than in control plots would refute the idea, whatever the mechanism proposed for it."
)
TITLES = ["Soil microbial respiration under intermittent drought", "Thermal drift in low-cost MEMS accelerometers",
          "Sleep fragmentation and next-day working memory", "Groundwater recharge after wildfire"]


def shingle_set(text: str, k: int = 5) -> set[tuple[str, ...]]:
    """Reference: the text's k-word shingles, the plain-Python way."""
    w = re.findall(r"[^\W_]+", text.lower())
    n = min(k, len(w))
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str | set, b: str | set, k: int = 5) -> float:
    """Reference: exact Jaccard similarity of two texts' (or shingle sets') k-word shingles."""
    sa, sb = (shingle_set(x, k) if isinstance(x, str) else x for x in (a, b))
    return len(sa & sb) / len(sa | sb)


def change(text: str, **swaps: str) -> str:
    for old, new in swaps.items():
        assert f" {old} " in text
        text = text.replace(f" {old} ", f" {new} ", 1)
    return text


PARAPHRASE = change(ANSWER, twenty="thirty", weigh="measure")  # two words changed, far apart


def rules(repo, **over) -> FilterRules:
    base, _ = load_rules(repo / "configs/distill/filters.yaml")
    return validate(FilterRules, {**base.model_dump(), **over})


def test_paraphrase_is_caught_and_first_occurrence_kept():
    assert jaccard(ANSWER, PARAPHRASE) >= 0.8  # the premise: a near duplicate by the rule
    other = good_answer("hypothesis", "Coral bleaching thresholds in turbid reefs")
    match = near_duplicates([other, ANSWER, PARAPHRASE, change(ANSWER, eight="six")]).tolist()
    assert match == [-1, -1, 1, 1]  # later ones point at the first, which is kept
    assert near_duplicates([PARAPHRASE, ANSWER]).tolist() == [-1, 0]  # input order decides, not the text


def test_templated_answers_and_shared_boilerplate_are_not_near_duplicates(repo):
    # The tiny demo's recorded teacher answers share everything but the title; some pairs sit at 0.76,
    # where a MinHash estimate alone (+-0.05 at 64 permutations) rejects a few. The exact check decides.
    lines = (repo / "configs/distill/recorded/tiny_teacher.jsonl").read_text().splitlines()
    templated = list(dict.fromkeys(json.loads(x)["response"]["choices"][0]["message"]["content"] for x in lines))
    assert len(templated) > 50 and max(jaccard(a, b) for i, a in enumerate(templated) for b in templated[:i]) > 0.75
    assert (near_duplicates(templated) == -1).all()
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(5000)]
    preamble = ("Thank you for the question. Below is a structured answer covering the hypothesis, the "
                "method and the expected result, following the requested template exactly. ")
    bodies = [preamble + " ".join(rng.choice(words, size=30)) for _ in range(300)]
    assert (near_duplicates(bodies) == -1).all()


def test_rules_report_exact_and_near_duplicates_separately(repo):
    r, _ = load_rules(repo / "configs/distill/filters.yaml")
    texts = [ANSWER, None, PARAPHRASE, "  " + ANSWER.upper() + " ", ANSWER.replace(",", ";"), "  "]
    out = apply_rules(pl.DataFrame({"template_name": ["hypothesis"] * len(texts), "response": texts}), r)
    assert out["reasons"].to_list() == [[], ["no_response"], ["near_duplicate"], ["exact_duplicate"],
                                        ["near_duplicate"], ["no_response"]]
    off = apply_rules(pl.DataFrame({"template_name": ["hypothesis"] * 3, "response": [ANSWER, PARAPHRASE, ANSWER]}),
                      rules(repo, dedupe=False))
    assert off["keep"].to_list() == [True, True, True]


def test_threshold_and_shingle_size_come_from_the_rules(repo):
    j = jaccard(ANSWER, PARAPHRASE)
    df = pl.DataFrame({"template_name": ["hypothesis"] * 2, "response": [ANSWER, PARAPHRASE]})
    assert apply_rules(df, rules(repo, near_duplicate_threshold=round(j - 0.01, 2)))["keep"].to_list() == [True, False]
    assert apply_rules(df, rules(repo, near_duplicate_threshold=round(j + 0.01, 2)))["keep"].to_list() == [True, True]
    # Longer shingles: each changed word breaks more of them, so the same pair falls below 0.8.
    assert jaccard(ANSWER, PARAPHRASE, k=9) < 0.8
    assert apply_rules(df, rules(repo, shingle_words=9))["keep"].to_list() == [True, True]
    bad = {**rules(repo).model_dump(), "lsh_bands": 10}
    with pytest.raises(ConfigError, match=r"lsh_bands: .*must divide minhash_permutations \(64\)"):
        validate(FilterRules, bad, "filters.yaml")


def test_short_texts():
    texts = ["Needs more data.", "needs MORE data!", "Needs less data.", "Yes", "yes.", "...", "", "No"]
    assert near_duplicates(texts).tolist() == [-1, 0, -1, -1, 3, -1, -1, -1]
    # a text shorter than a shingle is one shingle: a word more or less is a different text
    assert near_duplicates(["Needs more data", "Needs more data now"]).tolist() == [-1, -1]


def test_same_verdicts_in_a_fresh_process():
    rng = np.random.default_rng(7)
    texts = [change(ANSWER, twenty=str(rng.integers(1000)), eight=str(rng.integers(1000))) for _ in range(200)]
    texts += [good_answer("methodology", t) for t in TITLES]
    here = near_duplicates(texts).tolist()
    assert here == near_duplicates(pl.Series(texts)).tolist() and max(here) >= 0
    code = ("import json, sys; from nexus_core.distill.near_dup import near_duplicates; "
            "print(json.dumps(near_duplicates(json.load(sys.stdin)).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's str hash must play no part
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         env=env, check=True)
    assert json.loads(res.stdout) == here


def test_matches_a_brute_force_reference():
    rng = np.random.default_rng(11)
    words = [f"t{i}" for i in range(400)]
    texts: list[str] = []
    for i in range(240):
        if i % 4 == 3:  # a copy of an earlier text with 1 to 6 words changed: some above 0.8, some below
            w = texts[int(rng.integers(len(texts)))].split()
            for _ in range(int(rng.integers(1, 7))):
                w[int(rng.integers(len(w)))] = str(rng.choice(words))
            texts.append(" ".join(w))
        else:
            texts.append(" ".join(rng.choice(words, size=int(rng.integers(60, 160)))))
    match = near_duplicates(texts)
    sets = [shingle_set(t) for t in texts]
    expected = [any(jaccard(sets[i], sets[j]) >= 0.8 for j in range(i)) for i in range(len(texts))]
    assert sum(expected) > 20 and sum(not e for e in expected[3::4]) > 5  # both kinds of copy occur
    assert (match >= 0).tolist() == expected
    assert all(j < i and jaccard(sets[i], sets[j]) >= 0.8 for i, j in enumerate(match) if j >= 0)
