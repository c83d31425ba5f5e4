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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from warnings import warn

from leantrain.errors import ConfigError, LeantrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from leantrain.config import Config, CurationConfig
    from leantrain.dataprep import Prepared
    from leantrain.model import Transformer
    from leantrain.parallel.distributed import Layout
    from leantrain.report.compare import Comparison
    from leantrain.synth.run import SynthResult
    from leantrain.train.telemetry import Observer
    from leantrain.tune.results import StudyResult
    from leantrain.tune.study import TuneRun

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
    (format, tokenizer, val_fraction, overwrite, include, exclude, eval_paths, progress, ...); `sources=
    ["real=corpus/:0.8", "synthetic=synth/:0.2"]` makes a mixed dataset trained on by weight (docs/data.md).
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
        source = Path(cfg.train.init_from) / "config.json"
        if (Path(cfg.train.init_from) / "config.toml").is_file():  # a leantrain run or `compress` output folder
            from leantrain.train.runs import run_model_fields

            source = Path(cfg.train.init_from) / "config.toml"
            ov.setdefault("model", {}).update(run_model_fields(cfg.train.init_from, explicit))
        else:
            ov.setdefault("model", {}).update(init_model_fields(cfg.train.init_from, explicit))
        try:
            cfg = resolve(path, recipe, ov)
        except ConfigError as e:  # a value the HF folder brought in: say where it came from
            raise ConfigError(f"{e} (the [model] values come from {source})") from None
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
             checkpoint: str | Path | None = None, regex: str | None = None,
             json_schema: str | dict | None = None, grammar: str | None = None, suffix: str | None = None,
             fim_mode: str = "psm") -> str:
    """The text a model writes after `prompt` (the continuation only), sampled with a KV cache.

    `model` is a `LoadedModel` or a run/checkpoint path (loaded for this call). temperature 0 is greedy;
    top_k 0 or None samples from the whole vocabulary; the same seed gives the same text. `chat` wraps
    the prompt in the run's chat template and stops at the end-of-text token (runs trained on chat data).
    At most one of `regex`, `json_schema` (schema text or dict) and `grammar` (EBNF text, xgrammar's GBNF
    dialect) constrains the output to that language (docs/constrained.md); if `max_new_tokens` runs out
    first, the text is returned as far as it got and an `IncompleteOutputWarning` is issued.
    `suffix` asks a run trained with fill-in-the-middle (data.fim_rate > 0) for the text between `prompt`
    (the prefix) and `suffix`, in the `fim_mode` layout ("psm" or "spm"); it returns the middle, ended by
    the end-of-text token (docs/objectives.md).
    """
    from leantrain.model.generate import check_can_generate, check_sampling
    from leantrain.model.generate import generate as sample

    check_sampling(max_new_tokens, temperature, top_k)  # before a model is loaded
    if suffix is not None and chat:
        raise ConfigError("--chat and fill-in-the-middle (--prefix/--suffix) do not combine; drop one")
    if fim_mode not in ("psm", "spm"):
        raise ConfigError(f"fim mode {fim_mode!r} is not allowed; expected psm or spm")
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    rules = [(k, v) for k, v in (("regex", regex), ("json_schema", json_schema), ("grammar", grammar))
             if v is not None]
    if len(rules) > 1:
        raise ConfigError("pass at most one of --regex, --json-schema and --grammar")
    m = _loaded(model, checkpoint)
    check_can_generate(m.model)
    if chat:
        from leantrain.tokens.chat import ChatEncoder
        from leantrain.tokens.tokenizer import tokenizer_eos

        template = m.run_dir / "chat_template.txt"
        if not template.is_file():
            raise LeantrainError(f"--chat: {template} is missing, so this run was not trained on chat data "
                                 "(`leantrain data prepare --format chat`); drop --chat")
        encoder = ChatEncoder(m.tokenizer, template.read_text(), eos=tokenizer_eos(m.run_dir / "tokenizer.json"))
        ids, eos = encoder.encode_prompt(prompt), encoder.eot  # an answer ends at the end-of-text token
    elif suffix is not None:
        ids, eos = _infill_ids(m, prompt, suffix, fim_mode)  # the middle ends at the end-of-text token
    else:
        ids, eos = m.tokenizer.encode(prompt).ids, None
    if not ids:
        raise LeantrainError("the prompt is empty; pass some text with --prompt")
    constraint = None
    if rules:
        constraint = _constraint(m, rules, eos)
        eos = constraint.grammar.stop_ids[0]
    new = sample(m.model, ids, max_new_tokens, temperature=temperature, top_k=top_k or None, seed=seed, eos_id=eos,
                 constraint=constraint)
    if constraint is not None and not constraint.complete:
        warn(IncompleteOutputWarning(
            f"max-new-tokens = {max_new_tokens} ran out before the output matched the {rules[0][0]} "
            "constraint; raise --max-new-tokens"), stacklevel=2)
    return m.tokenizer.decode(new)


