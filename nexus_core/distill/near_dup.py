"""Near-duplicate texts: MinHash signatures over word shingles, LSH banding, verified candidates.

Two teacher answers that differ in a few words are the same training example twice, and an
identical fingerprint misses them. The Jaccard similarity of two texts' sets of word shingles (runs
of ``shingle_words`` consecutive words) says how much they share; MinHash estimates it cheaply as
the share of positions where two signatures agree. Comparing every pair is quadratic, so LSH
banding proposes candidates (texts whose signatures agree on a whole band), the signatures screen
them, and the survivors' exact Jaccard decides: chance bucket collisions (shared boilerplate)
reject nothing, and the estimate's noise (~0.05 with 64 permutations) neither misses true copies
nor rejects answers that merely share a template.

Everything after tokenising is numpy over flat arrays (no Python per row), with fixed seeds, so the
result is deterministic. Words are hashed with polars' ``hash``, which is stable within a polars
version; an upgrade could change a verdict only through a hash collision or a missed LSH proposal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

# Characters that separate words (besides spaces); everything else is part of a word.
_SEPARATORS = [*"\t\n\r\f\v!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", *"\u00a0\u2013\u2014\u2018\u2019\u201c\u201d\u2026"]
_WORD_SEED = 0x4E5855  # fixed seeds: the same texts give the same signatures in every run
_PERM_SEED = 20240601
# LSH proposes, per band, the first text of a bucket and this many nearest earlier ones, not every
# earlier text in it: boilerplate can fill a bucket with thousands of unrelated texts, and all pairs
# of those is quadratic. A true match shares several bands (at Jaccard 0.8 and 4 rows a band, 6.5
# of 16 on average), and a crowded bucket hides it in one band only.
NEIGHBOURS = 4
_CHUNK = 1 << 14  # shingles (and candidate pairs) per vectorised block: temporaries stay in cache
_TEXTS = 1 << 16  # texts tokenised at a time


def _mix(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser: spreads every input bit over the whole word (in place)."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def word_hashes(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word of every text, flat; number of words per text).

    Words are lowercased runs between whitespace and punctuation, so case, punctuation and spacing
    changes do not count as differences.
    """
    words = (texts.fill_null("").str.to_lowercase()
             .str.replace_many(_SEPARATORS, [" "] * len(_SEPARATORS)).str.split(" ")
             .list.eval(pl.element().filter(pl.element() != "").hash(_WORD_SEED)))
    counts = words.list.len().to_numpy().astype(np.int64)
    return words.explode().drop_nulls().to_numpy().astype(np.uint64), counts


def shingle_hashes(words: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every k-word shingle, flat; number of shingles per text).

    A text shorter than ``k`` words is one shingle of all its words, so short texts still compare
    (equal or not) instead of having no signature; a text with no words has no shingles.
    """
    count = np.repeat(counts, counts)  # per word: words in its text
    left = np.repeat(np.cumsum(counts), counts) - np.arange(words.size)  # words from here to its text's end
    padded = np.concatenate([words, np.zeros(k, dtype=np.uint64)])
    acc = words.copy()
    for j in range(1, k):  # a polynomial in the next k words (order matters), never past the text's end
        acc *= np.uint64(0x9E3779B97F4A7C15)
        acc += np.where(left > j, padded[j:j + words.size], np.uint64(0))
    start = (left >= k) | (left == count)  # full shingles, or a short text's only one
    return acc[start], counts - np.minimum(counts, k) + (counts > 0)


def _ragged(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n): indices of ragged slices of a flat array."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def minhash(shingles: np.ndarray, counts: np.ndarray, permutations: int, seed: int = _PERM_SEED) -> np.ndarray:
    """(texts, permutations) uint32 MinHash signatures; a text with no shingles gets all-max.

    Permutation p maps the top 32 bits x of a shingle's hash (random-looking: a polynomial in
    random word hashes) to ``a_p*x + b_p mod 2**32`` with a_p odd, a bijection. 32-bit arithmetic
    is twice as fast as 64-bit, and on such input the estimates have the textbook mean and spread
    (checked at Jaccard 0.2, 0.6 and 0.86).
    """
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2**32, size=(permutations, 1), dtype=np.uint32) | np.uint32(1))
    b = rng.integers(0, 2**32, size=(permutations, 1), dtype=np.uint32)
    x = (shingles >> np.uint64(32)).astype(np.uint32)
    sig = np.full((counts.size, permutations), np.iinfo(np.uint32).max, dtype=np.uint32)
    has = np.flatnonzero(counts > 0)
    ends = np.cumsum(counts[has])  # end offset of each such text's shingles
    block = np.empty((permutations, _CHUNK), dtype=np.uint32)  # reused: no page faults per block
    lo = 0
    while lo < has.size:  # blocks of whole texts, at most _CHUNK shingles (or one longer text)
        s0 = ends[lo] - counts[has[lo]]
        hi = max(lo + 1, int(np.searchsorted(ends, s0 + _CHUNK, side="right")))
        xs = x[s0:ends[hi - 1]]
        out = block[:, :xs.size] if xs.size <= _CHUNK else np.empty((permutations, xs.size), np.uint32)
        np.multiply(a, xs, out=out)
        out += b
        sig[has[lo:hi]] = np.minimum.reduceat(out, ends[lo:hi] - counts[has[lo:hi]] - s0, axis=1).T
        lo = hi
    return sig


def _band_candidates(sig: np.ndarray, rows: np.ndarray, bands: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Band by band, (later, earlier) texts that share that band's bucket: each text with the first
    text of its bucket and with its ``NEIGHBOURS`` nearest earlier ones."""
    per = sig.shape[1] // bands
    for band in range(bands):
        cols = sig[rows, band * per:(band + 1) * per].astype(np.uint64)
        key = cols[:, 0]
        for c in range(1, per):
            key = _mix(key * np.uint64(0x9E3779B97F4A7C15) + cols[:, c])
        by_key = np.argsort(key, kind="stable")  # stable: input order inside a bucket
        order, sk = rows[by_key], key[by_key]
        pos = np.arange(order.size)
        head = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], pos, 0))
        pairs = [(pos[pos > head], head[pos > head])]
        pairs += [(pos[pos - d > head], pos[pos - d > head] - d) for d in range(1, NEIGHBOURS + 1)]
        yield order[np.concatenate([p[0] for p in pairs])], order[np.concatenate([p[1] for p in pairs])]


