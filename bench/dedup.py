"""Near dedup speed and quality on real documents: leantrain's NearDedup against datasketch MinHash + MinHashLSH.

The corpus is real, varied text from this machine, read in a fixed order (sorted file lists, seeded shuffle) until
--mb is reached, a quarter from each kind: Python source (the interpreter's stdlib and site-packages), package
docs (.md, .rst, .txt and METADATA files in site-packages), man pages and /usr/share/doc (changelogs, copyright
files, READMEs; gzip is opened). Files of 500 bytes to 256 KB that decode as UTF-8 without NUL bytes count. Then
near duplicates are planted: for a sample of the documents an exact copy, a near copy (0.1-2% of its words
replaced, deleted or doubled) or a hard negative (5-12% edited, so its Jaccard falls below the threshold), each
placed later in the stream. `--synthetic` uses Zipf-distributed generated words instead of the files.

Truth is exact, not estimated: every pair of documents whose word 5-gram Jaccard is >= the threshold, found by
an exact set-similarity join (prefix filtering over shingles ordered rarest first, every candidate pair's
Jaccard computed), clustered by connected components; every document but the first of its cluster is a true
duplicate. Real text holds duplicates of its own (vendored copies of a file, licence texts, one man page under
two names), so truth counts them too.

Both methods get the same threshold, num_perm and word 5-gram shingles, and their pairs go through the same
union-find that keeps the earliest document. datasketch runs in one process (it has no parallel mode) with its
own bands x rows; leantrain runs with 1 worker (in process) and with a pool of 2 (`--workers`), with its
default bands x rows (chosen for recall, since it verifies candidates) and with datasketch's (same bands).

    .venv/bin/python bench/dedup.py                 # 20 MB of real documents, under a minute on 2 cores
    .venv/bin/python bench/dedup.py --mb 100 --synthetic
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import random
import re
import string
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from _data import cpu_name, report_ratio  # bench/ is on sys.path when a bench runs as a script
from leantrain.corpus.dedup import NearDedup, optimal_bands_rows, shingle_hashes
from leantrain.corpus.executors import LocalExecutor, SerialExecutor
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import StepStats

MIN_BYTES, MAX_BYTES = 500, 256 << 10
DOC_SUFFIXES = (".md", ".rst", ".txt")


def _site_packages() -> list[Path]:
    return sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})


def _files(root: Path, keep) -> list[Path]:
    """Regular files under `root` that `keep(path)` accepts, sorted; symlinks are neither followed nor listed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not path.is_symlink() and keep(path):
                out.append(path)
    return out


def _sources() -> dict[str, list[Path]]:
    """The four kinds of real text, each a sorted list of candidate files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = _site_packages()
    python = _files(stdlib, lambda p: p.suffix == ".py" and "site-packages" not in p.parts)
    docs: list[Path] = []
    for root in site:
        python += _files(root, lambda p: p.suffix == ".py")
        docs += _files(root, lambda p: p.suffix in DOC_SUFFIXES or p.name == "METADATA")
    man = _files(Path("/usr/share/man"), lambda p: True) if Path("/usr/share/man").is_dir() else []
    share_doc = _files(Path("/usr/share/doc"), lambda p: p.suffix in ("", ".gz", ".txt", ".md", ".rst")) \
        if Path("/usr/share/doc").is_dir() else []
    return {"python": python, "package docs": docs, "man pages": man, "/usr/share/doc": share_doc}


def _read(path: Path) -> str | None:
    """The file's text, or None when it is too small, too large, binary or not UTF-8."""
    try:
        if path.stat().st_size > MAX_BYTES * 8:
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not MIN_BYTES <= len(data) <= MAX_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def real_texts(mb: float, seed: int) -> tuple[list[str], dict[str, int]]:
    """Real documents, about a quarter of the bytes from each kind, read in a seeded order; and files per kind."""
    rng = random.Random(seed)
    sources = {k: v for k, v in _sources().items() if v}
    if not sources:
        sys.exit("no text files found under the stdlib, site-packages, /usr/share/man or /usr/share/doc; "
                 "use --synthetic")
    share = mb * 1e6 / len(sources)
    texts, counts = [], {}
    per_kind: list[list[str]] = []
    for kind, files in sources.items():
        files = files[:]
        rng.shuffle(files)
        got, size = [], 0
        for path in files:
            if size >= share:
                break
            text = _read(path)
            if text is not None:
                got.append(text)
                size += len(text.encode())
        per_kind.append(got)
        counts[kind] = len(got)
    for group in per_kind:  # interleave the kinds: a stream of mixed documents, not four blocks
        texts += group
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], counts