def _infill_ids(m: LoadedModel, prefix: str, suffix: str, mode: str) -> tuple[list[int], int]:
    """The fill-in-the-middle prompt for a run trained with FIM, and the id that ends the middle."""
    from leantrain.tokens.fim import find_fim_tokens, infill_prompt
    from leantrain.tokens.tokenizer import eot_id, tokenizer_eos

    tokens = find_fim_tokens(m.tokenizer)
    if tokens is None:
        raise LeantrainError(f"{m.run_dir}: its tokenizer has no fill-in-the-middle sentinels, so the model cannot "
                             "infill; train a run with --data.fim_rate=0.5 (docs/objectives.md)")
    if not m.config.data.fim_rate:
        raise LeantrainError(f"{m.run_dir} was trained without fill-in-the-middle (data.fim_rate = 0), so it cannot "
                             "infill; train a run with --data.fim_rate=0.5 (docs/objectives.md)")
    eos = eot_id(m.tokenizer, eos=tokenizer_eos(m.run_dir / "tokenizer.json"))
    return infill_prompt(m.tokenizer, prefix, suffix, tokens, mode), eos


class IncompleteOutputWarning(UserWarning):
    """Constrained generation stopped at max_new_tokens before the output was a whole match."""


def _constraint(m: LoadedModel, rules: list[tuple[str, str]], eos: int | None) -> Any:
    from leantrain.model.constrained import compile_constraint
    from leantrain.tokens.tokenizer import eot_id, tokenizer_eos

    kind, source = rules[0]
    stop = eos if eos is not None else eot_id(m.tokenizer, eos=tokenizer_eos(m.run_dir / "tokenizer.json"))
    return compile_constraint(kind, source, m.tokenizer.get_vocab(with_added_tokens=True),
                              m.config.model.vocab_size, [stop]).matcher()


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
    if cfg.model.objective == "mlm":  # an encoder: the masked tokens' cross-entropy, on the trainer's masks
        return _masked_scores(m, ds, windows)["loss"]
    device = next(m.model.parameters()).device
    was_training = m.model.training
    m.model.eval()
    try:
        with torch.no_grad():
            losses = [m.model(x.to(device), y.to(device)).float() for x, y in windows]
    finally:
        m.model.train(was_training)
    return torch.stack(losses).mean().item()


# ---- synth -----------------------------------------------------------------------------

def synth(model: str | Path, out: str | Path, *, kind: str = "python", count: int = 100,
          prompts: Sequence[str] = (), prompts_file: str | Path | None = None, seed_docs: bool = True,
          corpus: Sequence[str | Path] = (), eval_paths: Sequence[str | Path] = (), profile: str | None = None,
          json_schema: str | dict | None = None, regex: str | None = None, grammar: str | None = None,
          constrain: bool = True, ruff: bool = False, exec_check: bool = False, max_new_tokens: int = 200,
          temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, batch_size: int = 16,
          checkpoint: str | Path | None = None, overwrite: bool = False, dedup: bool = True,
          progress: Callable[[str, int, int | None], None] | None = None) -> SynthResult:
    """Write a checked, curated synthetic corpus to `out` (docs/synthetic-data.md): `count` candidates sampled
    from `model` (a run directory or a `leantrain export --format hf` folder; batched, KV cache), each checked by
    the symbolic checks of its `kind` ("python": ast + compile, `ruff` optionally, `exec_check` in a sandbox with
    no network; "json": parses, and fits `json_schema`; any kind: `regex` / `grammar` match), then curated
    like any source (`profile`, default code / none / web by kind; exact and near dedup against itself and the
    real corpus; decontamination against `eval_paths`). A rule (`regex`, `json_schema`, `grammar`) also
    constrains decoding unless `constrain=False`.

    Prompts: `prompts`, then `prompts_file` lines; else seed documents of the real corpus (Python function
    signatures with docstrings, first lines of texts) when `seed_docs`; else templates. The real corpus is
    `corpus` (files/folders) or the run's token dataset. Candidate i uses seed `seed + i`. Writes
    OUT/synthetic.jsonl (text + meta: generator, prompt, seed, sampling, checks passed), the data card and
    OUT/synth.json; returns the counts, card and manifest. An OUT leantrain did not write is never replaced."""
    from leantrain.synth.run import synthesize

    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    return synthesize(model, out, kind=kind, count=count, load_model=load_model, prompts=prompts,
                      prompts_file=prompts_file, seed_docs=seed_docs, corpus=corpus, eval_paths=eval_paths,
                      profile=profile, json_schema=json_schema, regex=regex, grammar=grammar, constrain=constrain,
                      ruff=ruff, exec_check=exec_check, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, seed=seed, batch_size=batch_size, checkpoint=checkpoint, overwrite=overwrite,
                      dedup=dedup, progress=progress)


