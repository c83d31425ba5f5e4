"""Every bench at small settings, one table of their headline figures, so a regression shows at a glance.

Each bench runs as its own subprocess with the quick arguments below (figures at these sizes are noisier than
the full runs on each bench's docs page: this table is for spotting a change, not for quoting). A bench's
headline figures are the rows it records with `_data.report_ratio` (bench/all.py points
$LEANTRAIN_BENCH_REPORT at a file for it), else the lines of its printed table matched by its patterns here.
A bench whose optional packages are missing is listed as skipped, one that fails or times out as failed,
with the reason; the run goes on either way. Writes bench/results/all.json, bench/results/all.md and each
bench's output in bench/results/logs/. `--lock FILE` takes an exclusive flock on FILE around each child
(machines whose cores are shared by several people's benches), so the timings and the timeout exclude the
wait.

    python bench/all.py                                   # everything (~20 min on a 2-core CPU)
    python bench/all.py --only plan_vs_published,generate # a subset
    python bench/all.py --lock /tmp/cpu.lock              # hold this file's flock around each child
    python bench/all.py --from-logs                       # re-read the last run's logs (after editing a pattern)
    make bench                                            # the same as the first line (BENCH_ARGS=... for more)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _data import REPORT_ENV, cpu_name  # bench/ is on sys.path when a bench runs as a script

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?"  # 12, 1,234, 0.95, +1.2, 3e-4


@dataclass
class Pattern:
    """A printed line holding a headline figure: `value` (and optionally `label`) are named groups."""

    regex: str
    name: str  # the figure's name; "{label}" is replaced by the group of that name
    unit: str
    baseline: str  # what the ratio is against (measured in the same run)
    better: str = "higher"


@dataclass
class Bench:
    args: list[str]
    patterns: list[Pattern] = field(default_factory=list)
    needs: tuple[str, ...] = ()  # importable modules; missing ones skip the bench
    cuda: bool = False


def _p(regex: str, name: str, unit: str, baseline: str, better: str = "higher") -> Pattern:
    return Pattern(regex.replace("NUM", NUM), name, unit, baseline, better)


# quick arguments: each bench in well under two minutes here; patterns follow each bench's final print lines
BENCHES: dict[str, Bench] = {
    "plan_vs_published": Bench([]),  # pure computation; reports through report_ratio
    "throughput": Bench(["--recipe", "tiny", "--steps", "4", "--warmup", "2",  # compile's ~1 min left out
                         "--only", "leantrain,plain-fp32,plain-bf16,hf-fp32,hf-bf16"], [
        _p(r"^\s+vs (?P<label>\S+)\s+(?P<value>NUM)x", "tokens/s vs {label}", "x", "{label}, same model and data")],
        needs=("transformers",)),
    "arch_overhead": Bench(["--steps", "3", "--batch", "4"], [
        _p(r"^(?P<label>\w+)\s+fwd\+bwd median:.*after/before (?P<value>NUM)", "step time, {label} attention",
           "x", "the committed transformer.py (git HEAD)", "lower")]),
    "time_to_target": Bench(["--steps", "30", "--seeds", "1", "--warmup", "3", "--eval-every", "5",
                             "--eval-steps", "2", "--sweep-adamw", "3e-3,6e-3"], [
        _p(r"^(?P<label>\S+)\s+\d+/\d+\s+\S+\s+\S+\s+\S+\s+(?:\S+\s+)?(?P<value>NUM)\s+NUM(?:\s|$)",
           "time to target, {label}", "x", "AdamW + cosine (lr swept) to its own final val loss", "lower")]),
    "large_batch": Bench(["--steps", "12"], [
        _p(r"^(?P<label>\S+ \d+)\s+\d+\s+NUM\s+NUM\s+(?P<value>NUM)\s", "val loss, {label}", "nats",
           "the small-batch AdamW run (first row)", "lower")]),
    "scaling": Bench(["--steps", "6", "--warmup", "2"], [
        _p(r"^\s*(?P<label>\S.*?): +NUM tok/s\s+ratio (?P<value>NUM)", "tokens/s, {label}", "x",
           "one process (the first row)")]),
    "moe": Bench(["--steps", "8", "--seq", "64", "--batch", "4"], [
        _p(r"^(?P<label>\S+)\s+NUM\s+NUM\s+\d+\s+(?P<value>NUM)\s", "step time, {label}", "x",
           "the dense model of equal active parameters", "lower")]),
    "checkpoint_overhead": Bench(["--every", "5", "--saves", "1", "--rounds", "1", "--warmup", "2", "--after", "2"], [
        _p(r"noise floor: sync (?P<value>NUM)%", "step-time overhead, sync save every 5 steps", "%",
           "no checkpointing (noise floor subtracted)", "lower"),
        _p(r"noise floor: sync NUM%, async (?P<value>NUM)%", "step-time overhead, async save every 5 steps", "%",
           "no checkpointing (noise floor subtracted)", "lower")]),
    # reports through report_ratio: save / load GB/s vs a dd-style write / read of its bytes, full and sharded
    "checkpoint_io": Bench(["--repeats", "1", "--dim", "256", "--layers", "4"]),
    "energy_overhead": Bench(["--steps", "6", "--warmup", "2", "--rounds", "1"], [
        _p(r"= ratio (?P<value>NUM)", "step time, energy meter on / off", "x", "the meter off", "lower")]),
    "energy_vs_codecarbon": Bench(["--steps", "15"], [
        _p(r"ratio leantrain / codecarbon: energy (?P<value>NUM)", "energy, leantrain / CodeCarbon", "x",
           "CodeCarbon on the same run (goal 0.90-1.10)")], needs=("codecarbon",)),
    "generate": Bench(["--tokens", "48", "--repeats", "1"], [
        _p(r"\((?P<value>NUM)x faster\)", "decode speed, KV cache", "x", "decoding without the cache")]),
    "constrained": Bench(["--samples", "3", "--tokens", "16"], [
        _p(r"^(?P<label>\w+)\s+NUM\s+\d+%\s+\d+%\s+\d+\s+\d+\s+(?P<value>NUM)$", "tokens/s, {label} constrained",
           "x", "unconstrained sampling")]),
    "serve": Bench(["--requests", "4", "--tokens", "16", "--prompt-tokens", "8", "--levels", "1,4"], [
        _p(r"throughput at (?P<label>\d+) clients / 1 client \(fixed\): (?P<value>NUM)x",
           "throughput, {label} clients", "x", "one client")], needs=("fastapi", "uvicorn")),
    "export": Bench(["--steps", "10", "--repeats", "1", "--tokens", "16", "--val-batches", "1"], [
        _p(r"int8 vs fp32 ONNX: file (?P<value>NUM)x", "ONNX file size, int8", "x", "fp32 ONNX", "lower"),
        _p(r"int8 vs fp32 ONNX: file NUMx, tokens/s b1 (?P<value>NUM)x", "ONNX decode tokens/s b1, int8", "x",
           "fp32 ONNX")], needs=("onnxruntime", "gguf")),
    "compress": Bench(["--quick", "--steps", "30", "--rounds", "1", "--new-tokens", "16", "--seq", "64"], [
        _p(r"^(?P<label>\S.*?)\s+NUM\s+(?P<value>NUM)\s+[\d,]+\s+\d+\s+NUM\s+\d+\s+NUM\s+NUM\s+[-+]NUM$",
           "file size reduction, {label}", "x", "the fp32 base model")], needs=("torchao",)),
    "prune_distill": Bench(["--steps", "30", "--ft-steps", "5", "--student-steps", "20", "--rounds", "1",
                            "--seq", "64", "--batch", "4"], [
        _p(r"distilled - plain student val loss: (?P<value>NUM)", "val loss, distilled student", "nats",
           "the same student trained without a teacher", "lower")]),
    "dedup": Bench([], [  # 20 MB of real documents: below 8 MiB NearDedup skips the pool
        _p(r"^(?P<label>leantrain.*?)\s+NUM\s+\d+\s+NUM\s+(?P<value>NUM)x\s", "throughput, {label}", "x",
           "datasketch on the same corpus")], needs=("datasketch",)),
    "prepare": Bench(["--mb", "6"]),  # reports through report_ratio: MB/s vs tokenizers' encode_batch alone
    "curation": Bench(["--repeat", "1"], [
        _p(r"^(?P<label>\S+@\d+)\s.*\s(?P<value>NUM)$", "curation MB/s, {label}", "x", "one serial worker")]),
    "filter_parity": Bench(["--per-source", "40", "--examples", "0"], [
        _p(r"^(?P<label>\S.*?)\s+\d+\s+(?P<value>NUM)%\s", "agreement, {label}", "%", "datatrove's filter")],
        needs=("datatrove",)),
    "hf_stream": Bench(["--mb", "2,6"], [
        _p(r"^\s+(?P<label>\S+)\s+NUM MB/MB\s+(?P<value>NUM)x column", "memory growth per MB, {label}", "x",
           "holding the column in memory", "lower")], needs=("datasets", "pyarrow")),
    "guard": Bench(["--no-grid"], [
        _p(r"^(?P<label>old|default)\s+NUM\s+\d+\s+\d+\s+\S+\s+\S+\s+\d+\s+(?P<value>NUM)\s",
           "false skips per 1000 steps, {label} guard", "per 1000", "clean recorded runs", "lower")]),
    "tune": Bench(["--trials", "3", "--steps", "8", "--energy-trials", "2"], [
        _p(r"pruning saved (?P<value>\d+)% of the token-steps", "token-steps saved by pruning", "%",
           "the same study without pruning")], needs=("optuna",)),
    "federated": Bench(["--clients", "2", "--rounds", "2", "--local-steps", "2",
                        "--only", "centralised,fedavg iid,fedprox dir0.1"], [
        _p(r"^\| (?P<label>[^|]+?) \| NUM \| (?P<value>[-+]NUM) \|", "val loss, {label}", "nats",
           "centralised training on the same tokens", "lower")], needs=("flwr",)),
    "plan_accuracy": Bench(["--steps", "4", "--cases", "micro-fp32,tiny-bf16"], [
        _p(r"worst memory error (?P<value>\d+)%", "planner worst memory error", "%", "measured peak RSS", "lower"),
        _p(r"worst time error (?P<value>\d+)%", "planner worst step-time error", "%", "measured step time",
           "lower")]),
    "mlm": Bench(["--steps", "20", "--seq", "64", "--batch", "4", "--eval-batches", "2"], [
        _p(r"^\| (?P<label>[^|]+?) \| [\d,]+ \| (?P<value>NUM)x \| [\d.]", "tokens/s, {label}", "x",
           "causal training of the same model")]),
    "objectives": Bench(["--steps", "20", "--docs", "60", "--lines", "10", "--val-batches", "2", "--tokens", "8"], [
        _p(r"next-token loss FIM / plain: (?P<value>NUM)", "next-token val loss, FIM / plain", "x",
           "the same model trained without FIM", "lower")]),
    "generate_vs_hf": Bench(["--tokens", "16", "--prompt-tokens", "8", "--repeats", "1"], needs=("transformers",)),
    "synth": Bench(["--steps", "20", "--count", "32", "--json-count", "8", "--real-docs", "20"], [
        _p(r"^(?P<label>\S.*?)\s+\d+\s+\d+\s+NUM\s+(?P<value>NUM)$", "val loss on real text, {label}", "x",
           "training on the real slice alone", "lower")]),
    "gpu_check": Bench([], cuda=True),
}


def missing_modules(bench: Bench) -> list[str]:
    return [m for m in bench.needs if importlib.util.find_spec(m) is None]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_figures(bench: Bench, stdout: str) -> list[dict]:
    """The headline rows a bench printed, by its patterns (one row per matching line and pattern)."""
    rows = []
    for pat in bench.patterns:
        for m in re.finditer(pat.regex, stdout, flags=re.MULTILINE):
            groups = m.groupdict()
            label = (groups.get("label") or "").strip()
            rows.append({"name": pat.name.replace("{label}", label), "value": float(groups["value"].replace(",", "")),
                         "unit": pat.unit, "baseline": pat.baseline.replace("{label}", label), "better": pat.better,
                         "figures": {}})
    return rows


@contextlib.contextmanager
def held(lock_file: str | None):
    """An exclusive flock on `lock_file` (nothing when None) for the duration of one child."""
    if not lock_file:
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_bench(name: str, bench: Bench, lock_file: str | None, timeout: float, logs: Path) -> dict:
    """Run one bench in its own process; never raises for the bench's own failures."""
    entry: dict = {"bench": name, "args": bench.args, "status": "ok", "reason": "", "seconds": 0.0, "rows": []}
    missing = missing_modules(bench)
    if missing:
        reason = f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        return {**entry, "status": "skipped", "reason": reason}
    if bench.cuda and not cuda_available():
        return {**entry, "status": "skipped", "reason": "needs a CUDA GPU"}
    script = Path(__file__).resolve().parent / f"{name}.py"
    if not script.is_file():
        return {**entry, "status": "skipped", "reason": f"no {script.name}"}
    args = list(bench.args)
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, REPORT_ENV: str(report)}
        cmd = [sys.executable, str(script), *args]
        with held(lock_file):
            t0 = time.perf_counter()
            # its own session, so a timeout ends the servers and ranks it started too
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                    start_new_session=True)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                entry.update(status="failed", reason=f"timed out after {timeout:.0f} s")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        reported = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    (logs / f"{name}.log").write_text(stdout + ("\n--- stderr ---\n" + stderr if stderr else ""))
    if reported:
        (logs / f"{name}.reported.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reported))
    if entry["status"] == "failed":
        return entry
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["(no output)"])[-1]
        return {**entry, "status": "failed", "reason": f"exit {proc.returncode}: {last[:300]}"}
    return with_figures(entry, bench, stdout, reported)


