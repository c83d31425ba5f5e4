"""The public Python API: each stage of leantrain as one function (reference: docs/api.md).

    prepare -> load_config -> train -> load_model / generate / evaluate -> export

Each function returns data or writes files and never prints; the CLI (cli.py) parses arguments,
calls these and prints. Errors a user can cause are `LeantrainError` subclasses (leantrain.errors)
whose one-line message says what to do. Modules that pull in torch are imported inside the
functions, so `import leantrain` stays cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leantrain.errors import ConfigError, LeantrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from leantrain.config import Config, CurationConfig
    from leantrain.dataprep import Prepared
    from leantrain.model import Transformer
    from leantrain.parallel.distributed import Layout
    from leantrain.report.compare import Comparison
    from leantrain.train.telemetry import Observer

Overrides = Mapping[str, Any] | Sequence[str] | None


# ---- data ------------------------------------------------------------------------------

def prepare(inputs: str | Path | Sequence[str | Path] = (), out: str | Path = "data/dataset", *,
            builtin: str | None = None, curation: CurationConfig | Mapping[str, Any] | None = None,
            vocab_size: int = 8192, hf_dataset: str | Path | None = None, hf_split: str = "train",
            tokenizer: str | Path | None = None, **options: Any) -> Prepared:
    """Curate documents and write a token dataset to `out`; returns what was made (meta, data card, counts).

    Give files/folders as `inputs`, a built-in corpus as `builtin` ("stdlib"), or a local Hugging Face
    `datasets` folder (save_to_disk) or .parquet/.arrow/.json/.jsonl file as `hf_dataset` (split
    `hf_split`, text from the `text_field` curation setting; streamed, never from the Hub). `tokenizer`
    reuses a tokenizer.json, a token dataset or a local Hugging Face tokenizer folder instead of
    training one (its special tokens travel with the dataset). `curation` is the
    `[curation]` config section, or a mapping of its settings ({"profile": "code", "executor": "serial",
    "gopher_quality.min_words": 20}). `options` are `leantrain.dataprep.prepare`'s other keywords
    (format, tokenizer, val_fraction, overwrite, include, exclude, eval_paths, progress, ...).
    """
    from leantrain.dataprep import prepare as prepare_dataset

    if isinstance(curation, Mapping):
        from leantrain.corpus.pipeline import load_curation

        curation = load_curation(None, [f"{k}={json.dumps(v)}" for k, v in curation.items()])
    return prepare_dataset(inputs, out, builtin=builtin, curation=curation, vocab_size=vocab_size,
                           hf_dataset=hf_dataset, hf_split=hf_split, tokenizer=tokenizer, **options)


# ---- config ----------------------------------------------------------------------------

def _nested(overrides: Overrides) -> dict[str, dict[str, Any]]:
    """{"train.steps": 10}, {"train": {"steps": 10}} or ["--train.steps=10"] -> {"train": {"steps": 10}}."""
    from leantrain.config import parse_overrides

    if not overrides:
        return {}
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, Mapping):
        return parse_overrides(list(overrides))
    out: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        elif isinstance(value, Mapping):
            out.setdefault(key, {}).update(value)
        else:
            raise ConfigError(f"override {key!r} names no field; write 'section.field' (e.g. 'train.steps') "
                              "or give a section as a mapping")
    return out


def load_config(path: str | Path | None = None, *, recipe: str | None = None, overrides: Overrides = None) -> Config:
    """A validated `Config` from defaults, then a recipe, then a TOML file, then overrides.

    `overrides` is a mapping of dotted keys ({"train.steps": 100}), of sections ({"train": {"steps": 100}}),
    or CLI-style strings (["--train.steps=100"]). With `train.init_from` (a Hugging Face folder) the
    `[model]` section comes from its config.json, except values set explicitly (which must agree); with
    `finetune.adapter` (a PEFT adapter folder) the LoRA settings come from its adapter_config.json alike.
    """
    from leantrain.config import load_config as resolve
    from leantrain.config import read_toml_file

    ov = _nested(overrides)
    cfg = resolve(path, recipe, ov)
    if cfg.train.init_from:
        from leantrain.model.hf import init_model_fields

        keys = set(read_toml_file(path).get("model", {})) if path else set()
        keys |= set(ov.get("model", {}))
        explicit = {k: getattr(cfg.model, k) for k in keys}
        ov.setdefault("model", {}).update(init_model_fields(cfg.train.init_from, explicit))
        try:
            cfg = resolve(path, recipe, ov)
        except ConfigError as e:  # a value the HF folder brought in: say where it came from
            raise ConfigError(f"{e} (the [model] values come from {Path(cfg.train.init_from) / 'config.json'})"
                              ) from None
    if cfg.finetune.adapter:
        from leantrain.model.peft import adapter_fields

        keys = set(read_toml_file(path).get("finetune", {})) if path else set()
        keys |= set(ov.get("finetune", {}))
        explicit = {k: getattr(cfg.finetune, k) for k in keys}
        ov.setdefault("finetune", {}).update(adapter_fields(cfg.finetune.adapter, cfg.model, explicit))
        cfg = resolve(path, recipe, ov)
    return cfg


# ---- train -----------------------------------------------------------------------------

@dataclass
class TrainResult:
    """How a run ended. `metrics` is the trainer's whole end-of-run summary (throughput, MFU, energy,
    CO2e, cost); `stopped` names the signal when the run was stopped early (resume it with `train`)."""

    run_dir: Path
    step: int
    tokens: int
    loss: float | None
    val_loss: float | None
    stopped: str | None = None
    sample: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _new_run_dir(name: str) -> Path:
    """runs/NAME-TIME, never an existing folder (two runs started in the same second must not share one)."""
    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = stem, 1
    while run_dir.exists():
        run_dir, n = stem.with_name(f"{stem.name}-{n}"), n + 1
    return run_dir


def train(config: Config | str | Path, run_dir: str | Path | None = None, *, observers: Iterable[Observer] = (),
          resume: bool = True, force: bool = False, layout: Layout | None = None) -> TrainResult:
    """Train `config` (a `Config` or a TOML path) into `run_dir` (default runs/run-TIME) and write its report.

    An existing run directory is resumed from its newest good checkpoint (`resume=False` refuses to).
    `observers` get every metrics record (`on_step`), event (`on_event`) and the summary (`on_end`).
    `force` starts even when the planner estimates the model does not fit in memory. `layout` is for
    callers that set up the process group already (the CLI under torchrun); by default the trainer does.
    """
    from leantrain.config import Config
    from leantrain.train.trainer import Trainer

    cfg = config if isinstance(config, Config) else load_config(config)
    run_dir = Path(run_dir) if run_dir is not None else _new_run_dir("run")
    trackers = None
    if cfg.log.trackers:  # imports the tracker libraries now: a missing one stops before the run directory exists
        from leantrain.train.trackers import open_trackers

        trackers = open_trackers(cfg, run_dir)
    try:
        trainer = Trainer(cfg, run_dir, observers=[*observers, *([trackers] if trackers else [])], resume=resume,
                          layout=layout, force=force)
        if trackers is not None:
            trackers.tell(trainer.observers)  # a tracker's mid-run failure: one event in the log and the terminal
        summary = trainer.fit()
    except OSError as e:  # disk full, permissions: on the run's other files (checkpoint saves say so already)
        raise LeantrainError(f"{e.strerror or e}: {e.filename or run_dir}; check free space and permissions of "
                             f"the run directory {run_dir}, then run the same command again to resume") from None
    finally:
        if trackers is not None and trackers.summary is None:  # the run failed: its tracker runs end as failed
            trackers.close()
    warnings = []
    if trainer.layout.is_rank0:
        try:
            from leantrain.report import write_report

            write_report(run_dir)
        except Exception as e:  # noqa: BLE001 - the run is saved; the report can be rebuilt with `leantrain report`
            warnings.append(f"report.html not written ({type(e).__name__}: {e}); "
                            f"retry with: leantrain report {run_dir}")
    if trackers is not None:  # after the report, so that it goes along as an artifact
        warnings += trackers.close(run_dir / "report.html")
    return TrainResult(run_dir=run_dir, step=summary["step"], tokens=summary["tokens"], loss=summary.get("loss"),
                       val_loss=summary.get("val_loss"), stopped=summary.get("stopped"), sample=summary.get("sample"),
                       metrics={k: v for k, v in summary.items() if k not in ("run_dir", "sample")}, warnings=warnings)


# ---- use a trained model ---------------------------------------------------------------

@dataclass
class LoadedModel:
    """A trained model in eval mode (a plain `Transformer`: `model(ids)` returns logits [B, T, vocab]),
    its tokenizer and config, the checkpoint's step, and the run directory it came from."""

    model: Transformer
    tokenizer: Tokenizer
    config: Config
    step: int
    run_dir: Path
    warnings: list[str] = field(default_factory=list)  # newer checkpoints that were damaged and skipped


