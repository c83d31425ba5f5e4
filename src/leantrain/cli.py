"""`leantrain` command line: one command per stage, each a thin shell over a library function.

User errors (LeantrainError) print one line and exit 2; they never show a traceback. Under torchrun
only rank 0 prints; another rank prints only an error of its own, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from leantrain.corpus.readers import BUILTIN_CORPORA
from leantrain.errors import CheckpointError, ConfigError, LeantrainError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, emoji=False)  # a path or spec like "a:-1:" stays as typed


# ---- data ------------------------------------------------------------------------------

def _curation_overrides(args: argparse.Namespace) -> list[str]:
    """The `data prepare` flags as `[curation]` overrides (after --set, so a flag wins)."""
    flags = {"profile": args.profile, "executor": args.executor, "workers": args.workers,
             "text_field": args.text_field, "language": args.language, "max_file_bytes": args.max_file_bytes,
             "dedup": False if args.no_dedup else None, "pii": False if args.no_pii else None,
             "follow_symlinks": True if args.follow_symlinks else None}
    return [*(args.set or ()), *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)]


@contextlib.contextmanager
def _stage_bars(interrupted: str) -> Iterator[Callable[[str, int, int | None], None]]:
    """A long job's progress callback (a bar per stage, on a terminal) and its Ctrl-C: the first one prints
    `interrupted` and is re-raised for the caller to exit 130; a second is ignored, so the job's own cleanup
    and this message run to the end. A job started with Ctrl-C ignored (`cmd &` in a script) keeps ignoring
    it, as Python itself does."""
    def first_interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_interrupt) \
        if threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) != signal.SIG_IGN else None
    try:
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            yield progress
    except KeyboardInterrupt:
        err_console.print(interrupted, highlight=False, markup=False, soft_wrap=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


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

    t0 = time.perf_counter()
    try:
        with _stage_bars(f"interrupted: the partial output was removed and {args.out} was not changed; run the "
                         "same command again to prepare the dataset") as progress:
            result = prepare(args.paths, args.out, builtin=args.builtin, format=args.format, curation=curation,
                             eval_paths=args.decontaminate or (), include=args.include or (),
                             exclude=args.exclude or (), vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                             val_fraction=args.val_fraction, overwrite=args.overwrite,
                             prompt_field=args.prompt_field, response_field=args.response_field,
                             chat_template=template, progress=progress, hf_dataset=args.hf_dataset,
                             hf_split=args.hf_split, sources=args.source or ())
    except KeyboardInterrupt:
        return 130
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
    for name, src in meta.get("mix", {}).get("sources", {}).items():  # --source: what each source holds and weighs
        console.print(f"source {name}: weight {src['weight']:.3g}, train {src['train_tokens']:,} tokens "
                      f"({src['train_documents']:,} docs), val {src['val_tokens']:,} tokens; seen once every "
                      f"{src['tokens_per_epoch'] or 0:,} trained tokens", highlight=False, markup=False)
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
    if args.distill_teacher:
        overrides = [*overrides, f"--distill.teacher={json.dumps(args.distill_teacher)}"]
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


def cmd_federate(args: argparse.Namespace, extra: list[str]) -> int:
    """Federated training on Flower's simulation engine (docs/federated.md); the rounds in metrics.jsonl."""
    from leantrain import api

    if args.config is None and args.recipe is None:
        args.recipe = "tiny"
    cfg = api.load_config(args.config, recipe=args.recipe, overrides=_overrides(extra))
    f = cfg.federated
    console.print(f"federate: {f.clients} clients ({f.partition}), {f.rounds} rounds x {f.local_steps} local steps, "
                  f"{f.strategy}" + (", LoRA adapters only" if f.lora_only else "")
                  + (", secure aggregation (SecAgg+)" if f.secure_aggregation else ""))
    r = api.federate(cfg, args.run_dir)
    eps = f", epsilon {r['dp_epsilon']:.3g} at delta {r['dp_delta']:g}" if r.get("dp_epsilon") is not None else ""
    console.print(f"[bold]round {r['rounds']}: val_loss {r['val_loss']:.4f}[/bold], {r['tokens']:,} tokens, "
                  f"{r['bytes_sent'] / 1e6:.2f} MB sent / {r['bytes_received'] / 1e6:.2f} MB received, "
                  f"{r['energy_j']:.0f} J{eps}")
    for w in r.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    return 0