def synthetic_texts(mb: float, seed: int) -> tuple[list[str], dict[str, int]]:
    """The old corpus: documents of Zipf-distributed random words."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(30000)]
    cum = np.cumsum(1.0 / np.arange(1, len(vocab) + 1)).tolist()
    texts, size = [], 0
    while size < mb * 1e6:
        texts.append(" ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(80, 1500))))
        size += len(texts[-1])
    return texts, {"synthetic": len(texts)}


_SPLIT = re.compile(r"(\s+)")


def _edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """Replace, delete or double-with-a-new-word about `rate` of the words; whitespace and layout are kept."""
    parts = _SPLIT.split(text)  # words at even positions, the whitespace after each at odd ones
    out = []
    for k in range(0, len(parts), 2):
        word, space = parts[k], parts[k + 1] if k + 1 < len(parts) else ""
        if not word or rng.random() >= rate:
            out += (word, space)
            continue
        op = rng.randrange(3)
        if op == 0:
            out += (rng.choice(vocab), space)
        elif op == 2:
            out += (word, " ", rng.choice(vocab), space)
        else:
            out.append(space)
    return "".join(out)


def plant(texts: list[str], seed: int) -> tuple[list[Document], dict[str, int]]:
    """The documents with planted copies: 10% get an exact copy, 25% a near copy, 10% a hard negative, each put
    0.5-200 documents after its source."""
    rng = random.Random(seed + 1)
    vocab = sorted({w for t in texts[:200] for w in t.split() if w.isalpha()}) or ["word"]
    items: list[tuple[float, str]] = []
    counts = {"documents": len(texts), "exact": 0, "near": 0, "hard_negative": 0}
    for src, text in enumerate(texts):
        items.append((float(src), text))
        r = rng.random()
        if r < 0.10:
            kind, copy = "exact", text
        elif r < 0.35:
            kind, copy = "near", _edit(text, rng.uniform(0.001, 0.02), vocab, rng)
        elif r < 0.45:
            kind, copy = "hard_negative", _edit(text, rng.uniform(0.05, 0.12), vocab, rng)
        else:
            continue
        counts[kind] += 1
        items.append((src + rng.uniform(0.5, 200.0), copy))
    items.sort(key=lambda item: item[0])
    return [Document(id=f"d{p:07d}", text=text, source="bench") for p, (_, text) in enumerate(items)], counts


def _first_of_component(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root of each node = the smallest index of its connected component."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _removed(n: int, pairs: np.ndarray) -> set[int]:
    roots = _first_of_component(n, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    return set(np.flatnonzero(roots != np.arange(n)).tolist())


def exact_truth(docs: list[Document], threshold: float) -> tuple[set[int], int]:
    """Documents to remove by exact Jaccard, and the number of pairs at or above the threshold.

    An exact set-similarity join (AllPairs-style prefix filtering): with each shingle set ordered rarest first,
    two sets with Jaccard >= t share a shingle among the first |x| - ceil(t |x|) + 1 of each, so only documents
    sharing a prefix shingle are compared, and each such pair's Jaccard is computed exactly."""
    sets = [np.unique(shingle_hashes(d.text, "word", 5)) for d in docs]
    sizes = np.array([s.size for s in sets], dtype=np.int64)
    doc_of = np.repeat(np.arange(len(docs)), sizes)
    _, token, freq = np.unique(np.concatenate(sets), return_inverse=True, return_counts=True)
    order = np.lexsort((token, freq[token], doc_of))  # by document, then rarest first
    token, doc_of = token[order], doc_of[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.arange(token.size) - np.repeat(starts, sizes)
    prefix = sizes - np.ceil(threshold * sizes - 1e-9).astype(np.int64) + 1
    keep = rank < np.repeat(prefix, sizes)
    token, doc_of = token[keep], doc_of[keep]
    by_token = np.lexsort((doc_of, token))
    token, doc_of = token[by_token], doc_of[by_token]
    new_group = np.concatenate(([True], token[1:] != token[:-1]))
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(token.size), 0))
    before = np.arange(token.size) - group_start  # members of the same token listed before this one
    right = np.repeat(doc_of, before)
    left_pos = np.repeat(group_start, before) + (np.arange(before.sum()) - np.repeat(np.cumsum(before) - before,
                                                                                       before))
    left = doc_of[left_pos]
    n = np.int64(len(docs))
    keys = np.unique(np.minimum(left, right) * n + np.maximum(left, right))
    a, b = keys // n, keys % n
    fits = (np.minimum(sizes[a], sizes[b]) >= threshold * np.maximum(sizes[a], sizes[b]) - 1e-9) & (a != b)
    pairs = []
    for i, j in zip(a[fits].tolist(), b[fits].tolist(), strict=True):
        x, y = sets[i], sets[j]
        inter = np.intersect1d(x, y, assume_unique=True).size
        if inter >= threshold * (x.size + y.size - inter) - 1e-9:
            pairs.append((i, j))
    return _removed(len(docs), np.array(pairs, dtype=np.int64)), len(pairs)


_WORD = re.compile("[0-9a-z_\u0080-\U0010ffff]+")


def datasketch_dedup(docs: list[Document], threshold: float, num_perm: int, bands_rows: tuple[int, int]) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands_rows)
    pairs = []
    for i, doc in enumerate(docs):
        ws = _WORD.findall(doc.text.lower())
        n = min(5, len(ws))
        shingles = [" ".join(ws[k:k + n]).encode() for k in range(len(ws) - n + 1)] if ws else []
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(shingles)
        pairs.extend((j, i) for j in lsh.query(m))
        lsh.insert(i, m)
    return _removed(len(docs), np.array(pairs, dtype=np.int64))


