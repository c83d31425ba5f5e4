"""Exact and near deduplication: repeated text wastes compute and teaches the model to memorize.

`ExactDedup` streams: it hashes each document's normalized text (blake2b, 128 bit) and keeps
the first occurrence in input order. Hashing runs in-process on purpose: shipping a document to
a worker costs as much as hashing it, and streaming keeps memory at one digest per unique text.

`NearDedup` is MinHash + LSH, built to be fast and reproducible:

- shingles are word n-grams (words = runs of ASCII letters/digits/underscore or any non-ASCII
  character, lowercased) or character n-grams (lowercased, whitespace collapsed), hashed to
  64 bits with numpy arithmetic (a polynomial over UTF-8 bytes or code points, then murmur's
  fmix64), a whole batch of documents per numpy call - no per-shingle Python work and no
  salted `hash()`, so every process gives the same numbers;
- each of the `num_perm` permutations is `(a*x + b) mod 2**32` over the top 32 bits of the
  shingle hashes, computed for all permutations at once as `[num_perm, shingles]` uint32 blocks
  with a segmented min per document (no per-shingle or per-permutation Python loop);
- bands x rows come from the threshold by minimizing the weighted false positive + false
  negative areas under the LSH S-curve (as datasketch's `_optimal_param` does). With verified
  pairs (the default) the weights are (0.2, 0.8), not datasketch's (0.5, 0.5): a false positive
  then costs one Jaccard check, a false negative a missed duplicate (threshold 0.8, 128
  permutations: 12x10 instead of 9x13, which finds 93% instead of 69% of the pairs at J = 0.85);
- signatures, band buckets and Jaccard checks run on the `Executor` (batches of documents, groups
  of bands, chunks of pairs), so no stage is a single-task bottleneck; the main process only
  concatenates arrays, counts signature agreement of candidate pairs (vectorized) and runs
  union-find over the accepted pairs;
- LSH candidates are verified (`verify="jaccard"`): a pair whose signatures agree so much (or so
  little) that the other answer has probability < 1e-9 is decided from the signatures; the rest
  get the exact Jaccard of their shingle sets. This removes the S-curve's false positives
  without losing the recall of the band parameters. `verify="none"` is plain LSH.
- clusters are the connected components of the accepted pairs (union-find); the earliest document
  of each cluster is kept, the others dropped, and `report()` lists every cluster.

The same input and parameters give byte-identical output and report, whatever the executor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from leantrain.corpus.executors import SerialExecutor
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import Drop, Executor, GlobalStep, StepStats
from leantrain.errors import ConfigError

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_M1 = _U64(0xFF51AFD7ED558CCD)
_M2 = _U64(0xC4CEB9FE1A85EC53)
_COMBINE = _U64(0x9E3779B97F4A7C15)  # odd multiplier that chains n-gram members / band rows
_BLOCK = 1 << 20  # uint32 elements of one signature block ([num_perm, shingles]); smaller blocks measured 3x slower
_SEGMENT = 1 << 20  # bytes hashed at once: 2 x 8 MiB power tables; 4x longer segments measured 1.6x slower
_DECIDE_P = 1e-9  # a pair is decided from its signature when the other answer is less likely than this
# Below this much text a process pool does not pay: on 2 cores, 2 MB took 0.043-0.10 s on a warm 2-worker pool
# against 0.045 s in process (bench/dedup.py); 20 MB took 0.31-0.49 s against 0.45 s.
POOL_MIN_BYTES = 8 << 20
_EMPTY = np.zeros(0, dtype=np.uint64)

# Bytes that belong to words: ASCII letters, digits, underscore, and every byte of a non-ASCII
# character (UTF-8 encodes those with bytes >= 128 only).
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[128:] = True
for _c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[ord(_c)] = True


def _is_word_byte(b: np.ndarray) -> np.ndarray:
    """`_WORD_BYTE[b]` with uint8 arithmetic (wrapping subtraction): measured faster than the table lookup."""
    w = (b | np.uint8(32)) - np.uint8(97) < np.uint8(26)  # a-z, A-Z
    w |= b - np.uint8(48) < np.uint8(10)  # 0-9
    w |= b >= np.uint8(128)
    w |= b == np.uint8(95)  # _
    return w


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64 in plain Python ints: stable across numpy versions and platforms."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


@lru_cache(maxsize=16)
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd multipliers `a` and offsets `b` (uint32, shape [num_perm, 1]) from the seed."""
    state, a, b = seed & _MASK64, [], []
    for _ in range(num_perm):
        state, z = _splitmix64(state)
        a.append((z >> 32) | 1)
        b.append(z & 0xFFFFFFFF)
    return np.array(a, dtype=np.uint32)[:, None], np.array(b, dtype=np.uint32)[:, None]