def evaluate_masked(model: LoadedModel | str | Path, data: str | Path | None = None, *, split: str = "val",
                    batch_size: int | None = None, batches: int | None = None,
                    checkpoint: str | Path | None = None) -> dict[str, float]:
    """A masked language model's (model.objective = mlm) scores on a token dataset's `split`: {"loss": mean
    cross-entropy of the masked tokens, "masked_accuracy": share of them predicted right (argmax),
    "masked_tokens": how many were scored}. The windows and their masks are the trainer's validation ones
    (tokens/masking.py, the same for every run), so a run's last val_masked_accuracy is reproduced here."""
    from leantrain.errors import DataError
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.loader import val_batches

    m = _loaded(model, checkpoint)
    cfg = m.config
    if cfg.model.objective != "mlm":
        raise ConfigError(f"{m.run_dir} is a causal model (model.objective = {cfg.model.objective}); masked-token "
                          "accuracy needs a masked language model (model.objective = mlm); use evaluate()")
    ds = TokenDataset(data if data is not None else cfg.data.path)
    if ds.vocab_size >= cfg.model.vocab_size:
        raise DataError(f"the dataset's tokenizer has {ds.vocab_size} tokens but the model only "
                        f"{cfg.model.vocab_size} with its mask token; evaluate on a dataset made with the run's "
                        "tokenizer")
    windows = val_batches(ds.shards(split), cfg.model.seq_len, batch_size or cfg.train.micro_batch_size,
                          batches or cfg.train.eval_steps, name=f"the {split} split", masks=ds.masks(split))
    return _masked_scores(m, ds, windows)


def _masked_scores(m: LoadedModel, ds: Any, windows: list) -> dict[str, float]:
    """Masked-token loss, accuracy and count of an MLM model over validation windows, masked as the trainer does."""
    import torch

    from leantrain.tokens.masking import MASK, SpanMasker, masked_scores

    cfg = m.config
    mask_id = m.tokenizer.token_to_id(MASK)
    if mask_id is None:
        raise LeantrainError(f"{m.run_dir}/tokenizer.json has no {MASK} token, so it was not written by an MLM "
                             "run; re-run training with model.objective = mlm")
    masker = SpanMasker(mask_id, ds.vocab_size, cfg.data.mask_rate, cfg.data.mask_span, cfg.train.seed)
    device = next(m.model.parameters()).device
    was_training = m.model.training
    m.model.eval()
    try:
        with torch.no_grad():
            per_batch = torch.stack([masked_scores(m.model, x.to(device), y.to(device)).cpu()
                                     for x, y in masker.val_batches(windows)])
    finally:
        m.model.train(was_training)
    # the loss as the trainer logs val_loss: the mean of the batches' means
    loss = (per_batch[:, 0] / per_batch[:, 2]).mean().item()
    total = per_batch.sum(0)
    return {"loss": loss, "masked_accuracy": (total[1] / total[2]).item(), "masked_tokens": int(total[2])}


# ---- tune ------------------------------------------------------------------------------