def leantrain_dedup(docs: list[Document], step: NearDedup, executor) -> set[int]:
    kept = {d.id for d in step.run(docs, StepStats(step.name), executor)}
    return {i for i, d in enumerate(docs) if d.id not in kept}


def score(removed: set[int], truth: set[int]) -> tuple[float, float]:
    hit = len(removed & truth)
    return hit / max(1, len(removed)), hit / max(1, len(truth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of text, planted copies included")
    ap.add_argument("--synthetic", action="store_true", help="generated Zipf-word documents instead of real files")
    ap.add_argument("--workers", type=int, default=2, help="processes of the pooled leantrain run")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-datasketch", action="store_true")
    args = ap.parse_args()

    t = time.perf_counter()
    texts, kinds = (synthetic_texts if args.synthetic else real_texts)(args.mb / 1.45, args.seed)  # planting adds ~45%
    docs, planted = plant(texts, args.seed)
    t_read = time.perf_counter() - t
    truth, true_pairs = exact_truth(docs, args.threshold)
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    digest = hashlib.blake2b("\0".join(d.text for d in docs).encode(), digest_size=6).hexdigest()
    print(f"corpus: {len(docs)} docs, {mb:.1f} MB (digest {digest}), from {kinds}; planted {planted}; "
          f"{true_pairs} pairs at Jaccard >= {args.threshold} -> {len(truth)} true duplicates "
          f"(read {t_read:.1f}s, exact truth {time.perf_counter() - t - t_read:.1f}s)", file=sys.stderr)

    ds_params = optimal_bands_rows(args.threshold, args.num_perm)  # datasketch's own choice (weights 0.5/0.5)
    step = NearDedup(threshold=args.threshold, num_perm=args.num_perm)
    p = step.params
    rows = []

    def timed(name: str, fn, repeats: int = 1) -> None:
        dt = math.inf
        for _ in range(repeats):  # leantrain's runs are under a second: the best of 3 steadies them
            t0 = time.perf_counter()
            removed = fn()
            dt = min(dt, time.perf_counter() - t0)
        rows.append((name, dt, *score(removed, truth), len(removed)))
        print(f"  {name}: {dt:.1f}s", file=sys.stderr)

    b0, r0 = ds_params
    warm = docs[:200]  # imports, numpy caches, power tables: paid before any timing, for both
    datasketch_dedup(warm, args.threshold, p.num_perm, ds_params)
    leantrain_dedup(warm, NearDedup(args.threshold, p.num_perm), SerialExecutor())
    if not args.skip_datasketch:
        timed(f"datasketch {b0}x{r0}", lambda: datasketch_dedup(docs, args.threshold, p.num_perm, ds_params))
    timed(f"leantrain {p.bands}x{p.rows} 1 worker", lambda: leantrain_dedup(docs, step, SerialExecutor()), 3)
    with LocalExecutor(args.workers) as pool:
        leantrain_dedup(warm, NearDedup(args.threshold, p.num_perm, pool_min_bytes=0), pool)  # start + warm, untimed
        timed(f"leantrain {p.bands}x{p.rows} {args.workers} workers", lambda: leantrain_dedup(docs, step, pool), 3)
    pooled = f"the {args.workers}-worker run went {step.executor_used}"
    print(f"  {pooled}", file=sys.stderr)
    same = NearDedup(args.threshold, p.num_perm, bands_rows=ds_params)
    timed(f"leantrain {b0}x{r0} 1 worker", lambda: leantrain_dedup(docs, same, SerialExecutor()), 3)

    base = rows[0][1] if not args.skip_datasketch else None
    print(f"\nnear dedup on {'synthetic' if args.synthetic else 'real'} documents, threshold {args.threshold}, "
          f"num_perm {p.num_perm}, word 5-grams; {len(docs)} docs, {mb:.1f} MB, {len(truth)} true duplicates "
          f"(exact Jaccard); {cpu_name()}, {os.cpu_count()} CPUs; bands x rows in the method name")
    print(f"{'method':30} {'wall s':>7} {'docs/s':>8} {'MB/s':>7} {'speedup':>8} {'precision':>9} {'recall':>7} "
          f"{'removed':>8}")
    for name, dt, prec, rec, nrem in rows:
        ratio = f"{base / dt:.1f}x" if base else "-"
        print(f"{name:30} {dt:7.2f} {len(docs) / dt:8.0f} {mb / dt:7.2f} {ratio:>8} {prec:9.4f} {rec:7.4f} {nrem:8d}")
        if base and not name.startswith("datasketch"):
            report_ratio(f"throughput, {name}", base / dt, "datasketch on the same corpus", docs_per_s=len(docs) / dt,
                         mb_per_s=mb / dt, precision=prec, recall=rec)
    print("speedup = datasketch wall time / this wall time (same corpus, same run; leantrain best of 3); "
          f"precision and recall against the exact-Jaccard truth; {pooled}.")


if __name__ == "__main__":
    main()
