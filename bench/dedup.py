"""Near dedup speed and quality: leantrain's NearDedup against datasketch MinHash + MinHashLSH.

Both get the same deterministic planted-duplicate corpus (synthetic Zipf word documents, exact
copies, near copies with small random word edits, and "hard negatives" edited harder so their
Jaccard is below the threshold), the same threshold, num_perm and bands x rows, and the same
word 5-gram shingles. Both cluster the LSH pairs with the same union-find and keep the earliest
document. Truth: a planted copy whose exact shingle Jaccard with its source is >= threshold is a
duplicate; everything else must be kept.

    .venv/bin/python bench/dedup.py --mb 50 --workers 2

datasketch runs in one process (it has no parallel mode); leantrain is timed with a serial
executor and with a process pool of --workers processes, with its default bands x rows (chosen
for recall, since it verifies candidates) and with datasketch's bands x rows (apples to apples).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import string
import sys
import time

import numpy as np

from leantrain.corpus.dedup import NearDedup, _union_find_roots, optimal_bands_rows, shingle_hashes
from leantrain.corpus.executors import LocalExecutor, SerialExecutor
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import StepStats


def make_corpus(mb: float, threshold: float, seed: int = 0) -> tuple[list[Document], set[int], dict[str, int]]:
    """Documents in final order, indices of true duplicates, and counts of what was planted."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(30000)]
    cum = np.cumsum(1.0 / np.arange(1, len(vocab) + 1)).tolist()  # Zipf-like word frequencies

    def words(k: int) -> list[str]:
        return rng.choices(vocab, cum_weights=cum, k=k)

    def edit(ws: list[str], rate: float) -> list[str]:
        out = []
        for w in ws:
            if rng.random() >= rate:
                out.append(w)
                continue
            op = rng.randrange(3)
            if op == 0:
                out.append(rng.choice(vocab))
            elif op == 2:
                out.extend((w, rng.choice(vocab)))
        return out

    items: list[tuple[float, str, int, str]] = []  # (position key, text, source item or -1, kind)
    target, size = mb * 1e6, 0
    base_texts: list[str] = []
    while size < target:
        base = words(rng.randint(80, 1500))
        text = " ".join(base)
        src = len(items)
        items.append((float(src), text, -1, "base"))
        base_texts.append(text)
        size += len(text)
        r = rng.random()
        if r < 0.10:
            kind, copy = "exact", text
        elif r < 0.35:
            kind, copy = "near", " ".join(edit(base, rng.uniform(0.001, 0.02)))
        elif r < 0.45:
            kind, copy = "hard_negative", " ".join(edit(base, rng.uniform(0.05, 0.12)))
        else:
            continue
        items.append((src + rng.uniform(0.5, 200.0), copy, src, kind))
        size += len(copy)
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    pos = {item: p for p, item in enumerate(order)}
    docs = [Document(id=f"d{p:07d}", text=items[i][1], source="bench") for p, i in enumerate(order)]
    truth: set[int] = set()
    counts = {"base": 0, "exact": 0, "near": 0, "hard_negative": 0, "near_below_threshold": 0}
    for i, (_, text, src, kind) in enumerate(items):
        counts[kind] += 1
        if src < 0:
            continue
        a = np.unique(shingle_hashes(items[src][1], "word", 5))
        b = np.unique(shingle_hashes(text, "word", 5))
        inter = np.intersect1d(a, b, assume_unique=True).size
        if inter / (a.size + b.size - inter) >= threshold:
            truth.add(pos[i])
        elif kind == "near":
            counts["near_below_threshold"] += 1
    return docs, truth, counts


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
    roots = _union_find_roots(len(docs), np.array(pairs, dtype=np.int64).reshape(-1, 2))
    return set(np.flatnonzero(roots != np.arange(len(docs))).tolist())


def leantrain_dedup(docs: list[Document], step: NearDedup, executor) -> set[int]:
    kept = {d.id for d in step.run(docs, StepStats(step.name), executor)}
    return {i for i, d in enumerate(docs) if d.id not in kept}