def with_figures(entry: dict, bench: Bench, stdout: str, reported: list[dict]) -> dict:
    """The entry with its headline rows: those the bench reported, else those its patterns find."""
    entry = {**entry, "status": "ok", "reason": ""}
    entry["rows"] = reported or parse_figures(bench, stdout)
    if not entry["rows"]:
        entry["status"] = "no figure"
        entry["reason"] = "ran, but printed no line its patterns in bench/all.py match (did its output change?)"
    return entry


def _fmt(v: float) -> str:
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 or a == 0 else f"{v:.2g}"


def _unit(unit: str) -> str:
    return unit if unit in ("x", "%", "") else f" {unit}"


def markdown(result: dict) -> str:
    busy = sum(b["seconds"] for b in result["benches"])
    lines = [f"Benches at small settings on {result['cpu']} ({result.get('cores', '?')} cores), {result['date']} "
             f"(`{result['command']}`; the benches ran {busy / 60:.1f} min, {result['total_s'] / 60:.1f} min wall).",
             "",
             "| bench | figure | value | against (same run) | better | s |", "| --- | --- | ---: | --- | --- | ---: |"]
    for b in result["benches"]:
        if b["status"] != "ok":
            lines.append(f"| {b['bench']} | {b['status']}: {b['reason']} | | | | {b['seconds']:.0f} |")
            continue
        for r in b["rows"]:
            value = _fmt(r["value"]) + _unit(r["unit"])
            lines.append(f"| {b['bench']} | {r['name']} | {value} | {r['baseline']} | {r['better']} | "
                         f"{b['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated benches (default: all): " + ",".join(BENCHES))
    ap.add_argument("--skip", default="", help="comma-separated benches to leave out")
    ap.add_argument("--lock", help="a lock file to flock exclusively around each child (shared machines)")
    ap.add_argument("--merge", action="store_true",
                    help="update these benches' rows in the existing JSON instead of writing a new one (with --only)")
    ap.add_argument("--from-logs", action="store_true",
                    help="re-read the figures from the last run's logs and all.json instead of running")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per bench before it counts as failed (600)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "all.json"),
                    help="JSON output; the markdown table goes next to it (.md)")
    args = ap.parse_args()
    # benches nobody registered above still get a row (skipped), so a new one is not silently left out
    scripts = sorted(p.stem for p in Path(__file__).resolve().parent.glob("*.py") if not p.stem.startswith("_"))
    unregistered = [n for n in scripts if n not in BENCHES and n != "all"]
    names = args.only.split(",") if args.only else [*BENCHES, *unregistered]
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHES and n not in unregistered]
    if unknown:
        ap.error(f"unknown bench {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    names = [n for n in names if n not in set(args.skip.split(","))]
    out = Path(args.out)
    logs = out.parent / "logs"
    if args.from_logs:
        return reparse(out, logs)
    logs.mkdir(parents=True, exist_ok=True)
    base = None  # the earlier run that --merge updates
    if args.merge:
        base = json.loads(out.read_text()) if out.is_file() else {"benches": [], "total_s": 0.0}
    import torch

    t0 = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
              "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "command": "python bench/all.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
              "benches": []}
    for name in names:
        print(f"{name} ...", end=" ", flush=True)
        if name in BENCHES:
            entry = run_bench(name, BENCHES[name], args.lock, args.timeout, logs)
        else:
            entry = {"bench": name, "args": [], "status": "skipped", "seconds": 0.0, "rows": [],
                     "reason": "not registered in bench/all.py (add its quick arguments and patterns to BENCHES)"}
        result["benches"].append(entry)
        shown = "; ".join(f"{r['name']} {_fmt(r['value'])}{_unit(r['unit'])}" for r in entry["rows"][:4])
        print(f"{entry['status']} ({entry['seconds']:.0f} s) {shown or entry['reason']}", flush=True)
        save(result, out, base, time.perf_counter() - t0)  # after each bench: an interrupted run keeps its rows
    merged = save(result, out, base, time.perf_counter() - t0)
    print()
    print(markdown(merged))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if any(b["status"] == "failed" for b in merged["benches"]) else 0