def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer, in place on a uint64 array (wrapping arithmetic)."""
    h ^= h >> _U64(33)
    h *= _M1
    h ^= h >> _U64(33)
    h *= _M2
    h ^= h >> _U64(33)
    return h


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


_Q = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_Q_INV = pow(_Q, -1, 1 << 64)
_tables: list[np.ndarray] = []  # [Q**k, Q**-k] mod 2**64 for k < len, grown on demand (per process)


_scratch_buf: list[np.ndarray] = []


def _scratch(n: int) -> np.ndarray:
    """A reused uint64 work array: fresh multi-MB arrays cost a page fault per 4 KiB (measured 3-5x
    slower than the arithmetic on a busy machine)."""
    if not _scratch_buf or _scratch_buf[0].size < n:
        _scratch_buf[:] = [np.empty(max(n, _SEGMENT + 1), dtype=np.uint64)]
    return _scratch_buf[0][:n]


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if not _tables or _tables[0].size < n:
        size = max(n, 1 << 20, 2 * _tables[0].size if _tables else 0)
        pw = np.empty(size, dtype=np.uint64)
        inv = np.empty(size, dtype=np.uint64)
        pw[0] = inv[0] = 1
        pw[1:], inv[1:] = _Q, _Q_INV
        _tables[:] = [np.cumprod(pw, out=pw), np.cumprod(inv, out=inv)]
    return _tables[0], _tables[1]


def _word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashes and [start, end) byte offsets of the words in lowercased UTF-8 `data`.

    A word's hash is fmix64(sum of byte * Q**offset-in-word + length): it depends on the word
    only, not on where it sits, so documents hash the same alone or concatenated in a batch.
    Long inputs go in segments cut between words, so the power tables stay ~_SEGMENT long.
    """
    b = np.frombuffer(data, dtype=np.uint8)
    is_word = _is_word_byte(b)
    parts, lo = [], 0
    while lo < b.size:
        hi = min(b.size, lo + _SEGMENT)
        if hi < b.size:
            tail = max(lo, hi - 4096)  # look near the end first: almost always enough
            gaps = np.flatnonzero(~is_word[tail:hi])
            if not gaps.size:
                tail = lo
                gaps = np.flatnonzero(~is_word[lo:hi])
            if gaps.size:
                hi = tail + int(gaps[-1]) + 1  # just after a non-word byte: no word is cut
            else:  # one word longer than a segment: take all of it
                after = np.flatnonzero(~is_word[hi:])
                hi = hi + int(after[0]) + 1 if after.size else b.size
        parts.append(_segment_word_hashes(b[lo:hi], is_word[lo:hi], lo))
        lo = hi
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return _EMPTY, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]