def _jaccard(shingles: np.ndarray, offsets: np.ndarray, counts: np.ndarray, a: np.ndarray,
             b: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of texts ``a[p]`` and ``b[p]``, for each pair p.

    One sort for all pairs: keys are (pair, shingle, side) packed in a uint64 (at most 2**14 pairs,
    49 bits of shingle hash); after dropping repeats, a shingle on both sides is two adjacent keys
    that differ only in the side bit.
    """
    pair = np.arange(a.size, dtype=np.uint64) << np.uint64(50)
    keys = [np.repeat(pair, counts[t]) | (shingles[_ragged(offsets[t], counts[t])] >> np.uint64(15) << np.uint64(1))
            | np.uint64(side) for side, t in enumerate((a, b))]
    packed = np.unique(np.concatenate(keys))
    owner = (packed >> np.uint64(50)).astype(np.int64)
    both = (packed[1:] >> np.uint64(1)) == (packed[:-1] >> np.uint64(1))
    inter = np.bincount(owner[1:][both], minlength=a.size)
    return inter / (np.bincount(owner, minlength=a.size) - inter)


def near_duplicates(texts: pl.Series | list[str], *, threshold: float = 0.8, shingle_words: int = 5,
                    permutations: int = 64, bands: int = 16) -> np.ndarray:
    """For each text, the index of an earlier text it nearly duplicates, or -1.

    "Nearly duplicates" means: LSH proposes the pair (they agree on a whole band of their MinHash
    signatures), their signatures agree on enough positions to make a Jaccard similarity of
    ``threshold`` plausible (within 4 standard errors), and the exact Jaccard similarity of their
    sets of ``shingle_words``-word shingles is at least ``threshold``. The exact check matters: with
    64 permutations the estimate alone errs by ~0.05, which both misses true copies and rejects
    templated answers that merely share a frame. Any earlier text counts, whether or not it was
    itself a near duplicate, so the first of a group is the one kept. Texts with no words never match.
    """
    if permutations % bands:
        raise ValueError(f"permutations ({permutations}) must be a multiple of bands ({bands})")
    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.Utf8)
    match = np.full(series.len(), -1, dtype=np.int64)
    if not series.len():
        return match

    def signatures(lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shingles, counts = shingle_hashes(*word_hashes(series.slice(lo, _TEXTS)), shingle_words)
        return shingles, counts, minhash(shingles, counts, permutations)

    # Blocks of texts: words take ~5x the memory of the shingles kept for the exact check, and
    # polars and numpy release the GIL, so threads use every core (map keeps the order).
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        blocks = list(pool.map(signatures, range(0, series.len(), _TEXTS)))
    shingles, n_sh, sig = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
    del blocks
    offsets = np.cumsum(n_sh) - n_sh
    slack = 4 * math.sqrt(threshold * (1 - threshold) / permutations)
    screen = math.ceil((threshold - slack) * permutations - 1e-9)  # agreeing positions worth an exact check
    checked = np.empty(0, dtype=np.int64)  # pairs already compared exactly (later * n + earlier), sorted
    for later, earlier in _band_candidates(sig, np.flatnonzero(n_sh > 0), bands):
        todo = match[later] < 0  # matched texts need no more comparisons
        later, earlier = later[todo], earlier[todo]
        close = np.concatenate([(sig[later[i:i + _CHUNK]] == sig[earlier[i:i + _CHUNK]]).sum(axis=1) >= screen
                                for i in range(0, later.size, _CHUNK)] or [np.zeros(0, bool)])
        code = later[close] * match.size + earlier[close]
        code = code[~np.isin(code, checked, assume_unique=True)]  # bands often propose the same pair
        checked = np.union1d(checked, code)
        later, earlier = code // match.size, code % match.size
        for i in range(0, later.size, _CHUNK):
            li, ei = later[i:i + _CHUNK], earlier[i:i + _CHUNK]
            hit = (_jaccard(shingles, offsets, n_sh, li, ei) >= threshold) & (match[li] < 0)
            match[li[hit]] = ei[hit]
    return match