def tune(config: Config | str | Path | None = None, out: str | Path | None = None, *, recipe: str | None = None,
         overrides: Overrides = None, trials: int | None = None, workers: int = 1, storage: str | None = None,
         study_name: str | None = None, resume: str | Path | None = None,
         on_trial: Callable[[Any], None] | None = None, threads: int = 0, worker_index: int = 0) -> TuneRun:
    """Search the config's `[tune] space` with Optuna (docs/tune.md): each trial a run in STUDY_DIR/trials/NNNN
    (`out`, default studies/NAME-TIME), pruned at its evaluations, until the study has `trials` (default
    tune.trials) trials from all its workers. `workers` > 1 runs that many worker processes here, each with
    cores/workers threads; `storage` (postgresql://...) shares the study with workers elsewhere (same
    `study_name`, default the folder's name); `resume` continues a study folder. `on_trial` gets each finished
    Optuna FrozenTrial of this process. Returns what this call ran; `tune_show` gives the results."""
    import dataclasses

    from leantrain.config import Config
    from leantrain.tune.study import open_study, run_worker, run_workers

    for value, what in ((trials, "trials"), (workers, "workers")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{what} {value!r} is not allowed; expected an integer >= 1")
    ov = _nested(overrides)
    if trials is not None:
        if isinstance(config, Config):
            config = dataclasses.replace(config, tune=dataclasses.replace(config.tune, trials=trials))
        ov.setdefault("tune", {})["trials"] = trials
    opened = open_study(load_config, config, out, recipe=recipe, overrides=ov, storage=storage, study_name=study_name,
                        resume=resume, worker_index=worker_index)
    if workers == 1:
        return run_worker(opened, opened.cfg.tune.trials, train, threads=threads, on_trial=on_trial)
    return run_workers(opened, opened.cfg.tune.trials, workers)


def tune_show(study_dir: str | Path, *, storage: str | None = None, page: bool = True) -> StudyResult:
    """A study's trials (state, values, reason for pruned and failed ones) and best trial(s) (the Pareto front for
    several objectives); writes STUDY_DIR/best.toml (ready for `train`) and, with `page`, STUDY_DIR/report.html."""
    from leantrain.tune.results import show

    return show(study_dir, storage, page=page)


# ---- federate --------------------------------------------------------------------------

def federate(config: Config | str | Path, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Federated training of `config` (its `[federated]` section) on Flower's simulation engine into `run_dir`
    (default runs/federated-TIME); returns the summary (rounds, val_loss, tokens, bytes each way, energy,
    dp_epsilon with DP, partition sizes and skew), also written as RUN/federated.json. Each client trains with
    the Trainer's own step on its partition; the global model is checkpointed each round, and an existing run
    directory resumes after its last finished round. For the deployment engine (flower-superlink and
    flower-supernode processes) see docs/federated.md."""
    from leantrain.config import Config
    from leantrain.federated.run import simulate

    cfg = config if isinstance(config, Config) else load_config(config)
    return simulate(cfg, Path(run_dir) if run_dir is not None else _new_run_dir("federated"))


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


# ---- compress --------------------------------------------------------------------------

def compress(run_dir: str | Path, out: str | Path, method: str, *, checkpoint: str | Path | None = None,
             group_size: int = 32, options: Mapping[str, Any] | None = None, eval_batches: int | None = None,
             speed_tokens: int = 32, overwrite: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Write a smaller copy of a run into `out` (a run-like folder that generate, evaluate, report and export
    read) and return its compression.json record: method, settings, source checkpoint (path, sha256), and
    weights MB, parameters, val loss and decoding tokens/s (batch 1 and 8, KV cache) before and after.

    `method`: "int8" (weight-only), "int8-dynamic", "int4" (grouped weight-only, `group_size`), "fp8" (CUDA
    GPUs of compute capability >= 8.9), "prune-magnitude", "prune-structured", "prune-2:4", or "convert" (a
    run trained with quant.qat). `options` (pruning): sparsity, scope, heads_fraction, channels_fraction,
    score. `eval_batches` validation batches (default: the run's train.eval_steps); `speed_tokens` 0 skips
    the timing. The source run is only read; `overwrite` replaces only an earlier compress output.
    """
    from leantrain.compress.run import compress as run_compress

    return run_compress(run_dir, out, method, checkpoint=checkpoint, group_size=group_size, options=dict(options or {}),
                        eval_batches=eval_batches, speed_tokens=speed_tokens, overwrite=overwrite, device=device)


# ---- export ----------------------------------------------------------------------------

def export(run_dir: str | Path, out: str | Path, *, format: str = "hf", checkpoint: str | Path | None = None,
           max_shard_size: int | str = "5GB", overwrite: bool = False, dtype: str | None = None,
           quantize: str | None = None) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as a Hugging Face folder that transformers'
    AutoModelForCausalLM / AutoTokenizer load with no custom code (`format="hf"`; LoRA adapters merged), or a
    LoRA run's adapters as a PEFT adapter folder (`format="peft"`, for `PeftModel.from_pretrained`); returns a
    summary (out_dir, files, step, arch, params, dtype, warnings). `dtype` (fp32, bf16, fp16) of the saved
    weights defaults to bf16 when the run trained in bf16, else fp32. A non-empty `out` is replaced only
    with `overwrite`, and only if leantrain wrote it. `format="onnx"` writes an ONNX decoder with past
    key/values for ONNX Runtime (`quantize="int8"`: dynamic int8 weights), `format="gguf"` one GGUF file for
    llama.cpp (`dtype` fp32/fp16/bf16 or `quantize="q8_0"`); docs/export.md."""
    from leantrain.export.hf import export_hf, parse_size

    if format not in ("hf", "peft", "onnx", "gguf"):
        raise ConfigError(f"export format {format!r} is not allowed; expected 'hf', 'peft', 'onnx' or 'gguf'")
    from leantrain.compress.run import quantized_by
    from leantrain.export.hf import check_objective_format

    check_objective_format(run_dir, format)  # an MLM encoder: hf only
    quantized = quantized_by(run_dir)
    if quantized:  # a `leantrain compress` int8/int4 output: torchao tensors, in transformers' TorchAoConfig form
        from leantrain.export.quantized import check_quantized_export, export_quantized_hf

        check_quantized_export(run_dir, quantized, format, dtype, quantize)
        return export_quantized_hf(run_dir, out, quantized, checkpoint, overwrite)
    if format == "onnx":
        from leantrain.export.onnx import export_onnx

        return export_onnx(run_dir, out, checkpoint, overwrite, dtype, quantize)
    if format == "gguf":
        from leantrain.export.gguf import export_gguf

        return export_gguf(run_dir, out, checkpoint, overwrite, dtype, quantize)
    if quantize is not None:
        raise ConfigError(f"--quantize {quantize} is not allowed with --format {format}; quantized exports are "
                          "--format onnx --quantize int8 and --format gguf --quantize q8_0")
    if format == "peft":
        from leantrain.export.peft import export_peft

        return export_peft(run_dir, out, checkpoint, overwrite, dtype)
    shard = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    return export_hf(run_dir, out, checkpoint, shard, overwrite, dtype)


# ---- serve -----------------------------------------------------------------------------

def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, checkpoint: str | Path | None = None, max_batch: int = 16, max_queue: int = 64,
          max_body: int = 1 << 20, timeout: float = 300.0, log_level: str = "info", threads: int | None = None) -> None:
    """Serve a run directory (newest good checkpoint) or an HF export folder over OpenAI's completions and chat
    completions API, with continuous batching and a chat page at /, until SIGTERM/SIGINT (then drain, return).

    Binds 127.0.0.1 unless `host` says otherwise; `api_key` makes every /v1 route want `Authorization: Bearer
    KEY`. `max_batch` requests decode together, `max_queue` more wait (beyond: 429); bodies over `max_body`
    bytes get 413, requests running past `timeout` seconds 504. `threads` for torch defaults to all cores but one:
    the HTTP side needs a core, and torch's threads stall when they share one. Needs the `serve` extra
    (docs/serving.md)."""
    for value, what in ((max_batch, "max_batch"), (max_queue, "max_queue"), (max_body, "max_body")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if what == "max_queue" else 1):
            raise ConfigError(f"{what} = {value!r} is not allowed; expected an integer >= "
                              f"{0 if what == 'max_queue' else 1}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port = {port!r} is not allowed; expected an integer in [0, 65535]")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout = {timeout!r} is not allowed; expected a number of seconds > 0")
    if api_key is not None and not api_key.strip():
        raise ConfigError("the API key is empty; pass a non-empty --api-key (or leave it out)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LeantrainError(f"serving needs {e.name}; install the extra: pip install 'leantrain[serve]'") from None
    from leantrain.serve.app import Limits, run
    from leantrain.serve.loader import load_served

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads = {threads!r} is not allowed; expected an integer >= 1")
    import os

    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    served = load_served(path, name=name, checkpoint=checkpoint, load_model=load_model)
    run(served, host, port, Limits(api_key, max_body, max_batch, max_queue, float(timeout)), log_level)