# ---- export ----------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from leantrain import api

    info = api.export(args.run_dir, args.out, format=args.format, checkpoint=args.checkpoint,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite, dtype=args.dtype,
                      quantize=args.quantize)
    for w in info["warnings"]:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    console.print(f"exported step {info['step']} of {args.run_dir} ({info['arch']}, {info['params']:,} parameters, "
                  f"{info['dtype']}) "
                  f"to [bold]{info['out_dir']}[/bold]: {', '.join(info['files'])}")
    if args.format == "onnx":
        console.print(f"run it with ONNX Runtime: leantrain.export.onnx_runtime.OnnxLM({info['out_dir']!r})"
                      ".generate([ids], 64)", markup=False, highlight=False)
        return 0
    if args.format == "gguf":
        console.print(f"run it with llama.cpp: llama-simple -m {info['out_dir']}/model.gguf -n 64 'def '",
                      markup=False, highlight=False)
        return 0
    if args.format == "peft":
        console.print(f"load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                      f"{info['base']!r}), {info['out_dir']!r})", markup=False, highlight=False)
        return 0
    auto = info.get("auto_class", "AutoModelForCausalLM")  # AutoModelForMaskedLM for an MLM encoder
    console.print(f"load it with transformers: {auto}.from_pretrained({info['out_dir']!r})",
                  markup=False, highlight=False)
    return 0


# ---- plan / report ---------------------------------------------------------------------

def cmd_compress(args: argparse.Namespace) -> int:
    from leantrain import api

    options = {"sparsity": args.sparsity, "scope": args.scope, "heads_fraction": args.heads_fraction,
               "channels_fraction": args.channels_fraction, "score": args.score}
    info = api.compress(args.run_dir, args.out, args.method, checkpoint=args.checkpoint, group_size=args.group_size,
                        options=options, eval_batches=args.eval_batches, speed_tokens=args.speed_tokens,
                        overwrite=args.overwrite)
    for w in info["warnings"]:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    b, a = info["before"], info["after"]
    line = f"{args.method}: {b['weights_mb']:.2f} MB -> {a['weights_mb']:.2f} MB, {a['params']:,} parameters"
    if "val_loss_delta" in info:
        line += f", val loss {b['val_loss']:.4f} -> {a['val_loss']:.4f} ({info['val_loss_delta']:+.4f})"
    if "tokens_per_s_b1" in a:
        line += f", decode {b['tokens_per_s_b1']:.0f} -> {a['tokens_per_s_b1']:.0f} tokens/s (batch 1)"
    console.print(line, markup=False, highlight=False)
    console.print(f"wrote {info['out_dir']} (compression.json has the details); try: leantrain generate "
                  f"{info['out_dir']} --prompt 'def '", markup=False, highlight=False)
    return 0


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
    schema = _read_rule_file(args.json_schema, "--json-schema")
    grammar = _read_rule_file(args.grammar, "--grammar")
    prompt, suffix = _generate_input(args)
    loaded = api.load_model(args.run_dir, checkpoint=args.checkpoint)
    for w in loaded.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {w}; used an older checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", api.IncompleteOutputWarning)
        text = api.generate(loaded, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, chat=args.chat, regex=args.regex,
                            json_schema=schema, grammar=grammar, suffix=suffix, fim_mode=args.fim_mode or "psm")
    for w in caught:
        if issubclass(w.category, api.IncompleteOutputWarning):
            err_console.print(f"[yellow]warning[/yellow]: {escape(str(w.message))}", soft_wrap=True)
    print(text if args.chat or suffix is not None else prompt + text)  # --chat: the answer; infilling: the middle
    return 0