def save(result: dict, out: Path, old: dict | None, seconds: float) -> dict:
    """Write the JSON and the table; over the rows of an earlier run `old` when merging (same bench: replaced)."""
    result = {**result, "total_s": round(seconds, 1)}
    if old is not None:
        new = {b["bench"]: b for b in result["benches"]}
        benches = [new.pop(b["bench"], b) for b in old["benches"]] + list(new.values())
        result = {**result, "benches": benches, "total_s": round(old["total_s"] + seconds, 1),
                  "command": "; ".join(c for c in (old.get("command"), result["command"]) if c)}
    write(result, out)
    return result


def write(result: dict, out: Path) -> None:
    from leantrain.files import write_json_durable, write_text_durable

    write_json_durable(out, result)
    write_text_durable(out.with_suffix(".md"), markdown(result))


def reparse(out: Path, logs: Path) -> int:
    """Rebuild the table from the saved logs (after a pattern changed), keeping each bench's status otherwise."""
    if not out.is_file():
        sys.exit(f"{out} does not exist: run bench/all.py first")
    result = json.loads(out.read_text())
    for i, entry in enumerate(result["benches"]):
        log = logs / f"{entry['bench']}.log"
        if entry["status"] in ("ok", "no figure") and log.is_file() and entry["bench"] in BENCHES:
            rep = logs / f"{entry['bench']}.reported.jsonl"
            reported = [json.loads(x) for x in rep.read_text().splitlines()] if rep.is_file() else []
            stdout = log.read_text().split("\n--- stderr ---\n")[0]
            result["benches"][i] = with_figures(entry, BENCHES[entry["bench"]], stdout, reported)
    write(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