def score(removed: set[int], truth: set[int]) -> tuple[float, float]:
    hit = len(removed & truth)
    return hit / max(1, len(removed)), hit / max(1, len(truth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB of text")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--skip-datasketch", action="store_true")
    ap.add_argument("--datasketch-same-bands", action="store_true",
                    help="also run datasketch with leantrain's default bands x rows (slow)")
    args = ap.parse_args()

    t = time.perf_counter()
    docs, truth, counts = make_corpus(args.mb, args.threshold)
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} docs, {mb:.1f} MB, planted {counts}, true duplicates {len(truth)} "
          f"(built in {time.perf_counter() - t:.1f}s)", file=sys.stderr)

    ds_params = optimal_bands_rows(args.threshold, args.num_perm)  # datasketch's own choice (weights 0.5/0.5)
    step = NearDedup(threshold=args.threshold, num_perm=args.num_perm)
    p = step.params
    rows = []

    def timed(name: str, fn, in_process: bool = True) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        removed = fn()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        prec, rec = score(removed, truth)
        rows.append((name, dt, cpu if in_process else None, prec, rec, len(removed)))
        print(f"  {name}: {dt:.1f}s", file=sys.stderr)

    b0, r0 = ds_params
    warm = docs[:200]  # imports, numpy caches, power tables: paid before any timing, for both
    datasketch_dedup(warm, args.threshold, p.num_perm, ds_params)
    leantrain_dedup(warm, NearDedup(args.threshold, p.num_perm), SerialExecutor())
    if not args.skip_datasketch:
        timed(f"datasketch {b0}x{r0}", lambda: datasketch_dedup(docs, args.threshold, p.num_perm, ds_params))
    timed(f"leantrain {p.bands}x{p.rows} serial", lambda: leantrain_dedup(docs, step, SerialExecutor()))
    pool = LocalExecutor(args.workers)
    list(pool.map(abs, range(args.workers * 4)))  # start the workers outside the timing
    timed(f"leantrain {p.bands}x{p.rows} pool x{args.workers}", lambda: leantrain_dedup(docs, step, pool), False)
    pool.close()
    same = NearDedup(args.threshold, p.num_perm, bands_rows=ds_params)
    timed(f"leantrain {b0}x{r0} serial", lambda: leantrain_dedup(docs, same, SerialExecutor()))
    plain = NearDedup(args.threshold, p.num_perm, bands_rows=ds_params, verify="none")
    timed(f"leantrain {b0}x{r0} verify=none serial", lambda: leantrain_dedup(docs, plain, SerialExecutor()))
    if args.datasketch_same_bands and not args.skip_datasketch:
        timed(f"datasketch {p.bands}x{p.rows}",
              lambda: datasketch_dedup(docs, args.threshold, p.num_perm, (p.bands, p.rows)))

    base = rows[0][1] if not args.skip_datasketch else None
    print(f"\nnear dedup, threshold {args.threshold}, num_perm {p.num_perm}, word 5-grams; {len(docs)} docs, "
          f"{mb:.1f} MB, {len(truth)} true duplicates; bands x rows in the method name")
    print(f"{'method':34} {'wall s':>7} {'cpu s':>6} {'docs/s':>7} {'MB/s':>6} {'speedup':>8} {'precision':>9} "
          f"{'recall':>7} {'removed':>8}")
    for name, dt, cpu, prec, rec, nrem in rows:
        ratio = f"{base / dt:.1f}x" if base else "-"
        cpu_s = f"{cpu:6.1f}" if cpu is not None else f"{'-':>6}"
        print(f"{name:34} {dt:7.1f} {cpu_s} {len(docs) / dt:7.0f} {mb / dt:6.2f} {ratio:>8} {prec:9.4f} {rec:7.4f} "
              f"{nrem:8d}")
    print("speedup = datasketch wall time / this wall time (same corpus, same run). cpu s = this process's CPU "
          "time (pool workers not counted); on a shared machine it is the steadier measure.")


if __name__ == "__main__":
    main()