def _generate_input(args: argparse.Namespace) -> tuple[str, str | None]:
    """(prompt, suffix): --prompt alone continues it; --prefix/--suffix or --infill FILE ask for the middle."""
    from leantrain.tokens.fim import split_at_marker

    infill = args.prefix is not None or args.suffix is not None or args.infill is not None
    if args.prompt is not None and infill:
        raise ConfigError("--prompt continues text, --prefix/--suffix and --infill fill in the middle; pass one kind")
    if args.infill is not None and (args.prefix is not None or args.suffix is not None):
        raise ConfigError("--infill FILE holds both the prefix and the suffix; drop --prefix/--suffix")
    if args.fim_mode is not None and not infill:
        raise ConfigError("--fim-mode lays out a fill-in-the-middle prompt; add --prefix/--suffix or --infill FILE")
    if args.infill is not None:
        return split_at_marker(_read_rule_file(args.infill, "--infill") or "", f"--infill {args.infill}")
    if infill:
        return args.prefix or "", args.suffix or ""
    if args.prompt is None:
        raise ConfigError("pass --prompt TEXT to continue, or --prefix TEXT --suffix TEXT (or --infill FILE) to "
                          "fill in the middle")
    return args.prompt, None


def _read_rule_file(path: str | None, flag: str) -> str | None:
    """The text of a --json-schema / --grammar file, or a one-line error naming it."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e}); pass an existing UTF-8 file") from None


# ---- synth -----------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    """`synth`: a thin shell over `leantrain.api.synth` (generate, check, curate, write with the data card)."""
    from leantrain import api

    schema = _read_rule_file(args.json_schema, "--json-schema")
    grammar = _read_rule_file(args.grammar, "--grammar")

    try:
        with _stage_bars(f"interrupted: nothing was written and {args.out} was not changed; run the same "
                         "command again to generate") as progress:
            result = api.synth(args.model, args.out, kind=args.kind, count=args.count, prompts=args.prompt or (),
                               prompts_file=args.prompts, seed_docs=not args.no_seed_docs, corpus=args.corpus or (),
                               eval_paths=args.decontaminate or (), profile=args.profile, json_schema=schema,
                               regex=args.regex, grammar=grammar, constrain=not args.unconstrained, ruff=args.ruff,
                               exec_check=args.exec_check, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                               batch_size=args.batch_size, checkpoint=args.checkpoint, overwrite=args.overwrite,
                               dedup=not args.no_dedup, progress=progress)
    except KeyboardInterrupt:
        return 130
    for w in result.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}")
    syn, gen = result.card["synthetic"], result.manifest["generation"]
    console.print(f"{result.accepted:,} of {result.generated:,} {args.kind} candidates kept "
                  f"({syn['acceptance']['overall']:.1%}; {syn['acceptance']['checks']:.1%} passed the checks), "
                  f"written to {Path(args.out) / 'synthetic.jsonl'}; {gen['new_tokens']:,} tokens generated at "
                  f"{gen['tokens_per_s'] or 0:,.0f} tokens/s", highlight=False, markup=False)
    for c in syn["checks"]:
        rate = "-" if c["acceptance"] is None else f"{c['acceptance']:.1%}"
        console.print(f"  check {c['check']:<14} {c['passed']:>7,} / {c['in']:<7,} {rate}", highlight=False,
                      markup=False)
    console.print(f"data card in {Path(args.out) / 'data_card.md'}", highlight=False, markup=False)
    for note in result.card["notes"]:
        console.print(f"  note: {note}", highlight=False, markup=False)
    return 0


# ---- serve -----------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from leantrain import api

    key = args.api_key if args.api_key is not None else os.environ.get("LEANTRAIN_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        err_console.print(f"[yellow]warning[/yellow]: serving on {args.host} without an API key: anyone who can "
                          "reach this port can use the model (set --api-key or LEANTRAIN_API_KEY)")
    console.print(f"serving {args.path} at http://{args.host}:{args.port}/ (chat page), OpenAI API at /v1; "
                      "SIGTERM or Ctrl-C finishes open requests, then stops", highlight=False, soft_wrap=True)
    api.serve(args.path, host=args.host, port=args.port, api_key=key, name=args.name, checkpoint=args.checkpoint,
              max_batch=args.max_batch, max_queue=args.max_queue, max_body=args.max_body, timeout=args.timeout,
              log_level=args.log_level, threads=args.threads)
    return 0


# ---- tune ------------------------------------------------------------------------------

def _trial_line(t: Any) -> str:
    """One line per finished trial: state, objective values, the values tried, and why it was pruned or failed."""
    state = t.state.name.lower()
    values = ", ".join(f"{v:.4f}" for v in t.values) if t.values else ""
    tried = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    why = t.user_attrs.get("pruned_reason") or t.user_attrs.get("fail_reason") or ""
    return (f"trial {t.number} {state}" + (f": {values}" if values else "") + f" · {tried}"
            + (f" · {why}" if why and state != "complete" else ""))


def _show_study(study_dir: str | Path, storage: str | None) -> int:
    from leantrain import api

    r = api.tune_show(study_dir, storage=storage)
    states: dict[str, int] = {}
    for t in r.trials:
        states[t.state] = states.get(t.state, 0) + 1
    console.print(f"study {r.study_name}: {len(r.trials)} trials (" + ", ".join(f"{n} {s}" for s, n in
                                                                         sorted(states.items())) + ")",
                  markup=False, highlight=False)
    for t in r.trials:
        if t.state in ("fail", "pruned"):
            console.print(f"  trial {t.number} {t.state}: {t.reason}", markup=False, highlight=False)
    title = "best trial" if len(r.objectives) == 1 else f"Pareto front ({', '.join(r.objectives)})"
    console.print(f"[bold]{title}[/bold]:" + ("" if r.best else " none yet (no trial completed)"))
    for n in r.best:
        t = r.row(n)
        values = ", ".join(f"{w} {v:.5g}" for w, v in zip(r.objectives, t.values or [], strict=False))
        tried = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        console.print(f"  trial {n}: {values} · {tried} · {Path(study_dir) / t.attrs.get('run_dir', '')}",
                      markup=False, highlight=False)
    if r.best_toml is not None:
        console.print(f"wrote {r.best_toml}: leantrain train {r.best_toml}", markup=False, highlight=False)
    if r.report is not None:
        console.print(f"study report: {r.report}", markup=False, highlight=False)
    if (Path(study_dir) / "study.db").is_file():
        console.print(f"live view: optuna-dashboard sqlite:///{Path(study_dir) / 'study.db'}", markup=False,
                      highlight=False)
    return 0


def cmd_tune(args: argparse.Namespace, extra: list[str]) -> int:
    """`tune`: a thin shell over `leantrain.tune` / `leantrain.tune_show` (docs/tune.md)."""
    from leantrain import api

    if args.show:
        if args.config or args.resume or args.recipe:
            raise LeantrainError("--show takes the study folder alone: leantrain tune --show STUDY_DIR")
        return _show_study(args.show, args.storage)
    if args.config is None and args.recipe is None and args.resume is None:
        raise LeantrainError("leantrain tune needs a config with a [tune] space (leantrain tune CONFIG) or a study "
                             "to continue (--resume STUDY_DIR); see docs/tune.md")
    run = api.tune(args.config, args.out, recipe=args.recipe, overrides=_overrides(extra), trials=args.trials,
                   workers=args.workers, storage=args.storage, study_name=args.study_name, resume=args.resume,
                   on_trial=lambda t: console.print(_trial_line(t), markup=False, highlight=False),
                   threads=args.threads, worker_index=args.worker_index or 0)
    for w in run.warnings:
        err_console.print(f"[yellow]warning[/yellow]: {escape(w)}", highlight=False, soft_wrap=True)
    who = "this worker" if args.workers == 1 else f"the {args.workers} workers"
    console.print(f"{who} ran {len(run.ran)} trials" + (": " + ", ".join(map(str, run.ran)) if run.ran else "")
                  + f"; study {run.study_name} has {run.total}", markup=False, highlight=False)
    if run.stopped:
        console.print(f"stopped by {run.stopped}; the study is saved: continue with leantrain tune --resume "
                      f"{run.study_dir}", markup=False, highlight=False)
        return 0
    if args.worker_index is not None:  # a worker process of --workers: its parent shows the results
        return 0
    return _show_study(run.study_dir, args.storage)


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
  leantrain data prepare --format chat pairs.jsonl --tokenizer HF_DIR/tokenizer.json --out data/chat
  leantrain data prepare --source real=corpus/:0.8 --source synthetic=synth/:0.2 --out data/mixed""",
    "train": """\
  leantrain train --recipe tiny --run-dir runs/tiny
  leantrain train config.toml --train.steps=1000 --precision.dtype=fp32
  leantrain train --resume runs/tiny                   # continue from the newest good checkpoint
  leantrain train --init-from HF_DIR --data.path=data/chat --finetune.lora_rank=8 --optim.lr=1e-3
  torchrun --standalone --nproc-per-node 8 -m leantrain.cli train config.toml --run-dir runs/big""",
    "export": """\
  leantrain export runs/tiny --format hf --out hf/my-model
  leantrain export runs/tiny --out hf/my-model --overwrite --max-shard-size 2GB --dtype fp32
  leantrain export runs/lora --format peft --out adapters/my-lora      # PeftModel.from_pretrained loads it
  leantrain export runs/tiny --format onnx --quantize int8 --out onnx/my-model   # ONNX Runtime, int8 weights
  leantrain export runs/tiny --format gguf --quantize q8_0 --out gguf/my-model   # llama.cpp""",
    "tune": """\
  leantrain tune tune.toml --trials 16 --out studies/lr                 # TPE + ASHA, SQLite in studies/lr
  leantrain tune tune.toml --workers 2 --tune.objective=val_loss,energy_kwh
  leantrain tune tune.toml --storage postgresql://me@db:5432/studies --study-name lr --out studies/lr
  leantrain tune --resume studies/lr                                    # a killed study goes on
  leantrain tune --show studies/lr                                      # best trial(s), best.toml, report.html""",
    "lr-find": """\
  leantrain lr-find --recipe tiny --steps 100
  leantrain lr-find config.toml --optim.name=muon --min-lr 1e-4 --max-lr 1""",
    "generate": """\
  leantrain generate runs/tiny --prompt "def " --max-new-tokens 80
  leantrain generate runs/chat --chat --prompt "Write a haiku about GPUs" --temperature 0
  leantrain generate runs/fim --prefix $'def add(a, b):\\n    ' --suffix $'\\n    return c\\n' --temperature 0
  leantrain generate runs/fim --infill hole.py --temperature 0      # hole.py marks the gap with <FILL>""",
    "synth": """\
  leantrain synth runs/tiny --kind python --count 200 --ruff --out synth/py
  leantrain synth runs/tiny --kind json --json-schema person.json --count 100 --out synth/json
  leantrain synth hf/my-model --kind text --regex '[A-Z][a-z ]+\\.' --prompt "Note: " --count 50 --out synth/t""",
    "serve": """\
  leantrain serve runs/tiny                     # http://127.0.0.1:8000/ (chat page), /v1 (OpenAI API)
  LEANTRAIN_API_KEY=secret leantrain serve runs/chat --host 0.0.0.0 --port 8080""",
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
    prep.add_argument("--source", action="append", metavar="NAME=PATH:WEIGHT",
                      help="a weighted source of a mixed dataset (repeatable, instead of plain inputs): training "
                      "draws each sequence's source with probability weight/sum, e.g. --source real=corpus/:0.8 "
                      "--source synthetic=synth/:0.2; NAME defaults to the folder's name")
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
    train.add_argument("--init-from", metavar="DIR",
                       help="start from a local Hugging Face Llama, Mistral, Qwen2, Qwen3, Phi-3 or GPT-2 folder, or a "
                       "leantrain run or pruned `compress` output (sets train.init_from and the [model] section from "
                       "its config.json / config.toml)")
    train.add_argument("--distill.teacher", dest="distill_teacher", metavar="RUN_DIR",
                       help="distill from this trained run (same tokenizer): sets distill.teacher; [distill] has "
                       "temperature, alpha, chunk (docs/compression.md)")
    train.add_argument("--force", action="store_true",
                       help="start even when the planner estimates that the model does not fit in the memory "
                       "available")

    exp = sub.add_parser("export", help="write a trained run as a Hugging Face, ONNX or GGUF model folder",
                         description="Write the newest good checkpoint of a run as a folder that "
                         "transformers' AutoModelForCausalLM and AutoTokenizer load with no custom code (--format "
                         "hf), as an ONNX decoder for ONNX Runtime (onnx) or a GGUF file for llama.cpp (gguf).")
    exp.add_argument("run_dir", help="run directory written by `leantrain train`")
    exp.add_argument("--format", choices=["hf", "peft", "onnx", "gguf"], default="hf",
                     help="hf: safetensors + config, LoRA adapters merged; peft: a LoRA run's adapters as a PEFT "
                     "adapter folder (adapter_config.json + adapter_model.safetensors); onnx: model.onnx with past "
                     "key/values + genai_config.json for ONNX Runtime; gguf: model.gguf for llama.cpp")
    exp.add_argument("--quantize", choices=["int8", "q8_0"],
                     help="int8 (with --format onnx: onnxruntime dynamic quantization) or q8_0 (with --format gguf)")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")
    exp.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size (5GB)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an earlier export in --out (only a folder `leantrain export` wrote)")
    exp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                     help="dtype of the saved weights (default: bf16 when the run trained in bf16, else fp32)")

    comp = sub.add_parser("compress", help="quantize or prune a trained run into a smaller model, measured",
                          description="Write a smaller copy of a run (a run-like folder that generate, report and "
                          "export read) with compression.json: method, settings, source checkpoint, and size, "
                          "parameters, val loss and decoding tokens/s before and after. The source run is only "
                          "read. Docs: docs/compression.md.",
                          epilog="examples:\n  leantrain compress runs/tiny --method int8 --out runs/tiny-int8\n"
                          "  leantrain compress runs/tiny --method int4 --group-size 32 --out runs/tiny-int4\n"
                          "  leantrain compress runs/tiny --method prune-structured --heads-fraction 0.25 "
                          "--channels-fraction 0.25 --out runs/tiny-p25\n"
                          "  leantrain compress runs/qat --method convert --out runs/qat-int4",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("run_dir", help="run directory written by `leantrain train`")
    comp.add_argument("--method", required=True,
                      help="int8 (weight-only), int8-dynamic (int8 weights and activations), int4 (grouped "
                      "weight-only), fp8 (CUDA GPUs of compute capability >= 8.9), prune-magnitude, "
                      "prune-structured, prune-2:4, or convert (a run trained with quant.qat)")
    comp.add_argument("--out", required=True, help="new folder to write (a run-like folder)")
    comp.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")
    comp.add_argument("--group-size", type=int, default=32, help="int4: weights per scale along the input (32)")
    comp.add_argument("--sparsity", type=float, help="prune-magnitude: fraction of weights zeroed, in [0, 1) (0.5)")
    comp.add_argument("--scope", help="prune-magnitude: global (rank across layers) or layer (each layer alike)")
    comp.add_argument("--heads-fraction", type=float, help="prune-structured: fraction of attention heads removed")
    comp.add_argument("--channels-fraction", type=float, help="prune-structured: fraction of MLP channels removed")
    comp.add_argument("--score", help="prune-structured: importance score, magnitude or taylor (first-order)")
    comp.add_argument("--eval-batches", type=int, help="validation batches for the loss before/after "
                      "(default: train.eval_steps of the run)")
    comp.add_argument("--speed-tokens", type=int, default=32,
                      help="tokens decoded to time batch 1 and 8 before/after (0 skips the timing)")
    comp.add_argument("--overwrite", action="store_true",
                      help="replace an earlier compress output in --out (only a folder `leantrain compress` wrote)")

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

    fed = sub.add_parser("federate", help="federated training over Flower (simulation engine)",
                         description="Train across clients that keep their data: the [federated] section sets "
                         "clients, rounds, local_steps, strategy, partition and privacy; config overrides as for "
                         "train (--federated.rounds=5). An existing --run-dir resumes after its last round. "
                         "Docs: docs/federated.md.",
                         epilog="examples:\n  leantrain federate --recipe tiny --federated.clients=4 "
                         "--run-dir runs/fed\n"
                         "  leantrain federate config.toml --federated.partition=dirichlet --federated.alpha=0.1 "
                         "--federated.strategy=fedprox\n"
                         "  leantrain federate config.toml --finetune.lora_rank=8 --federated.lora_only=true "
                         "--federated.dp_epsilon=8")
    fed.add_argument("config", nargs="?", help="TOML config file")
    fed.add_argument("--recipe", help="named recipe (default: tiny)")
    fed.add_argument("--run-dir", help="run directory (default runs/federated-<time>)")

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("run_dir", help="run directory written by `leantrain train`")
    gen.add_argument("--prompt", help="text to continue (or --prefix/--suffix, --infill to fill in the middle)")
    gen.add_argument("--prefix", help="fill in the middle: the text before the gap (runs trained with "
                     "data.fim_rate > 0); prints only the middle")
    gen.add_argument("--suffix", help="fill in the middle: the text after the gap")
    gen.add_argument("--infill", metavar="FILE", help="fill in the middle of a UTF-8 file that marks the gap with "
                     "<FILL> once; prints only the middle")
    gen.add_argument("--fim-mode", choices=("psm", "spm"),
                     help="fill-in-the-middle prompt layout: prefix-suffix-middle (psm, the default) or "
                     "suffix-prefix-middle (spm)")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the run's chat template (chat data) and print only the answer")
    rule = gen.add_mutually_exclusive_group()
    rule.add_argument("--regex", help="only emit text matching this regular expression (docs/constrained.md)")
    rule.add_argument("--json-schema", metavar="FILE", help="only emit JSON valid under this JSON schema file")
    rule.add_argument("--grammar", metavar="FILE", help="only emit text of this EBNF grammar (xgrammar's GBNF; "
                      "the start rule is `root`)")

    syn = sub.add_parser("synth", help="generate a checked, curated synthetic corpus from a trained model",
                         description="Sample candidates from a run or an HF export, keep those that pass the "
                         "symbolic checks of their kind (Python: parses and compiles; JSON: parses and fits a "
                         "schema; any: a regex or grammar), curate them like any source (filters, dedup against "
                         "themselves and the real corpus, decontamination) and write OUT/synthetic.jsonl with a "
                         "data card (docs/synthetic-data.md).")
    syn.add_argument("model", metavar="RUN_DIR|HF_DIR", help="run directory, or a `leantrain export --format hf` "
                     "folder")
    syn.add_argument("--kind", required=True, help="python, json or text: which checks apply")
    syn.add_argument("--count", type=int, required=True, help="candidates to generate")
    syn.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier synth output)")
    syn.add_argument("--prompt", action="append", help="a prompt (repeatable; default: seed documents of the "
                     "real corpus, else templates)")
    syn.add_argument("--prompts", metavar="FILE", help="prompts, one per line (or .jsonl with a prompt field)")
    syn.add_argument("--no-seed-docs", action="store_true", help="do not cut prompts from the real corpus")
    syn.add_argument("--corpus", action="append", metavar="PATH", help="the real corpus (files or folders) to seed "
                     "prompts and dedup against (default: the run's token dataset)")
    syn.add_argument("--decontaminate", action="append", metavar="PATH", help="evaluation sets to decontaminate "
                     "against (repeatable)")
    syn.add_argument("--profile", choices=["none", "code", "web"], help="curation profile (default: code for "
                     "python, none for json, web for text)")
    syn.add_argument("--no-dedup", action="store_true", help="skip exact and near dedup")
    srule = syn.add_mutually_exclusive_group()
    srule.add_argument("--regex", help="check (and constrain decoding to) this regular expression")
    srule.add_argument("--json-schema", metavar="FILE", help="check (and constrain decoding to) this JSON schema")
    srule.add_argument("--grammar", metavar="FILE", help="check (and constrain decoding to) this EBNF grammar")
    syn.add_argument("--unconstrained", action="store_true", help="only check the rule; decode freely")
    syn.add_argument("--ruff", action="store_true", help="python: also require `ruff check` to find no error")
    syn.add_argument("--exec-check", action="store_true", help="python: also run each program in a sandbox (no "
                     "network, 5 s, 512 MB, temporary folder) and require exit 0")
    syn.add_argument("--max-new-tokens", type=int, default=200)
    syn.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    syn.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    syn.add_argument("--seed", type=int, default=0, help="candidate i samples with seed SEED + i")
    syn.add_argument("--batch-size", type=int, default=16, help="candidates decoded together (16)")
    syn.add_argument("--checkpoint", help="a specific checkpoint folder of the run instead of the newest")
    syn.add_argument("--overwrite", action="store_true", help="replace an earlier synth output at --out")

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API with a chat page",
                         description="Serve a run (newest good checkpoint) or an HF export folder: POST "
                         "/v1/completions and /v1/chat/completions (streaming too), GET /v1/models, /health, "
                         "/metrics, and a chat page at /. Concurrent requests are decoded together.")
    srv.add_argument("path", metavar="RUN_DIR|EXPORT_DIR", help="run directory, or a `leantrain export --format hf` "
                     "folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: $LEANTRAIN_API_KEY)")
    srv.add_argument("--name", help="model name in the API (default: the folder's name)")
    srv.add_argument("--checkpoint", help="a specific checkpoint folder of the run instead of the newest")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (16)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429 (64)")
    srv.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes; larger get 413 "
                     "(1 MiB)")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may run (300)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                     help="uvicorn's log level (info)")
    srv.add_argument("--threads", type=int, help="torch threads (default: all cores but one, for the HTTP side)")

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

    tun = sub.add_parser("tune", help="search hyperparameters with Optuna: pruned trials, many workers",
                         description="Search the [tune] space of a config (docs/tune.md): each trial is a run in "
                         "STUDY_DIR/trials/NNNN, pruned at its evaluations; the study lives in STUDY_DIR/study.db or "
                         "a shared --storage. Config overrides as for train (--tune.trials=8).")
    tun.add_argument("config", nargs="?", help="TOML config file with a [tune] section")
    tun.add_argument("--recipe", help="named recipe under the config")
    tun.add_argument("--trials", type=int, help="trials of the study, all workers together (default tune.trials)")
    tun.add_argument("--out", help="study folder (default studies/<name>-<time>)")
    tun.add_argument("--storage", help="a shared study database, e.g. postgresql://USER@HOST:5432/DB (default: "
                     "SQLite in the study folder)")
    tun.add_argument("--study-name", help="study name in the storage (default: the study folder's name)")
    tun.add_argument("--workers", type=int, default=1, help="worker processes on this machine, each with "
                     "cores/workers threads (default 1)")
    tun.add_argument("--resume", metavar="STUDY_DIR", help="continue a study (a killed worker's trial is retried)")
    tun.add_argument("--show", metavar="STUDY_DIR", help="print the best trial(s), write best.toml and report.html")
    tun.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    tun.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)

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
        if args.command == "tune":
            return cmd_tune(args, extra)
        if args.command == "federate":
            return cmd_federate(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "data" and args.data_command == "prepare":
            return cmd_data_prepare(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "synth":
            return cmd_synth(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "compress":
            return cmd_compress(args)
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
