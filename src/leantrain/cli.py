"""`leantrain` command line: one command per stage, each a thin shell over a library function.

User errors (LeantrainError) print one line and exit 2; they never show a traceback. Under torchrun
only rank 0 prints; another rank prints only an error of its own, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from leantrain.corpus.readers import BUILTIN_CORPORA
from leantrain.errors import CheckpointError, ConfigError, LeantrainError

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


# ---- data ------------------------------------------------------------------------------

def _curation_overrides(args: argparse.Namespace) -> list[str]:
    """The `data prepare` flags as `[curation]` overrides (after --set, so a flag wins)."""
    flags = {"profile": args.profile, "executor": args.executor, "workers": args.workers,
             "text_field": args.text_field, "language": args.language, "max_file_bytes": args.max_file_bytes,
             "dedup": False if args.no_dedup else None, "pii": False if args.no_pii else None,
             "follow_symlinks": True if args.follow_symlinks else None}
    return [*(args.set or ()), *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """`data prepare`: a thin shell over `leantrain.dataprep.prepare` (curation, then tokens, then the card)."""
    from leantrain.corpus.card import summary_lines
    from leantrain.corpus.pipeline import load_curation
    from leantrain.dataprep import prepare

    if args.workers is not None and args.workers < 1:
        raise LeantrainError(f"--workers {args.workers} is not allowed; expected an integer >= 1")
    curation = load_curation(args.curation_config, _curation_overrides(args))
    # a \n typed in a shell arrives as backslash + n
    template = args.chat_template.replace("\\n", "\n") if args.chat_template else None

    def first_interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = prepare(args.paths, args.out, builtin=args.builtin, format=args.format, curation=curation,
                             eval_paths=args.decontaminate or (), include=args.include or (),
                             exclude=args.exclude or (), vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                             val_fraction=args.val_fraction, overwrite=args.overwrite,
                             prompt_field=args.prompt_field, response_field=args.response_field,
                             chat_template=template, progress=progress, hf_dataset=args.hf_dataset,
                             hf_split=args.hf_split)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: the partial output was removed and {args.out} was not changed; run the "
                          "same command again to prepare the dataset", highlight=False, markup=False, soft_wrap=True)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    for w in result.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}")
    meta, card, split = result.meta, result.card, result.meta["splits"]
    what = "chat dataset" if args.format == "chat" else "token dataset"
    unit = "examples" if args.format == "chat" else "docs"
    trained = f", {split['train']['target_tokens']:,} trained on" if "target_tokens" in split["train"] else ""
    console.print(f"{what} written to [bold]{escape(str(args.out))}[/bold] in {time.perf_counter() - t0:.1f} s: "
                  f"vocab {meta['vocab_size']}, train {split['train']['tokens']:,} tokens "
                  f"({split['train']['documents']:,} {unit}{trained}), val {split['val']['tokens']:,} tokens "
                  f"({split['val']['documents']:,} {unit})")
    if meta.get("special_tokens"):  # a Hugging Face tokenizer folder: say what came with it and what train needs
        named = ", ".join(f"{k.removesuffix('_token')} {v}" for k, v in meta["special_tokens"].items())
        console.print(f"tokenizer {args.tokenizer} ({named}); train with --model.vocab_size={meta['vocab_size']} "
                      "or more", highlight=False, markup=False)
    console.print(result.read_stats.summary(), highlight=False, markup=False)
    console.print(f"curation ({result.executor}), data card in {Path(args.out) / 'data_card.md'}:",
                  highlight=False, markup=False)
    for line in summary_lines(card):
        console.print(line, highlight=False, markup=False)
    for note in card["notes"]:
        console.print(f"  note: {note}", highlight=False, markup=False)
    return 0


# ---- train -----------------------------------------------------------------------------

def _is_override(arg: str) -> bool:
    return arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]


def _overrides(extra: list[str]) -> list[str]:
    for a in extra:
        if not _is_override(a):
            raise LeantrainError(f"unknown argument {a!r}; config overrides look like --train.steps=100")
    return extra


def _backup_name(run_dir: Path) -> Path:
    """`DIR.bak-<time>`, never the name of an earlier backup (moving onto one would nest the run in it)."""
    stem = f"{run_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
    backup, n = run_dir.with_name(stem), 1
    while backup.exists():
        backup, n = run_dir.with_name(f"{stem}-{n}"), n + 1
    return backup


def _load_train_config(path: str | None, recipe: str | None, overrides: list[str]):
    """`leantrain.load_config` (with train.init_from, the [model] section comes from the HF folder)."""
    from leantrain import api

    return api.load_config(path, recipe=recipe, overrides=overrides)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from leantrain.config import load_config
    from leantrain.device import pick_device
    from leantrain.parallel import distributed
    from leantrain.train.rundir import check_restartable, is_run_dir

    overrides = _overrides(extra)
    if args.carbon_aware:
        overrides = [*overrides, "--energy.carbon_aware=true"]
    if args.init_from:
        overrides = [*overrides, f"--train.init_from={json.dumps(args.init_from)}"]
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise LeantrainError(f"--resume {run_dir}: not a run directory (no config.toml); "
                                 "pass the folder that `leantrain train` printed")
        if args.config or args.recipe:
            cfg = _load_train_config(args.config, args.recipe, overrides)
        else:
            cfg = load_config(run_dir / "config.toml", None, overrides)
        layout = distributed.setup(cfg, pick_device(cfg.train.device))
    else:
        existing = Path(args.run_dir) / "config.toml" if args.run_dir else None
        if (args.config is None and args.recipe is None and existing is not None and existing.is_file()
                and is_run_dir(args.run_dir)):  # a project's own config.toml is not a run's
            cfg = load_config(existing, None, overrides)  # an existing run goes on with its own config
        else:
            if args.config is None and args.recipe is None:
                args.recipe = "tiny"
            cfg = _load_train_config(args.config, args.recipe, overrides)
        name = args.recipe or Path(args.config or "run").stem
        layout = distributed.setup(cfg, pick_device(cfg.train.device))
        # one run directory for all ranks: rank 0's clock names it
        run_dir = Path(layout.from_rank0(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if layout.is_rank0 and run_dir.is_dir() and any(run_dir.iterdir()) and args.restart:
            check_restartable(run_dir)  # only a leantrain run, and none that a live process trains into
            backup = _backup_name(run_dir)
            shutil.move(run_dir, backup)
            console.print(f"--restart: moved the previous contents of {run_dir} to {backup}")
        layout.barrier()  # the others wait for the move before they look at the run directory
    try:
        code = _train_and_report(cfg, run_dir, layout, force=args.force)
    except BaseException as e:
        message = distributed.collective_timeout_message(e, layout.rank, cfg.parallel.timeout_s)
        if message is not None:  # one line, not a C++ traceback; no teardown, which would wait on the stuck peer
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
            return 3
        distributed.cleanup()
        raise
    distributed.cleanup(together=True)
    return code


def _train_and_report(cfg, run_dir: Path, layout, force: bool = False) -> int:
    """Train (`leantrain.train`, which also writes report.html) and, on rank 0 (the only process without
    torchrun), tell the user how it went."""
    from leantrain import api
    from leantrain.display import TrainDisplay

    rank0 = layout.is_rank0
    observers = [TrainDisplay(cfg.log.progress, console)] if rank0 else []
    result = api.train(cfg, run_dir, observers=observers, resume=True, layout=layout, force=force)
    if not rank0:
        return 0
    for w in result.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}", highlight=False, soft_wrap=True)
    summary = {**result.metrics, "sample": result.sample}
    if summary["stopped"]:
        console.print(f"stopped by {summary['stopped']} at step {summary['step']}; checkpoint saved. "
                      f"Continue with: leantrain train --resume {run_dir}")
        return 0
    val = f"{summary['val_loss']:.4f}" if summary["val_loss"] is not None else "n/a"
    console.print(f"[bold green]done[/bold green]: {summary['step']} steps, {summary['tokens']:,} tokens, "
                  f"val loss {val}, {summary['tokens_per_s'] or 0:,.0f} tok/s, MFU {(summary['mfu'] or 0) * 100:.1f}%")
    if "energy_j" in summary:
        est = " (estimate)" if summary["energy_source"] == "estimate" else ""
        saved = f", {summary['co2_saved_g']:.3g} g saved by carbon-aware pauses" if "co2_saved_g" in summary else ""
        console.print(f"energy{est}: {summary['energy_kwh'] * 1000:.3g} Wh, {summary['co2_g']:.3g} g CO2e{saved}, "
                      f"${summary['cost_usd']:.3g} (source: {summary['energy_source']}; counted: "
                      f"{summary.get('energy_counted', summary['energy_source'])})")
    report = run_dir / "report.html"
    console.print(f"run directory: [bold]{run_dir}[/bold]" + (f" · report: {report}" if report.is_file() else ""))
    if summary["sample"]:
        console.rule("sample")
        console.print(summary["sample"], markup=False, highlight=False)
        console.rule()
    return 0


# ---- lr-find ---------------------------------------------------------------------------

def cmd_lr_find(args: argparse.Namespace, extra: list[str]) -> int:
    from leantrain.config import load_config
    from leantrain.train.lr_find import lr_find

    if args.config is None and args.recipe is None:
        args.recipe = "tiny"
    cfg = load_config(args.config, args.recipe, _overrides(extra))
    out = Path(args.out or f"runs/lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(f"lr range test: {cfg.optim.name}, lr {args.min_lr:g} -> {args.max_lr:g} over {args.steps} steps")
    r = lr_find(cfg, out, args.min_lr, args.max_lr, args.steps)
    console.print(f"stopped: {r['stopped']} after {r['steps_run']} steps")
    if r["suggested"] is None:
        console.print("no suggestion: too few finite losses; lower --min-lr")
    else:
        steep = f"{r['steepest']:.3g}" if r["steepest"] else "n/a"
        console.print(f"[bold]suggested lr: {r['suggested']:.3g}[/bold] (steepest descent {steep}, "
                      f"min-loss lr / 10 {r['min_loss_div10']:.3g})")
    console.print(f"wrote {out / 'lr_find.json'}" + (f" and {r['plot']}" if r["plot"] else
                                                    " (no plot: install matplotlib for lr_find.png)"))
    return 0


# ---- export ----------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from leantrain import api

    info = api.export(args.run_dir, args.out, format=args.format, checkpoint=args.checkpoint,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite, dtype=args.dtype)
    for w in info["warnings"]:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    console.print(f"exported step {info['step']} of {args.run_dir} ({info['arch']}, {info['params']:,} parameters, "
                  f"{info['dtype']}) "
                  f"to [bold]{info['out_dir']}[/bold]: {', '.join(info['files'])}")
    if args.format == "peft":
        console.print(f"load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                      f"{info['base']!r}), {info['out_dir']!r})", markup=False, highlight=False)
        return 0
    console.print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({info['out_dir']!r})",
                  markup=False, highlight=False)
    return 0


# ---- plan / report ---------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from leantrain.config import load_config
    from leantrain.plan.catalog import get_hardware, is_this_cpu, local_hardware
    from leantrain.plan.planner import describe, plan

    if args.config is None and args.recipe is None:
        args.recipe = "tiny"
    cfg = load_config(args.config, args.recipe, _overrides(extra))
    tdp = cfg.energy.tdp_w if hasattr(cfg, "energy") else 0.0
    if args.hardware and not is_this_cpu(args.hardware):
        hw = get_hardware(args.hardware, tdp)
    else:  # this machine, decided as the trainer decides it (leantrain.device)
        hw, _ = local_hardware(cfg, args.gpus, device="cpu" if args.hardware else None)
    result = plan(cfg, hw, args.gpus)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        for line in describe(result):
            console.print(line, markup=False, highlight=False)
    return 0 if result.recommended is not None else 1


def cmd_report(args: argparse.Namespace) -> int:
    from leantrain.report import write_report
    from leantrain.report.html import skipped_lines

    path = write_report(args.run_dir, args.out)
    for w in skipped_lines(args.run_dir):
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}", highlight=False, soft_wrap=True)
    console.print(f"report written to [bold]{path}[/bold]")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from leantrain import api

    result = api.compare(args.run_dirs, args.out)
    for w in result.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}", highlight=False, soft_wrap=True)
    for line in result.lines():
        console.print(line, markup=False, highlight=False)
    console.print(f"page written to [bold]{escape(str(result.page))}[/bold]")
    return 0


# ---- generate --------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from leantrain import api
    from leantrain.model.generate import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before a model is loaded
    loaded = api.load_model(args.run_dir, checkpoint=args.checkpoint)
    for w in loaded.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    text = api.generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, chat=args.chat)
    print(text if args.chat else args.prompt + text)  # --chat prints only the answer
    return 0


# ---- checkpoint ------------------------------------------------------------------------

def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    from leantrain.train.checkpoint import consolidate

    out = consolidate(args.checkpoint_dir, args.out)
    console.print(f"consolidated {args.checkpoint_dir} into [bold]{out}[/bold] (model.safetensors, "
                  "optim.safetensors): use it with --checkpoint in generate and export")
    return 0


# ---- config ----------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    from leantrain.config import describe, load_config, recipe_names, reference_markdown, to_toml

    if args.reference and args.markdown:
        print(reference_markdown(), end="")
        return 0
    if args.reference:
        for key, default, allowed, help_ in describe():
            print(f"{key:28} = {default!r:<12} {allowed:28} {help_}")
        return 0
    if args.recipes:
        print("\n".join(recipe_names()))
        return 0
    print(to_toml(load_config(args.config, args.recipe, _overrides(extra))), end="")
    return 0


# ---- entry -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (as every other user error), not usage plus a line."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping for prose paragraphs, but indented lines (the examples) stay as typed."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join("\n".join(indent + line for line in para.splitlines()) if "\n " in para
                           else super(_HelpFormatter, self)._fill_text(para, width, indent)
                           for para in text.split("\n\n"))


# `--help` of every command ends with these (tests/test_docs.py checks that each command has one).
_EXAMPLES = {
    "": """\
  leantrain data prepare --builtin stdlib --out data/stdlib
  leantrain train --recipe tiny --run-dir runs/tiny
  leantrain generate runs/tiny --prompt "def "
  leantrain COMMAND --help                       # options and examples of one command""",
    "data": """\
  leantrain data prepare --builtin stdlib --profile code --out data/stdlib""",
    "data prepare": """\
  leantrain data prepare --builtin stdlib --profile code --out data/stdlib
  leantrain data prepare corpus/ --include '*.jsonl.zst' --profile web --decontaminate evals/ --out data/web
  leantrain data prepare my_docs/ --tokenizer HF_DIR/tokenizer.json --out data/mine
  leantrain data prepare --hf-dataset saved_ds/ --hf-split train --text-field content --tokenizer HF_DIR --out data/hf
  leantrain data prepare --format chat pairs.jsonl --tokenizer HF_DIR/tokenizer.json --out data/chat""",
    "train": """\
  leantrain train --recipe tiny --run-dir runs/tiny
  leantrain train config.toml --train.steps=1000 --precision.dtype=fp32
  leantrain train --resume runs/tiny                   # continue from the newest good checkpoint
  leantrain train --init-from HF_DIR --data.path=data/chat --finetune.lora_rank=8 --optim.lr=1e-3
  torchrun --standalone --nproc-per-node 8 -m leantrain.cli train config.toml --run-dir runs/big""",
    "export": """\
  leantrain export runs/tiny --format hf --out hf/my-model
  leantrain export runs/tiny --out hf/my-model --overwrite --max-shard-size 2GB --dtype fp32
  leantrain export runs/lora --format peft --out adapters/my-lora      # PeftModel.from_pretrained loads it""",
    "lr-find": """\
  leantrain lr-find --recipe tiny --steps 100
  leantrain lr-find config.toml --optim.name=muon --min-lr 1e-4 --max-lr 1""",
    "generate": """\
  leantrain generate runs/tiny --prompt "def " --max-new-tokens 80
  leantrain generate runs/chat --chat --prompt "Write a haiku about GPUs" --temperature 0""",
    "checkpoint": """\
  leantrain checkpoint consolidate runs/big/checkpoints/step-0001000 --out full-step-1000""",
    "checkpoint consolidate": """\
  leantrain checkpoint consolidate runs/big/checkpoints/step-0001000 --out full-step-1000""",
    "plan": """\
  leantrain plan --recipe small
  leantrain plan config.toml --hardware h100 --gpus 8 --energy.region=US-VA
  leantrain plan --recipe tiny --json""",
    "report": """\
  leantrain report runs/tiny                       # writes runs/tiny/report.html
  leantrain report runs/tiny --out tiny-report.html""",
    "compare": """\
  leantrain compare runs/tiny runs/tiny-muon       # a table here, loss curves in ./compare.html
  leantrain compare runs/a runs/b runs/c --out ab-c.html""",
    "config": """\
  leantrain config --recipe tiny                   # the resolved config as TOML
  leantrain config config.toml --train.steps=50
  leantrain config --recipes
  leantrain config --reference""",
}