def load_model(path: str | Path, *, checkpoint: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a run's newest good checkpoint (`path` = the run directory), or one checkpoint (`path` =
    RUN/checkpoints/step-N, or `checkpoint=` any full checkpoint folder, e.g. a consolidated one).
    LoRA adapters come back merged into the weights."""
    from leantrain.train.runs import load_trained

    path = Path(path)
    if not (path / "config.toml").is_file() and path.parent.name == "checkpoints" \
            and (path.parent.parent / "config.toml").is_file():
        if checkpoint is not None:
            raise ConfigError(f"{path} is a checkpoint already; pass its run directory {path.parent.parent} "
                              "with checkpoint=, or the checkpoint alone")
        path, checkpoint = path.parent.parent, path
    model, tok, cfg, step, warnings = load_trained(path, checkpoint, device)
    return LoadedModel(model, tok, cfg, step, path, list(warnings))


def _loaded(model: LoadedModel | str | Path, checkpoint: str | Path | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if checkpoint is not None:
            raise ConfigError("checkpoint= applies when a run directory is given, not a loaded model")
        return model
    return load_model(model, checkpoint=checkpoint)


def generate(model: LoadedModel | str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 50, seed: int | None = 0, chat: bool = False,
             checkpoint: str | Path | None = None) -> str:
    """The text a model writes after `prompt` (the continuation only), sampled with a KV cache.

    `model` is a `LoadedModel` or a run/checkpoint path (loaded for this call). temperature 0 is greedy;
    top_k 0 or None samples from the whole vocabulary; the same seed gives the same text. `chat` wraps
    the prompt in the run's chat template and stops at the end-of-text token (runs trained on chat data).
    """
    from leantrain.model.generate import check_sampling
    from leantrain.model.generate import generate as sample

    check_sampling(max_new_tokens, temperature, top_k)  # before a model is loaded
    m = _loaded(model, checkpoint)
    if chat:
        from leantrain.tokens.chat import ChatEncoder
        from leantrain.tokens.tokenizer import tokenizer_eos

        template = m.run_dir / "chat_template.txt"
        if not template.is_file():
            raise LeantrainError(f"--chat: {template} is missing, so this run was not trained on chat data "
                                 "(`leantrain data prepare --format chat`); drop --chat")
        encoder = ChatEncoder(m.tokenizer, template.read_text(), eos=tokenizer_eos(m.run_dir / "tokenizer.json"))
        ids, eos = encoder.encode_prompt(prompt), encoder.eot  # an answer ends at the end-of-text token
    else:
        ids, eos = m.tokenizer.encode(prompt).ids, None
    if not ids:
        raise LeantrainError("the prompt is empty; pass some text with --prompt")
    new = sample(m.model, ids, max_new_tokens, temperature=temperature, top_k=top_k or None, seed=seed, eos_id=eos)
    return m.tokenizer.decode(new)


def evaluate(model: LoadedModel | str | Path, data: str | Path | None = None, *, split: str = "val",
             batch_size: int | None = None, batches: int | None = None,
             checkpoint: str | Path | None = None) -> float:
    """Mean cross-entropy of `model` on a token dataset's `split` (default: the run's own dataset, val).

    The windows are the trainer's evaluation windows (train.micro_batch_size x train.eval_steps unless
    `batch_size` / `batches` say otherwise), so a run's last logged val_loss is reproduced from its
    final checkpoint. Computed in float32 on the model's device.
    """
    import torch

    from leantrain.errors import DataError
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.loader import val_batches

    m = _loaded(model, checkpoint)
    cfg = m.config
    ds = TokenDataset(data if data is not None else cfg.data.path)
    if ds.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the dataset's tokenizer has {ds.vocab_size} tokens but the model only "
                        f"{cfg.model.vocab_size}; evaluate on a dataset made with the run's tokenizer")
    windows = val_batches(ds.shards(split), cfg.model.seq_len, batch_size or cfg.train.micro_batch_size,
                          batches or cfg.train.eval_steps, name=f"the {split} split", masks=ds.masks(split))
    device = next(m.model.parameters()).device
    was_training = m.model.training
    m.model.eval()
    try:
        with torch.no_grad():
            losses = [m.model(x.to(device), y.to(device)).float() for x, y in windows]
    finally:
        m.model.train(was_training)
    return torch.stack(losses).mean().item()


# ---- report and compare ----------------------------------------------------------------

def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a run's report.html (into the run directory, or `out`) and return its path. `train` writes it
    already; call this to rebuild it. A file at `out` that leantrain did not write is never replaced."""
    from leantrain.report import write_report

    return write_report(run_dir, out)


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = "compare.html") -> Comparison:
    """Line up two or more runs: final and best val loss, tokens, wall time, tokens/s, MFU, energy, CO2e,
    cost and the config keys that differ (`Comparison.table()` / `.lines()`), and write `out`, an offline
    page overlaying their loss curves (None: no page). Lines of metrics.jsonl that are not JSON are
    skipped with a warning in `Comparison.warnings`; a run with no metrics record at all is an error."""
    from leantrain.report.compare import compare_runs, write_compare

    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    result = compare_runs(list(run_dirs))
    if out is not None:
        write_compare(result, out)
    return result


# ---- export ----------------------------------------------------------------------------

def export(run_dir: str | Path, out: str | Path, *, format: str = "hf", checkpoint: str | Path | None = None,
           max_shard_size: int | str = "5GB", overwrite: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as a Hugging Face folder that transformers'
    AutoModelForCausalLM / AutoTokenizer load with no custom code (`format="hf"`; LoRA adapters merged), or a
    LoRA run's adapters as a PEFT adapter folder (`format="peft"`, for `PeftModel.from_pretrained`); returns a
    summary (out_dir, files, step, arch, params, dtype, warnings). `dtype` (fp32, bf16, fp16) of the saved
    weights defaults to bf16 when the run trained in bf16, else fp32. A non-empty `out` is replaced only
    with `overwrite`, and only if leantrain wrote it."""
    from leantrain.export.hf import export_hf, parse_size

    if format not in ("hf", "peft"):
        raise ConfigError(f"export format {format!r} is not allowed; expected 'hf' or 'peft'")
    if format == "peft":
        from leantrain.export.peft import export_peft

        return export_peft(run_dir, out, checkpoint, overwrite, dtype)
    shard = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    return export_hf(run_dir, out, checkpoint, shard, overwrite, dtype)
