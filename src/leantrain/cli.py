"""`leantrain` command line: one command per stage, each a thin shell over a library function.

User errors (LeantrainError) print one line and exit 2; they never show a traceback. Under torchrun
only rank 0 prints; another rank prints only an error of its own, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from leantrain.corpus.readers import BUILTIN_CORPORA
from leantrain.errors import CheckpointError, ConfigError, LeantrainError

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


# ---- data ------------------------------------------------------------------------------

def cmd_data_prepare(args: argparse.Namespace) -> int:
    from leantrain.corpus.readers import ReadStats, read_builtin, read_paths
    from leantrain.tokens.prepare import prepare_dataset

    if bool(args.builtin) == bool(args.paths):
        raise LeantrainError("give input files/folders or --builtin stdlib (one of the two)")
    stats = ReadStats()
    if args.builtin:
        def documents():
            stats.reset()  # prepare reads twice (tokenizer, then encoding); count one pass
            return read_builtin(args.builtin, stats=stats)
        sources = {"builtin": args.builtin}
    else:
        def documents():
            stats.reset()
            return read_paths(args.paths, text_field=args.text_field, stats=stats)
        sources = {"paths": [str(Path(p).resolve()) for p in args.paths]}

    t0 = time.perf_counter()
    with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        meta = prepare_dataset(documents, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                               val_fraction=args.val_fraction, overwrite=args.overwrite,
                               provenance=sources, progress=progress)
    split = meta["splits"]
    console.print(f"token dataset written to [bold]{args.out}[/bold] in {time.perf_counter() - t0:.1f} s: "
                  f"vocab {meta['vocab_size']}, train {split['train']['tokens']:,} tokens "
                  f"({split['train']['documents']:,} docs), val {split['val']['tokens']:,} tokens "
                  f"({split['val']['documents']:,} docs)")
    console.print(stats.summary())
    return 0


# ---- train -----------------------------------------------------------------------------

def _overrides(extra: list[str]) -> list[str]:
    for a in extra:
        if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a):
            raise LeantrainError(f"unknown argument {a!r}; config overrides look like --train.steps=100")
    return extra


def _backup_name(run_dir: Path) -> Path:
    """`DIR.bak-<time>`, never the name of an earlier backup (moving onto one would nest the run in it)."""
    stem = f"{run_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
    backup, n = run_dir.with_name(stem), 1
    while backup.exists():
        backup, n = run_dir.with_name(f"{stem}-{n}"), n + 1
    return backup


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from leantrain.config import load_config
    from leantrain.parallel import distributed
    from leantrain.plan.hardware import pick_device

    overrides = _overrides(extra)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise LeantrainError(f"--resume {run_dir}: not a run directory (no config.toml); "
                                 "pass the folder that `leantrain train` printed")
        if args.config or args.recipe:
            cfg = load_config(args.config, args.recipe, overrides)
        else:
            cfg = load_config(run_dir / "config.toml", None, overrides)
        layout = distributed.setup(cfg, pick_device(cfg.train.device))
    else:
        existing = Path(args.run_dir) / "config.toml" if args.run_dir else None
        if args.config is None and args.recipe is None and existing is not None and existing.is_file():
            cfg = load_config(existing, None, overrides)  # an existing run goes on with its own config
        else:
            if args.config is None and args.recipe is None:
                args.recipe = "tiny"
            cfg = load_config(args.config, args.recipe, overrides)
        name = args.recipe or Path(args.config or "run").stem
        layout = distributed.setup(cfg, pick_device(cfg.train.device))
        # one run directory for all ranks: rank 0's clock names it
        run_dir = Path(layout.from_rank0(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if layout.is_rank0 and run_dir.exists() and any(run_dir.iterdir()) and args.restart:
            backup = _backup_name(run_dir)
            shutil.move(run_dir, backup)
            console.print(f"--restart: moved the previous contents of {run_dir} to {backup}")
        layout.barrier()  # the others wait for the move before they look at the run directory
    try:
        code = _train_and_report(cfg, run_dir, layout.is_rank0)
    except BaseException:
        distributed.cleanup()
        raise
    distributed.cleanup(together=True)
    return code


def _train_and_report(cfg, run_dir: Path, rank0: bool) -> int:
    """Train and, on rank 0 (the only process without torchrun), tell the user how it went."""
    from leantrain.display import TrainDisplay
    from leantrain.train.trainer import Trainer

    observers = [TrainDisplay(cfg.log.progress, console)] if rank0 else []
    try:
        summary = Trainer(cfg, run_dir, observers=observers, resume=True).fit()
    except OSError as e:  # disk full, permissions: on the run's other files (checkpoint saves say so already)
        raise LeantrainError(f"{e.strerror or e}: {e.filename or run_dir}; check free space and permissions of "
                             f"the run directory {run_dir}, then run the same command again to resume") from None
    if not rank0:
        return 0
    if summary["stopped"]:
        console.print(f"stopped by {summary['stopped']} at step {summary['step']}; checkpoint saved. "
                      f"Continue with: leantrain train --resume {run_dir}")
        return 0
    val = f"{summary['val_loss']:.4f}" if summary["val_loss"] is not None else "n/a"
    console.print(f"[bold green]done[/bold green]: {summary['step']} steps, {summary['tokens']:,} tokens, "
                  f"val loss {val}, {summary['tokens_per_s'] or 0:,.0f} tok/s, MFU {(summary['mfu'] or 0) * 100:.1f}%")
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    if summary["sample"]:
        console.rule("sample")
        console.print(summary["sample"], markup=False, highlight=False)
        console.rule()
    return 0


# ---- generate --------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from leantrain.model import generate
    from leantrain.train.runs import load_trained

    model, tok, cfg, step, warnings = load_trained(args.run_dir, args.checkpoint)
    for w in warnings:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise LeantrainError("the prompt is empty; pass some text with --prompt")
    new = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed)
    print(args.prompt + tok.decode(new))
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

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leantrain", description="Train transformer language models efficiently.")
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
    prep.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    prep.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (0.02)")
    prep.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")

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

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("run_dir", help="run directory written by `leantrain train`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")

    cfg = sub.add_parser("config", help="show the resolved config or the config reference")
    cfg.add_argument("config", nargs="?", help="TOML config file")
    cfg.add_argument("--recipe")
    cfg.add_argument("--reference", action="store_true", help="list every field with default and allowed values")
    cfg.add_argument("--markdown", action="store_true", help="with --reference: as the README's table")
    cfg.add_argument("--recipes", action="store_true", help="list the shipped recipes")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "config":
            return cmd_config(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "data" and args.data_command == "prepare":
            return cmd_data_prepare(args)
        if args.command == "generate":
            return cmd_generate(args)
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


if __name__ == "__main__":
    sys.exit(main())
