"""Curation throughput: the whole pipeline in MB/s and MB/s per core, against reading alone.

Runs over the built-in corpus (Python's standard library, ~12 MB) held in memory, so disk speed
is out of the picture. Contenders, each run `--repeat` times (best kept):

  read        the documents pass through an empty pipeline: the baseline (batching, counting)
  code/web    the profile's steps (normalize, filters, PII, exact + near dedup), serial
  code/web@N  the same on a local process pool of N workers (default: all cores)
  ray@N       the code profile on Ray tasks (with --ray; Ray startup excluded)

MB is input megabytes (10^6 bytes). `MB/s` is per second of wall time; `MB/cpu-s` is per CPU
second of this process (serial rows only: the honest per-core figure on a shared, busy machine,
where wall time depends on what else runs); `x serial` is the wall-time speed-up over serial.
The web profile on source code drops most documents at the first filters, so it is cheap here;
read its number as an upper bound for prose.

    python bench/curation.py                 # read, code, web serially and on all cores
    python bench/curation.py --repeat 3 --ray
"""

from __future__ import annotations

import argparse
import time

from leantrain.corpus.executors import LocalExecutor, SerialExecutor, default_workers
from leantrain.corpus.pipeline import Pipeline, build_steps
from leantrain.corpus.readers import read_builtin


def run(docs, steps, executor) -> tuple[float, float, int]:
    pipe = Pipeline(lambda: iter(docs), steps, executor)
    t0, c0 = time.perf_counter(), time.process_time()
    kept = sum(1 for _ in pipe.run())
    return time.perf_counter() - t0, time.process_time() - c0, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also time the Ray executor")
    args = ap.parse_args()
    docs = list(read_builtin("stdlib"))
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB; {args.workers} workers; best of {args.repeat}")
    rows = []

    def time_it(label: str, profile: str, make, workers: int) -> None:
        best, best_cpu, kept = float("inf"), float("inf"), 0
        for _ in range(args.repeat):
            with make() as ex:
                if hasattr(ex, "_get_pool"):  # start the pool outside the timing
                    list(ex.map(abs, range(ex.workers * 2)))
                seconds, cpu, kept = run(docs, build_steps(profile).steps if profile != "none" else [], ex)
            best, best_cpu = min(best, seconds), min(best_cpu, cpu)
        rows.append((label, best, best_cpu, kept, workers))

    time_it("read", "none", SerialExecutor, 1)
    for profile in ("code", "web"):
        time_it(profile, profile, SerialExecutor, 1)
        if args.workers > 1:
            time_it(f"{profile}@{args.workers}", profile, lambda: LocalExecutor(args.workers), args.workers)
    if args.ray:
        import ray

        from leantrain.corpus.executors import RayExecutor

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        time_it(f"ray@{args.workers}", "code", RayExecutor, args.workers)
        ray.shutdown()
    serial = {r[0]: r[1] for r in rows}
    print(f"{'contender':<10} {'wall s':>8} {'cpu s':>7} {'kept':>6} {'MB/s':>8} {'MB/cpu-s':>9} {'x serial':>9}")
    for label, seconds, cpu, kept, workers in rows:
        ref = serial["code" if label.startswith("ray") else label.split("@")[0]]
        per_core = f"{mb / cpu:>9.1f}" if workers == 1 else f"{'-':>9}"
        print(f"{label:<10} {seconds:>8.2f} {cpu:>7.2f} {kept:>6} {mb / seconds:>8.1f} {per_core} "
              f"{ref / seconds:>9.2f}")


if __name__ == "__main__":
    main()