def _segment_word_hashes(b: np.ndarray, is_word: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The polynomial of every word from one cumulative sum: (S[end] - S[start]) * Q**-start."""
    # changes of the word mask (padded with non-word on both sides) alternate: start, end, start, ...
    # (bool != and flatnonzero on bool: measured 5x faster than np.diff on int8)
    changes = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1
    if is_word.size and is_word[0]:
        changes = np.concatenate(([0], changes))
    if is_word.size and is_word[-1]:
        changes = np.concatenate((changes, [is_word.size]))
    starts, ends = changes[0::2], changes[1::2]
    if starts.size == 0:
        return _EMPTY, starts, ends
    pw, inv = _powers(b.size)
    csum = _scratch(b.size + 1)
    csum[0] = 0
    np.multiply(pw[: b.size], b, out=csum[1:])  # word bytes are never 0, so no +1 needed
    np.cumsum(csum[1:], out=csum[1:])
    hashes = (csum[ends] - csum[starts]) * inv[starts]
    hashes += (ends - starts).astype(np.uint64)
    return _fmix64(hashes), starts + offset, ends + offset


def word_spans(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Word hashes of `text` with their [start, end) byte offsets in `text.lower().encode("utf-8")`."""
    return _word_hashes(text.lower().encode("utf-8", errors="surrogatepass"))


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the n-grams of a token-hash sequence (one hash of all tokens if fewer than n)."""
    if tokens.size == 0:
        return _EMPTY
    n = min(n, tokens.size)
    m = tokens.size - n + 1
    h = tokens[:m].copy()
    for j in range(1, n):
        h *= _COMBINE
        h += tokens[j:j + m]
    return _fmix64(h)


def word_ngrams(text: str, n: int) -> np.ndarray:
    """Hashes of the word n-grams of `text`; empty when it has fewer than `n` words."""
    words, _, _ = word_spans(text)
    return ngram_hashes(words, n) if words.size >= n else _EMPTY


def shingle_hashes(text: str, shingle: str, ngram: int) -> np.ndarray:
    """64-bit shingle hashes of one document (with repeats); a short document is one shingle."""
    if shingle == "word":
        words, _, _ = word_spans(text)
        return ngram_hashes(words, ngram)
    chars = _codepoints(" ".join(text.lower().split())).astype(np.uint64)
    return ngram_hashes(_fmix64(chars * _COMBINE + _U64(0x632BE59BD9B4E019)), ngram)


@dataclass(frozen=True)
class _Params:
    shingle: str
    ngram: int
    num_perm: int
    bands: int
    rows: int
    seed: int


def _batch_shingles(texts: list[str], p: _Params) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a batch of documents, concatenated, with document offsets [len(texts) + 1].

    Word mode hashes the whole batch in one pass (documents joined by a newline, which no word
    crosses), so numpy's per-call overhead is paid per batch, not per document.
    """
    if p.shingle != "word":
        parts = [shingle_hashes(t, p.shingle, p.ngram) for t in texts]
        offs = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([x.size for x in parts], out=offs[1:])
        return (np.concatenate(parts) if parts else _EMPTY), offs
    encoded = [t.lower().encode("utf-8", errors="surrogatepass") for t in texts]
    words, starts, _ = _word_hashes(b"\n".join(encoded))
    doc_start = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(e) + 1 for e in encoded], out=doc_start[1:])
    word_bounds = np.searchsorted(starts, doc_start)  # first word of each document
    nwords = np.diff(word_bounds)
    n = p.ngram
    counts = np.where(nwords >= n, nwords - n + 1, np.minimum(nwords, 1))
    offs = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    if words.size >= n and bool((nwords >= n).all()):  # usual case: drop the n-grams that straddle documents
        grams = ngram_hashes(words, n)
        keep = np.ones(grams.size, dtype=bool)
        keep[(word_bounds[1:-1, None] - np.arange(1, n)[None, :]).ravel()] = False
        return grams[keep], offs
    out = np.empty(int(offs[-1]), dtype=np.uint64)
    if words.size >= n:
        grams = ngram_hashes(words, n)  # also the n-grams that cross documents; dropped below
        long_docs = np.flatnonzero(nwords >= n)
        per_doc = counts[long_docs]
        local = np.arange(int(per_doc.sum())) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        # shingle k of document d: output slot offs[d] + k, n-gram starting at word word_bounds[d] + k
        out[np.repeat(offs[long_docs], per_doc) + local] = grams[np.repeat(word_bounds[long_docs], per_doc) + local]
    for d in np.flatnonzero((nwords > 0) & (nwords < n)).tolist():  # short documents: one shingle of all words
        out[offs[d]] = ngram_hashes(words[word_bounds[d]:word_bounds[d + 1]], n)[0]
    return out, offs


