"""`leantrain data prepare` end to end (read -> curate -> train tokenizer -> encode -> shards) in MB/s, against
HF `tokenizers`' batch encoding alone on the same text: the limit for the tokenizing part.

The input is real text available offline: the Python standard library's .py files (tests included,
site-packages left out), taken in sorted path order until --mb megabytes, copied into a temporary folder
that prepare reads like any user folder. Contenders, in one run:

  prepare@N     `leantrain.dataprep.prepare(folder, out, curation=CurationConfig(workers=N))`, the function
                `leantrain data prepare FOLDER --workers N --out OUT` calls (default profile: exact + near
                dedup, vocab 8192), timed in this process (the CLI adds only its start-up); per-stage times
                from its progress callback. --workers sets curation's processes; tokenizer training and
                encoding use every core (the Rust thread pool) whatever N is.
  encode stage  the encode + shard-writing stage inside prepare@N: the documents' bytes / its time
  tokenizers    `Tokenizer.encode_batch` (and `encode_batch_fast`, which leaves out offsets) of the tokenizer
                prepare@N trained, on every document read (dedup drops a few of them in prepare), all in
                one call, all threads: no Python between documents, nothing written

MB is 10^6 bytes of UTF-8 input. Ratios: each against the faster of the two tokenizers calls.

    python bench/prepare.py                   # 24 MB, workers 1 and 2 (about 1.5 min on 2 cores)
    python bench/prepare.py --mb 8 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import cpu_name, report_ratio  # noqa: E402


def copy_corpus(mb: float, dest: Path) -> tuple[int, float]:
    """The stdlib's .py files in sorted path order until `mb` MB, copied under `dest`; (files, MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not p.is_symlink()
                   and not skip.intersection(p.relative_to(root).parts))
    n, size = 0, 0
    for p in files:
        if size >= mb * 1e6:
            break
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        n, size = n + 1, size + p.stat().st_size
    return n, size / 1e6


def timed_prepare(folder: Path, out: Path, workers: int) -> dict:
    """One prepare of `folder` with `workers` curation processes: wall time, per-stage times, the result."""
    from leantrain.config import CurationConfig
    from leantrain.dataprep import prepare

    last: dict[str, float] = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        last[stage] = time.perf_counter()

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = prepare([folder], out, curation=CurationConfig(workers=workers), progress=progress)
    end = time.perf_counter()
    # each stage ends at its last progress call: curation, then tokenizer training, then encoding
    marks = [t0, last["curate"], last["tokenizer"], last["encode"], end]
    stages = dict(zip(("read + curate", "train tokenizer", "encode + shards", "meta + card"),
                      (b - a for a, b in zip(marks, marks[1:], strict=False)), strict=True))
    splits = result.meta["splits"]
    return {"seconds": end - t0, "stages": stages, "encoded_mb": sum(s["bytes"] for s in splits.values()) / 1e6,
            "tokens": sum(s["tokens"] for s in splits.values()), "documents": sum(s["documents"]
                                                                                   for s in splits.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=24.0, help="MB of stdlib sources to prepare (default 24)")
    ap.add_argument("--workers", default="1,2", help="comma-separated curation worker counts (default 1,2)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from tokenizers import Tokenizer

    from leantrain.corpus.readers import read_paths

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        folder, out = Path(tmp) / "corpus", Path(tmp) / "dataset"
        n_files, mb = copy_corpus(args.mb, folder)
        print(f"input: {n_files} .py files of the Python {sys.version.split()[0]} standard library, {mb:.1f} MB; "
              f"CPU {cpu_name()}, {os.cpu_count()} cores", flush=True)
        # warm-up, untimed: imports (matplotlib for the card's plot included) and first-call costs
        timed_prepare(folder / "asyncio", Path(tmp) / "warm", 1)
        runs = {}
        for w in workers:
            runs[w] = timed_prepare(folder, out, w)
            print(f"  prepare@{w}: {runs[w]['seconds']:.1f} s", file=sys.stderr, flush=True)

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))  # the last run's; every run trains the same one
        tok.encode_special_tokens = True  # as prepare encodes: a literal <|endoftext|> in a document is text
        texts = [d.text for d in read_paths([folder]) if d.text]
        text_mb = sum(len(t.encode("utf-8", errors="replace")) for t in texts) / 1e6
        limits = {}
        for name in ("encode_batch", "encode_batch_fast"):
            t0 = time.perf_counter()
            getattr(tok, name)(texts, add_special_tokens=False)
            limits[name] = text_mb / (time.perf_counter() - t0)
            print(f"  tokenizers {name}: {text_mb / limits[name]:.1f} s", file=sys.stderr, flush=True)
    limit = max(limits.values())

    last = runs[workers[-1]]
    print(f"\nprepare end to end vs HF tokenizers batch encoding alone; {mb:.1f} MB in, {last['documents']:,} "
          f"documents and {last['tokens']:,} tokens out (vocab 8192)")
    print(f"{'contender':<34} {'wall s':>7} {'MB/s':>7} {'vs limit':>9}")
    for w, r in runs.items():
        rate, enc = mb / r["seconds"], r["encoded_mb"] / r["stages"]["encode + shards"]
        print(f"{f'prepare@{w} end to end':<34} {r['seconds']:>7.1f} {rate:>7.2f} {rate / limit:>8.2f}x")
        print(f"{f'prepare@{w} encode + shards stage':<34} {r['stages']['encode + shards']:>7.1f} {enc:>7.2f} "
              f"{enc / limit:>8.2f}x")
        against = "tokenizers' batch encoding alone (the faster of encode_batch/_fast), same text and tokenizer"
        report_ratio(f"prepare@{w} end to end MB/s vs tokenizers batch encoding", rate / limit, against,
                     mb_per_s=rate, limit_mb_per_s=limit)
        report_ratio(f"prepare@{w} encode stage MB/s vs tokenizers batch encoding", enc / limit, against,
                     mb_per_s=enc, limit_mb_per_s=limit)
    for name, rate in limits.items():
        print(f"{f'tokenizers {name}':<34} {text_mb / rate:>7.1f} {rate:>7.2f} {rate / limit:>8.2f}x")
    print("\nstages (s):  " + "  ".join(f"{s:>15}" for s in last["stages"]))
    for w, r in runs.items():
        print(f"prepare@{w}:   " + "  ".join(f"{v:>15.2f}" for v in r["stages"].values()))
    print(f"vs limit = MB/s / the faster tokenizers call's MB/s ({limit:.2f}); the encode stage includes reading "
          "the curated spill, converting ids and writing the shards")


if __name__ == "__main__":
    main()