def commands(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of the parser and every command below it: "", "data", "data prepare", ..."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += commands(child, f"{path} {name}".strip())
    return found


def _add_examples(parser: argparse.ArgumentParser) -> None:
    """Give every command's --help its examples (a command without any shows none; the test catches it)."""
    for path, command in commands(parser):
        command.formatter_class = _HelpFormatter
        if path in _EXAMPLES:
            command.epilog = "examples:\n" + _EXAMPLES[path]


def build_parser() -> argparse.ArgumentParser:
    from leantrain import __version__

    p = _Parser(prog="leantrain", description="Train transformer language models efficiently.")
    p.add_argument("--version", action="version", version=f"leantrain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="prepare token datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    prep = data_sub.add_parser("prepare", help="tokenize documents into a token dataset",
                               description="Read documents, train (or reuse) a byte-level BPE tokenizer and "
                               "write train/val token shards with meta.json and tokenizer.json.")
    prep.add_argument("paths", nargs="*", help="text files, .jsonl files or folders")
    prep.add_argument("--builtin", choices=BUILTIN_CORPORA, help="use a built-in corpus instead of files")
    prep.add_argument("--out", required=True, help="dataset folder to write")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    prep.add_argument("--tokenizer", metavar="PATH",
                      help="reuse a tokenizer instead of training one: a tokenizer.json, a token dataset folder, or a "
                      "local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json: its special "
                      "tokens go with it)")
    prep.add_argument("--hf-dataset", metavar="PATH",
                      help="read a local Hugging Face datasets folder (save_to_disk) or .parquet/.arrow/.json/.jsonl "
                      "file through `datasets`, streamed; never the Hub (needs the hf extra)")
    prep.add_argument("--hf-split", default="train", help="split of --hf-dataset to read (default train)")
    prep.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (0.02)")
    prep.add_argument("--text-field", default=None,
                      help="field of .jsonl/parquet records or --hf-dataset rows holding the text (default text)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    prep.add_argument("--profile", choices=("none", "code", "web"), default=None,
                      help="curation: none (default: exact and near dedup only), code (source-code filters, PII "
                      "scrub, dedup) or web (Gopher/C4/FineWeb filters, PII scrub, dedup); a data card either way")
    prep.add_argument("--executor", choices=("local", "ray", "serial"), default=None,
                      help="where curation steps run: local process pool (default), ray, or serial")
    prep.add_argument("--workers", type=int, default=None, help="curation workers (default: all cores)")
    prep.add_argument("--include", action="append", metavar="GLOB",
                      help="only files matching this glob inside input folders (repeatable), e.g. '*.py'")
    prep.add_argument("--exclude", action="append", metavar="GLOB", help="leave out matching files (repeatable)")
    prep.add_argument("--no-dedup", action="store_true", help="skip exact and near dedup")
    prep.add_argument("--no-pii", action="store_true", help="skip PII scrubbing")
    prep.add_argument("--decontaminate", action="append", metavar="EVAL_PATH",
                      help="drop documents sharing a 13-gram with these eval files/folders (repeatable)")
    prep.add_argument("--language", help="keep only this language (needs fasttext and a lid.176.bin model; "
                      "skipped with a note otherwise)")
    prep.add_argument("--curation-config", metavar="TOML",
                      help="curation settings: a config file's [curation] section (with [curation.STEP] tables), "
                      "or a file of top-level settings and [STEP] tables")
    prep.add_argument("--follow-symlinks", action="store_true",
                      help="follow symlinks that lead out of an input folder (default: skip and count them)")
    prep.add_argument("--max-file-bytes", type=int, default=None,
                      help="skip (and count) text files larger than this many bytes (default 1 GiB)")
    prep.add_argument("--set", action="append", metavar="STEP.FIELD=VALUE",
                      help="override one curation setting, e.g. gopher_quality.min_words=20 (repeatable)")
    prep.add_argument("--format", choices=("text", "chat"), default="text",
                      help="text: documents; chat: prompt/response .jsonl records, loss on the response only")
    prep.add_argument("--prompt-field", default="prompt", help="chat: field of the prompt (default prompt)")
    prep.add_argument("--response-field", default="response", help="chat: field of the answer (default response)")
    prep.add_argument("--chat-template", default=None,
                      help="chat: template with {prompt} and {response} (default: <|user|>\\n{prompt}\\n"
                      "<|assistant|>\\n{response}<|endoftext|>)")

    train = sub.add_parser("train", help="train a model",
                           description="Train from a TOML config and/or a recipe. Any config field can be "
                           "overridden as --section.field=value (see `leantrain config --reference`). "
                           "Pointing --run-dir at an existing run resumes it.")
    train.add_argument("config", nargs="?", help="TOML config file")
    train.add_argument("--recipe", help="named recipe shipped with leantrain (default: tiny)")
    train.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    train.add_argument("--restart", action="store_true",
                       help="start over in --run-dir, moving its old contents aside instead of resuming")
    train.add_argument("--carbon-aware", action="store_true",
                       help="pause while the grid is dirtier than energy.deadline allows (sets energy.carbon_aware; "
                       "needs energy.intensity_csv and energy.deadline)")
    train.add_argument("--init-from", metavar="HF_DIR",
                       help="start from a local Hugging Face Llama, Mistral, Qwen2, Qwen3, Phi-3 or GPT-2 folder (sets "
                       "train.init_from and "
                       "the [model] section from its config.json)")
    train.add_argument("--force", action="store_true",
                       help="start even when the planner estimates that the model does not fit in the memory "
                       "available")

    exp = sub.add_parser("export", help="write a trained run as a Hugging Face model folder",
                         description="Write the newest good checkpoint of a run as a folder that "
                         "transformers' AutoModelForCausalLM and AutoTokenizer load with no custom code.")
    exp.add_argument("run_dir", help="run directory written by `leantrain train`")
    exp.add_argument("--format", choices=["hf", "peft"], default="hf",
                     help="hf: safetensors + config, LoRA adapters merged; peft: a LoRA run's adapters as a PEFT "
                     "adapter folder (adapter_config.json + adapter_model.safetensors)")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")
    exp.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size (5GB)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an earlier export in --out (only a folder `leantrain export` wrote)")
    exp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                     help="dtype of the saved weights (default: bf16 when the run trained in bf16, else fp32)")

    lrf = sub.add_parser("lr-find", help="sweep the learning rate over a short run and suggest one",
                         description="Raise the lr exponentially each step (Smith 2017), stop on divergence, "
                         "write lr_find.json and lr_find.png, print the suggested lr. Config overrides as "
                         "for train (--optim.name=muon).")
    lrf.add_argument("config", nargs="?", help="TOML config file")
    lrf.add_argument("--recipe", help="named recipe (default: tiny)")
    lrf.add_argument("--min-lr", type=float, default=1e-5, help="first lr of the sweep (1e-5)")
    lrf.add_argument("--max-lr", type=float, default=1.0, help="last lr of the sweep (1.0)")
    lrf.add_argument("--steps", type=int, default=100, help="steps of the sweep (100)")
    lrf.add_argument("--out", help="output folder (default runs/lr-find-<time>)")

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("run_dir", help="run directory written by `leantrain train`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the run's chat template (chat data) and print only the answer")

    ckpt = sub.add_parser("checkpoint", help="work on checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND")
    cons = ckpt_sub.add_parser("consolidate", help="turn a sharded checkpoint into one full checkpoint folder",
                               description="Read a checkpoint written with checkpoint.format = sharded and write "
                               "it as a full checkpoint folder (model.safetensors, optim.safetensors), in one process.")
    cons.add_argument("checkpoint_dir", help="a sharded checkpoint folder, e.g. RUN/checkpoints/step-0001000")
    cons.add_argument("--out", required=True, help="the folder to write (must not exist)")

    pl = sub.add_parser("plan", help="estimate memory, time, energy, CO2e and cost of a config; find a layout",
                        description="Estimate peak memory per device, time, energy, CO2e and cost of training a "
                        "config on a hardware kind, for every layout (DDP, FSDP2, TP, activation checkpointing), "
                        "and recommend the fastest that fits. Overrides as for train (--section.field=value).")
    pl.add_argument("config", nargs="?", help="TOML config file")
    pl.add_argument("--recipe", help="named recipe (default: tiny when no config is given)")
    pl.add_argument("--hardware", help="h200, b200, h100, h100-pcie, mi300x, a100-80gb, a100-40gb, l40s, l4, a10, "
                    "rtx5090, rtx4090, rtx3090 or cpu (default: this machine)")
    pl.add_argument("--gpus", type=int, default=1, help="devices (processes) to plan for (default 1)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    rep = sub.add_parser("report", help="write report.html for a run directory",
                         description="Write RUN_DIR/report.html: curves, throughput, memory, energy, predicted vs "
                         "measured, events and config, as one offline page (inline SVG, no scripts).")
    rep.add_argument("run_dir", help="run directory written by `leantrain train`")
    rep.add_argument("--out", help="write the page here instead of RUN_DIR/report.html")

    cmp_ = sub.add_parser("compare", help="compare two or more runs: a table and their loss curves on one page",
                          description="Print final and best val loss, tokens, wall time, tokens/s, MFU, energy, "
                          "CO2e, cost and the config keys that differ for each run, and write an offline page "
                          "overlaying their loss curves.")
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    cmp_.add_argument("--out", default="compare.html",
                      help="the page to write (default ./compare.html; a file leantrain did not write is never "
                      "replaced)")

    cfg = sub.add_parser("config", help="show the resolved config or the config reference")
    cfg.add_argument("config", nargs="?", help="TOML config file")
    cfg.add_argument("--recipe")
    cfg.add_argument("--reference", action="store_true", help="list every field with default and allowed values")
    cfg.add_argument("--markdown", action="store_true", help="with --reference: the page docs/configuration.md")
    cfg.add_argument("--recipes", action="store_true", help="list the shipped recipes")
    _add_examples(p)
    return p


class Terminated(BaseException):
    """SIGTERM outside a training step (start-up, export, data prepare): raised like KeyboardInterrupt, so
    every `finally` and temporary-folder cleanup on the way out runs before the process exits."""


def _sigterm_raises() -> Any:
    """Make SIGTERM raise Terminated in this process (the trainer installs its own handler for its steps);
    returns the previous handler. A forked worker that inherited it dies of SIGTERM as it would have."""
    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # overrides bypass argparse: it takes `--train.sample_prompt=a b` (a space inside) for a positional
    args, extra = parser.parse_known_args([a for a in argv if not _is_override(a)])
    extra = [a for a in argv if _is_override(a)] + extra
    previous = _sigterm_raises()
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "config":
            return cmd_config(args, extra)
        if args.command == "lr-find":
            return cmd_lr_find(args, extra)
        if args.command == "plan":
            return cmd_plan(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "data" and args.data_command == "prepare":
            return cmd_data_prepare(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "checkpoint" and args.checkpoint_command == "consolidate":
            return cmd_checkpoint_consolidate(args)
        parser.print_help() if args.command is None else parser.parse_args([args.command, "--help"])
        return 0 if args.command is None else 2
    except LeantrainError as e:
        rank = int(os.environ.get("RANK", "0"))  # set by torchrun
        if rank == 0:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        elif not isinstance(e, ConfigError | CheckpointError):  # those every rank raises alike
            err_console.print(f"[bold red]error (rank {rank}):[/bold red] {escape(str(e))}", highlight=False,
                              soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Terminated:
        what = ("the run directory holds only whole files and checkpoints" if args.command == "train"
                else "nothing was left half-written")
        err_console.print(f"stopped by SIGTERM before {args.command} finished; {what}: run the same command again "
                          "to continue", highlight=False, soft_wrap=True)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