def _affine(a: np.ndarray, b: np.ndarray, x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """(a*x + b) mod 2**32 for every permutation (rows) and shingle (columns), in `buf`."""
    out = buf[:, : x.size]
    np.multiply(a, x[None, :], out=out)
    out += b
    return out


def _minhash(shingles: np.ndarray, offs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures [docs, num_perm] (all 0xFFFFFFFF for a document without shingles).

    Works on blocks of whole documents of up to _BLOCK // num_perm shingles: one [num_perm, block] uint32 array of
    (a*x + b) mod 2**32, then a segmented min (`minimum.reduceat`) per document.
    """
    x = (shingles >> _U64(32)).astype(np.uint32)
    ndocs, k = offs.size - 1, a.shape[0]
    sig = np.full((ndocs, k), 0xFFFFFFFF, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(offs) > 0)
    starts, ends = offs[nonempty], offs[nonempty + 1]
    chunk = max(1, _BLOCK // k)
    buf = np.empty((k, chunk), dtype=np.uint32)  # reused: a fresh 4 MiB array per block costs page faults
    i = 0
    while i < nonempty.size:
        lo = starts[i]
        j = max(i + 1, int(np.searchsorted(ends, lo + chunk, side="right")))  # documents ending in the block
        if j == i + 1:  # one document, maybe longer than a block: min over chunks
            m = sig[nonempty[i]]
            for c in range(lo, ends[i], chunk):
                blk = _affine(a, b, x[c:min(ends[i], c + chunk)], buf)
                np.minimum(m, blk.min(axis=1), out=m)
        else:
            blk = _affine(a, b, x[lo:ends[j - 1]], buf)
            sig[nonempty[i:j]] = np.minimum.reduceat(blk, starts[i:j] - lo, axis=1).T
        i = j
    return sig


def _band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per (document, band) from that band's rows of the signature."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        cols = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
        h = cols[:, 0] + _U64(band + 1)
        for j in range(1, rows):
            h *= _COMBINE
            h += cols[:, j]
        out[:, band] = _fmix64(h)
    return out


def _signature_task(task: tuple[list[str], _Params]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker: signatures, band hashes and has-shingles mask for a batch of texts."""
    texts, p = task
    a, b = _permutations(p.seed, p.num_perm)
    shingles, offs = _batch_shingles(texts, p)
    sig = _minhash(shingles, offs, a, b)
    return sig, _band_hashes(sig, p.bands, p.rows), np.diff(offs) > 0


def _bucket_task(task: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Worker: candidate pairs (i < j) from a group of bands; each bucket links every member to its
    first member and to the member before it (same connected components as all pairs, linear size)."""
    band_hashes, valid = task
    ids = np.flatnonzero(valid)
    out = []
    for col in range(band_hashes.shape[1]):
        h = band_hashes[ids, col]
        order = np.argsort(h, kind="stable")  # stable: equal hashes stay in input order
        hs, members = h[order], ids[order]
        same = hs[1:] == hs[:-1]
        if not same.any():
            continue
        run_start = np.concatenate(([True], ~same))
        first = members[np.maximum.accumulate(np.where(run_start, np.arange(members.size), 0))]
        later = np.flatnonzero(~run_start)
        out.append(np.stack([first[later], members[later]], axis=1))
        chain = later[~run_start[later - 1]]  # not the second of its run (already linked to first)
        out.append(np.stack([members[chain - 1], members[chain]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _jaccard_task(task: tuple[list[str], np.ndarray, _Params]) -> np.ndarray:
    """Worker: exact Jaccard of shingle sets for pairs of indices into `texts`."""
    texts, pairs, p = task
    shingles, offs = _batch_shingles(texts, p)
    sets = []
    for i in range(len(texts)):
        x = np.sort(shingles[offs[i]:offs[i + 1]])
        sets.append(x[np.concatenate(([True], x[1:] != x[:-1]))] if x.size else x)
    out = np.empty(len(pairs), dtype=np.float64)
    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = sets[i], sets[j]
        inter = int((b[np.searchsorted(b, a).clip(max=b.size - 1)] == a).sum()) if a.size and b.size else 0
        union = a.size + b.size - inter
        out[k] = inter / union if union else 1.0
    return out


def _s_curve_areas(threshold: float, bands: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Areas of false positives (below the threshold) and false negatives (above) of each (b, r)."""

    def simpson(lo: float, hi: float, f) -> np.ndarray:
        xs = np.linspace(lo, hi, 201)
        w = np.ones(201)
        w[1:-1:2], w[2:-1:2] = 4, 2
        return (f(xs[None, :]) * w).sum(axis=1) * (hi - lo) / 600

    b, r = bands[:, None].astype(float), rows[:, None].astype(float)
    fp = simpson(0.0, threshold, lambda s: 1 - (1 - s**r) ** b)
    fn = simpson(threshold, 1.0, lambda s: (1 - s**r) ** b)
    return fp, fn


def optimal_bands_rows(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimizing fp_weight*FP area + fn_weight*FN area."""
    combos = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands, rows = np.array(combos).T
    fp, fn = _s_curve_areas(threshold, bands, rows)
    best = int(np.argmin(weights[0] * fp + weights[1] * fn))  # first minimum: ties go to fewer bands
    return int(bands[best]), int(rows[best])


def _decision_bounds(threshold: float, num_perm: int) -> tuple[int, int]:
    """(reject_at_or_below, accept_at_or_above) counts of agreeing signature slots.

    With true Jaccard at the threshold the agreements are ~Binomial(num_perm, threshold); below
    `lo` a pair at or above the threshold is < 1e-9 likely, above `hi` a pair below it is too.
    """
    pmf = [math.comb(num_perm, m) * threshold**m * (1 - threshold) ** (num_perm - m) for m in range(num_perm + 1)]
    lo, acc = -1, 0.0
    while lo + 1 <= num_perm and acc + pmf[lo + 1] < _DECIDE_P:
        lo += 1
        acc += pmf[lo]
    hi, acc = num_perm + 1, 0.0
    while hi - 1 >= 0 and acc + pmf[hi - 1] < _DECIDE_P:
        hi -= 1
        acc += pmf[hi]
    return lo, hi


def _union_find_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root of each node = the smallest index in its connected component."""
    parent = list(range(n))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.arange(n, dtype=np.int64)
    touched = np.unique(pairs).tolist()  # every other document is its own root
    roots[touched] = [find(i) for i in touched]
    return roots


def _batches(sizes: list[int], workers: int) -> list[tuple[int, int]]:
    """[start, end) document ranges of roughly equal text size, a few per worker (for balance)."""
    total = sum(sizes)
    target = min(8 << 20, max(256 << 10, total // max(1, 4 * workers)))
    out, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= target:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


class ExactDedup(GlobalStep):
    """Drop documents whose normalized text (lowercased, whitespace collapsed) was seen before.

    `normalize=False` compares the raw text. Keeps the first occurrence; `report()` lists each
    group of copies with the kept id and the removed ids.
    """

    name = "exact_dedup"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self._clusters: dict[bytes, dict[str, Any]] = {}

    def _key(self, text: str) -> bytes:
        if self.normalize:
            text = " ".join(text.lower().split())
        return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()

    def run(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        seen: dict[bytes, str] = {}
        self._clusters = {}
        for doc in docs:
            key = self._key(doc.text)
            kept = seen.get(key)
            if kept is None:
                seen[key] = doc.id
                yield doc
                continue
            cluster = self._clusters.setdefault(key, {"kept": kept, "removed": []})
            cluster["removed"].append(doc.id)
            stats.drop(doc, Drop("dedup:exact", f"same normalized text as {kept}"))

    def report(self) -> dict[str, Any]:
        clusters = [{"cluster_id": i, **c} for i, c in enumerate(self._clusters.values())]
        return {"params": {"normalize": self.normalize, "hash": "blake2b-128"}, "clusters": clusters}


class NearDedup(GlobalStep):
    """MinHash + LSH near-duplicate removal; keeps the earliest document of each cluster.

    `weights` = (false positive, false negative) weights for choosing bands x rows (default: see the
    module docstring); `bands_rows` fixes them instead.

    Holds the documents of one run in memory (it must see them all before it can yield any) plus a
    `[documents, num_perm]` uint32 signature matrix.

    Input smaller than `pool_min_bytes` of text runs in this process whatever the executor (a pool's
    start-up and transfers cost more than they save there); `executor_used` says which ran.
    """

    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: str = "word", ngram: int = 5,
                 seed: int = 1, bands_rows: tuple[int, int] | None = None,
                 weights: tuple[float, float] | None = None, verify: str = "jaccard",
                 pool_min_bytes: int = POOL_MIN_BYTES) -> None:
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"near dedup threshold {threshold} must be between 0 and 1 (exclusive); try 0.8")
        if num_perm < 2:
            raise ConfigError(f"near dedup num_perm {num_perm} is too small; use 64-256 (128 is usual)")
        if shingle not in ("word", "char"):
            raise ConfigError(f"near dedup shingle {shingle!r} is not allowed; use 'word' or 'char'")
        if ngram < 1:
            raise ConfigError(f"near dedup ngram {ngram} must be >= 1; try 5 for words")
        if verify not in ("jaccard", "none"):
            raise ConfigError(f"near dedup verify {verify!r} is not allowed; use 'jaccard' or 'none'")
        if weights is None:  # verified pairs make a false positive cost one Jaccard check: lean to recall
            weights = (0.2, 0.8) if verify == "jaccard" else (0.5, 0.5)
        if bands_rows is None:
            bands_rows = optimal_bands_rows(threshold, num_perm, weights)
        bands, rows = bands_rows
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ConfigError(f"near dedup bands x rows {bands}x{rows} must be positive with product <= num_perm "
                              f"{num_perm}; leave bands_rows unset to derive it from the threshold")
        self.threshold, self.verify, self.weights = threshold, verify, weights
        self.params = _Params(shingle, ngram, num_perm, bands, rows, seed)
        self.pool_min_bytes = pool_min_bytes
        self.executor_used = ""
        self._report: dict[str, Any] = {}

    def signatures(self, docs: list[Document], executor: Executor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(signatures [n, num_perm] uint32, band hashes [n, bands] uint64, has-shingles mask [n])."""
        ranges = _batches([len(d.text) for d in docs], executor.workers)
        tasks = [([d.text for d in docs[s:e]], self.params) for s, e in ranges]
        parts = list(executor.map(_signature_task, tasks))
        if not parts:
            p = self.params
            return (np.zeros((0, p.num_perm), np.uint32), np.zeros((0, p.bands), np.uint64), np.zeros(0, bool))
        return tuple(np.concatenate(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]

    def _candidates(self, band_hashes: np.ndarray, valid: np.ndarray, executor: Executor) -> np.ndarray:
        groups = [g for g in np.array_split(np.arange(self.params.bands), max(1, executor.workers)) if g.size]
        parts = list(executor.map(_bucket_task, [(np.ascontiguousarray(band_hashes[:, g]), valid) for g in groups]))
        pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        if pairs.size == 0:
            return pairs.reshape(0, 2).astype(np.int64)
        n = np.int64(band_hashes.shape[0])
        keys = np.unique(pairs[:, 0].astype(np.int64) * n + pairs[:, 1])
        return np.stack([keys // n, keys % n], axis=1)

    def _verify(self, docs: list[Document], sig: np.ndarray, pairs: np.ndarray,
                executor: Executor) -> tuple[np.ndarray, dict[str, int]]:
        if self.verify == "none" or pairs.size == 0:
            return pairs, {"candidate_pairs": len(pairs), "accepted_pairs": len(pairs)}
        agree = np.empty(len(pairs), dtype=np.int64)
        for s in range(0, len(pairs), 65536):
            blk = pairs[s:s + 65536]
            agree[s:s + 65536] = (sig[blk[:, 0]] == sig[blk[:, 1]]).sum(axis=1)
        lo, hi = _decision_bounds(self.threshold, self.params.num_perm)
        accept = agree >= hi
        unsure = np.flatnonzero((agree > lo) & ~accept)
        if unsure.size:
            parts = max(1, min(len(unsure) // 256, 4 * executor.workers))
            if executor.workers > 1:  # every worker gets a chunk (under 512 pairs once meant one chunk, one worker)
                parts = max(parts, min(2 * executor.workers, len(unsure)))
            chunks = np.array_split(unsure, parts)
            tasks = []
            for chunk in chunks:
                ids, local = np.unique(pairs[chunk], return_inverse=True)
                tasks.append(([docs[i].text for i in ids], local.reshape(-1, 2), self.params))
            jac = np.concatenate(list(executor.map(_jaccard_task, tasks)))
            accept[unsure] = jac >= self.threshold
        info = {"candidate_pairs": len(pairs), "decided_by_signature": len(pairs) - int(unsure.size),
                "jaccard_checked": int(unsure.size), "accepted_pairs": int(accept.sum())}
        return pairs[accept], info

    def run(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        docs = list(docs)
        size = sum(len(d.text) for d in docs)
        if executor.workers > 1 and size < self.pool_min_bytes:
            executor = SerialExecutor()
            self.executor_used = f"in process ({size / 1e6:.1f} MB of text < {self.pool_min_bytes / 1e6:.1f} MB)"
        else:
            self.executor_used = getattr(executor, "describe", lambda: f"{executor.workers} workers")()
        sig, band_hashes, valid = self.signatures(docs, executor)
        pairs = self._candidates(band_hashes, valid, executor)
        pairs, info = self._verify(docs, sig, pairs, executor)
        roots = _union_find_roots(len(docs), pairs)
        removed = np.flatnonzero(roots != np.arange(len(docs)))
        cluster_of: dict[int, int] = {}
        clusters: list[dict[str, Any]] = []
        for i in removed.tolist():  # ascending, so clusters are numbered by their first removed doc
            root = int(roots[i])
            if root not in cluster_of:
                cluster_of[root] = len(clusters)
                clusters.append({"cluster_id": len(clusters), "kept": docs[root].id, "removed": []})
            clusters[cluster_of[root]]["removed"].append(docs[i].id)
        p = self.params
        self._report = {
            "params": {"threshold": self.threshold, **asdict(p), "weights": list(self.weights),
                       "verify": self.verify, "hash": "word/char n-gram fmix64, (a*x+b) mod 2^32 permutations"},
            "docs_without_shingles": int((~valid).sum()), **info, "clusters": clusters}
        gone = set(removed.tolist())
        for i, doc in enumerate(docs):
            if i in gone:
                root = int(roots[i])
                stats.drop(doc, Drop("dedup:near", f"near-duplicate of {docs[root].id} (cluster {cluster_of[root]})"))
            else:
                yield doc

    def report(self) -> dict[str, Any]:
        return self._report
