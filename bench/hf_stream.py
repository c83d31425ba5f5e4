"""Memory of reading a Hugging Face `datasets` input: leantrain's streaming reader against loading the column.

For each size in `--mb`, writes a `save_to_disk` folder and a parquet file of that many MB of real
text (the standard library's sources, repeated with a row number so no two rows are equal), then
reads every row's text in a fresh process per contender and prints the anonymous resident memory
(RssAnon: what the process holds, not the file pages of a memory map) it added while reading, peak
sampled every 2 ms less the value before; and the time. Imports and library caches cost the same
at every size, so the figure that matters is how the memory grows with the data: the last column
is (added at one size - added at the one before) / (difference in MB), per pair of sizes.

  column       the baseline: `load_from_disk(...)["text"]`, the whole column as Python strings
  stream-disk  `leantrain.corpus.hf.read_hf_dataset` on the save_to_disk folder (memory-mapped batches)
  stream-pq    the same on the parquet file (`load_dataset(..., streaming=True)`), written in row groups
               of 256 rows: Parquet is read a row group at a time, so that, not the file, bounds the memory

    python bench/hf_stream.py --mb 10,60,150     (Linux: reads /proc/self/status)
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROW_GROUP = 256  # rows per parquet row group (~4 MB of this text); datasets' default is one group per 1000s of rows
CHILD = r"""
import json, sys, threading, time
kind, path = sys.argv[1], sys.argv[2]
import datasets
from leantrain.corpus.hf import read_hf_dataset
def rss():  # anonymous resident memory: what the process holds, not the file pages of a memory map
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
before, peak, done = rss(), [0], threading.Event()
def sample():  # the resident set every 2 ms while the rows are read (ru_maxrss would count the imports' peak)
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
n = chars = 0
if kind == "column":
    col = list(datasets.load_from_disk(path)["text"])  # the column as a list (datasets 5's Column is lazy)
    n, chars = len(col), sum(map(len, col))
else:
    for d in read_hf_dataset(path, "text"):
        n += 1
        chars += len(d.text)
seconds = time.perf_counter() - t0
peak[0] = max(peak[0], rss())
done.set()
print(json.dumps({"rows": n, "chars": chars, "added_mb": (peak[0] - before) / 2**20, "s": seconds}))
"""


def make(folder: Path, mb: int) -> tuple[Path, Path, int]:
    import datasets

    from leantrain.corpus.readers import read_builtin

    texts = [d.text for d in read_builtin("stdlib")]
    rows, size = [], 0
    for i, t in enumerate(itertools.cycle(texts)):
        rows.append(f"# row {i}\n{t}")
        size += len(rows[-1].encode())
        if size >= mb * 1_000_000:
            break
    ds = datasets.Dataset.from_dict({"text": rows})
    del rows
    ds.save_to_disk(str(folder / "saved"))
    ds.to_parquet(str(folder / "docs.parquet"), batch_size=ROW_GROUP)  # Parquet is read a row group at a time
    return folder / "saved", folder / "docs.parquet", size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="10,60,150", help="comma-separated sizes in MB of text (default 10,60,150)")
    args = ap.parse_args()
    import datasets

    datasets.disable_progress_bars()
    sizes = sorted(int(s) for s in args.mb.split(","))
    added: dict[str, list[float]] = {}
    print(f"{'contender':<12} {'MB':>5} {'rows':>9} {'RssAnon added MB':>17} {'seconds':>8}")
    for mb in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            saved, parquet, size = make(Path(tmp), mb)
            chars = None
            for name, kind, path in (("column", "column", saved), ("stream-disk", "stream", saved),
                                     ("stream-pq", "stream", parquet)):
                out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True,
                                     check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                chars = r["chars"] if chars is None else chars
                assert r["chars"] == chars, f"{name} read other text"
                added.setdefault(name, []).append(r["added_mb"])
                print(f"{name:<12} {size / 1e6:>5.0f} {r['rows']:>9,} {r['added_mb']:>17.1f} {r['s']:>8.1f}")
    for lo, hi in itertools.pairwise(range(len(sizes))):
        span = sizes[hi] - sizes[lo]
        base = (added["column"][hi] - added["column"][lo]) / span
        print(f"\nmemory growth per MB of data, {sizes[lo]} -> {sizes[hi]} MB (and as a ratio of the column's):")
        for name, a in added.items():
            growth = (a[hi] - a[lo]) / span
            print(f"  {name:<12} {growth:>7.3f} MB/MB   {growth / base:>7.3f}x column")

if __name__ == "__main__":
    main()
