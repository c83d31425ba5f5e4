"""A study: create or join it, then run trials in this process or in K worker processes until it has enough.

`tune` is what `leantrain tune` and `leantrain.tune(...)` call. A worker loops: while the study counts fewer
than `tune.trials` trials (all workers together; a killed trial that was retried counts once), it asks Optuna
for the next one and runs it (`TrialRunner`). Each worker builds the same sampler and pruner from the
config; Optuna's storage is what they share, so workers on other machines join with the same `--storage`
and study name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.config import Config, TuneConfig, to_toml, tune_objectives
from leantrain.errors import ConfigError, LeantrainError
from leantrain.files import write_durable
from leantrain.tune.space import Param, budget_steps, parse_space, space_spec
from leantrain.tune.storage import (
    StudyLock,
    check_new_study_dir,
    masked,
    open_storage,
    quiet_optuna,
    read_marker,
    storage_url,
    write_marker,
)
from leantrain.tune.trial import TrialFailed, TrialRunner, WorkerStopped

SPACE_ATTR = "leantrain_space"


@dataclass
class TuneRun:
    """What one `tune` call did: the study folder and name, the trials this process's workers ran (numbers),
    the study's trial count when it stopped, and the signal that stopped it early, if one did."""

    study_dir: Path
    study_name: str
    ran: list[int] = field(default_factory=list)
    total: int = 0
    stopped: str | None = None
    warnings: list[str] = field(default_factory=list)


def make_sampler(t: TuneConfig, objectives: int, seed: int) -> Any:
    """Optuna's sampler named by tune.sampler (auto: TPE, NSGA-II for several objectives)."""
    optuna = quiet_optuna()
    name = t.sampler if t.sampler != "auto" else ("nsga2" if objectives > 1 else "tpe")
    if name == "tpe":  # a few random trials first, then the model; constant liar keeps parallel workers apart
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, t.trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, t.trials // 2)))
    try:
        import cmaes  # noqa: F401 - Optuna's CMA-ES sampler needs it
    except ImportError:
        raise ConfigError("tune.sampler = cmaes needs the cmaes package: pip install 'leantrain[tune]' (or use "
                          "sampler = tpe)") from None
    return optuna.samplers.CmaEsSampler(seed=seed)


def make_pruner(cfg: Config, objectives: int) -> Any:
    """Optuna's pruner named by tune.pruner; the resource is the optimizer step of each evaluation."""
    optuna = quiet_optuna()
    t = cfg.tune
    name = t.pruner if t.pruner != "auto" else ("none" if objectives > 1 else "asha")
    first = cfg.train.eval_every or 1
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=t.reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max(first + 1, budget_steps(cfg, t)),
                                              reduction_factor=t.reduction_factor)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, t.trials // 4)))
    return optuna.pruners.NopPruner()


def counted(study: Any) -> int:
    """Trials that count towards tune.trials: all but failed ones that were retried (their retry counts)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def retry(study: Any, number: int, max_retries: int) -> None:
    """Queue a trial again with the same values (it resumes from its run's checkpoint)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(study, frozen)


def fail_orphans(study: Any, max_retries: int) -> list[int]:
    """Trials still marked running when no worker of the folder is alive: their workers were killed. Fail them
    and queue their retries now, instead of waiting out the heartbeat grace period."""
    from optuna.trial import TrialState

    numbers = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for n in numbers:
        study.tell(n, state=TrialState.FAIL, skip_if_finished=True)
        retry(study, n, max_retries)
    return numbers


@dataclass
class Opened:
    """A study ready for workers: its folder, base config and space, storage URL and Optuna study."""

    study_dir: Path
    cfg: Config
    params: list[Param]
    url: str
    storage_arg: str | None
    study: Any
    created: bool


def _check_objective(cfg: Config) -> list[str]:
    words = tune_objectives(cfg.tune.objective)
    if any(w in ("energy_kwh", "cost_usd") for w in words) and cfg.energy.meter == "off":
        raise ConfigError(f"config: tune.objective = {cfg.tune.objective!r} needs the energy meter, but "
                          "energy.meter = off; set energy.meter = auto (or estimate)")
    return words


def _join(storage: Any, name: str, cfg: Config, params: list[Param], sampler: Any, pruner: Any) -> tuple[Any, bool]:
    """Create the study in the storage, or join the one of that name if its space and objectives are the same."""
    optuna = quiet_optuna()
    words = tune_objectives(cfg.tune.objective)
    spec = json.dumps({"space": json.loads(space_spec(params)), "objective": words}, sort_keys=True)
    existed = name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize"] * len(words),
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    _check_spec(study, spec, name)
    return study, not existed


def _check_spec(study: Any, spec: str, name: str) -> None:
    have = study.user_attrs.get(SPACE_ATTR)
    if have is None:
        study.set_user_attr(SPACE_ATTR, spec)
        return
    if have != spec:
        old, new = json.loads(have), json.loads(spec)
        what = "objective" if old["objective"] != new["objective"] else "search space"
        raise ConfigError(f"tune: the {what} differs from the one study {name!r} was created with "
                          f"({_diff(old, new, what)}); continue it with its own [tune] settings, or start a new "
                          "study with another --out (or --study-name)")


def _diff(old: dict, new: dict, what: str) -> str:
    if what == "objective":
        return f"was {','.join(old['objective'])}, now {','.join(new['objective'])}"
    a = {d["key"]: d for d in old["space"]}
    b = {d["key"]: d for d in new["space"]}
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "changed: " + ", ".join(changed)


def _seed(cfg: Config, worker_index: int, shared: bool) -> int:
    """Workers must not suggest the same values: each gets its own seed (shared storages mix in the pid too)."""
    return (cfg.tune.seed + 1009 * worker_index + (os.getpid() if shared else 0)) % (2**32)


def open_study(load: Callable[..., Config], config: str | Path | Config | None = None, out: str | Path | None = None,
               *, recipe: str | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
               storage: str | None = None, study_name: str | None = None, resume: str | Path | None = None,
               worker_index: int = 0) -> Opened:
    """Create a study (new folder `out`) or open one to continue (`resume`, its folder), checking everything
    before a trial runs: config, space, objective, sampler, storage, and that a resumed or joined study has
    the same space and objectives. `load` is `leantrain.api.load_config` (handed in: tune sits above the API)."""
    if resume is not None:
        study_dir = Path(resume)
        marker = read_marker(study_dir)
        name = study_name or marker["study_name"]
        if config is None and recipe is None:
            cfg = load(study_dir / "config.toml", overrides=overrides)
        else:
            cfg = config if isinstance(config, Config) else load(config, recipe=recipe, overrides=overrides)
        kept = marker.get("storage")
        if storage is None and kept and "***" in kept:
            raise LeantrainError(f"the storage of {study_dir} had a password, which leantrain does not keep; pass "
                                 "it again with --storage (or leave it out of the URL and use PGPASSWORD/.pgpass)")
        storage = storage or kept
    else:
        cfg = config if isinstance(config, Config) else load(config, recipe=recipe, overrides=overrides)
        stem = Path(config).stem if isinstance(config, str | Path) else (recipe or "study")
        study_dir = Path(out) if out is not None else Path("studies") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_new_study_dir(study_dir)
        name = study_name or study_dir.name
    params = parse_space(cfg.tune.space)
    words = _check_objective(cfg)
    sampler = make_sampler(cfg.tune, len(words), _seed(cfg, worker_index, storage is not None))
    pruner = make_pruner(cfg, len(words))
    url = storage_url(storage, study_dir)
    fresh_dir = resume is None and not study_dir.exists()
    if storage is None:
        study_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file lives in the folder
    try:
        db = open_storage(url, cfg.tune.heartbeat_s, cfg.tune.max_retries)
        if resume is not None and name not in {s.study_name for s in quiet_optuna().get_all_study_summaries(
                db, include_best_trial=False)}:
            raise LeantrainError(f"the storage {masked(url)} has no study named {name!r}; check --storage and "
                                 "--study-name")
        study, created = _join(db, name, cfg, params, sampler, pruner)
    except BaseException:
        if fresh_dir and study_dir.is_dir():  # nothing of the study was made: leave no folder behind
            for p in sorted(study_dir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            study_dir.rmdir()
        raise
    if resume is None:
        write_marker(study_dir, name, storage)
        write_durable(study_dir / "config.toml", to_toml(cfg))
        if created and cfg.tune.lr_find:
            _seed_with_lr_find(cfg, params, study, study_dir)
    return Opened(study_dir, cfg, params, url, storage, study, created)


def _seed_with_lr_find(cfg: Config, params: list[Param], study: Any, study_dir: Path) -> None:
    """Enqueue lr_find's suggested optim.lr (inside the space's range) as the study's first trial."""
    from leantrain.train.lr_find import lr_find

    lr = next((p for p in params if p.key == "optim.lr" and p.kind == "float"), None)
    lo, hi = (lr.low, lr.high) if lr is not None else (1e-5, 1.0)
    record = lr_find(cfg, study_dir / "lr-find", lo, hi, max(10, min(100, budget_steps(cfg, cfg.tune))))
    if record["suggested"] and lr is not None:
        study.enqueue_trial({"optim.lr": min(hi, max(lo, record["suggested"]))}, user_attrs={"seeded_by": "lr_find"})


def run_worker(opened: Opened, total: int, train: Callable[..., Any], *, threads: int = 0,
               on_trial: Callable[[Any], None] | None = None) -> TuneRun:
    """Run trials in this process until the study counts `total` (each through `train`, leantrain.api.train);
    returns what this worker did."""
    study, cfg = opened.study, opened.cfg
    lock = StudyLock(opened.study_dir)
    local = opened.storage_arg is None
    if local and lock.sole():  # no other worker of this folder is alive: its running trials were killed
        fail_orphans(study, cfg.tune.max_retries)
    words = tune_objectives(cfg.tune.objective)
    prune = len(words) == 1 and not isinstance(study.pruner, quiet_optuna().pruners.NopPruner)
    runner = TrialRunner(cfg, opened.params, opened.study_dir, prune, train, threads)
    run = TuneRun(opened.study_dir, study.study_name)

    def done(study: Any, frozen: Any) -> None:
        run.ran.append(frozen.number)
        if on_trial is not None:
            on_trial(frozen)

    try:
        while counted(study) < total:
            try:
                study.optimize(runner, n_trials=1, catch=(TrialFailed,), callbacks=[done], gc_after_trial=True)
            except WorkerStopped as e:
                number = max(t.number for t in study.get_trials(deepcopy=False)
                             if t.user_attrs.get("worker", "").endswith(f":{os.getpid()}"))
                retry(study, number, cfg.tune.max_retries)
                run.stopped = str(e)
                break
    finally:
        lock.release()
    run.total = counted(study)
    return run


def run_workers(opened: Opened, total: int, workers: int, on_line: Callable[[str], None] | None = None) -> TuneRun:
    """Run `workers` worker processes on this machine (each `leantrain tune --resume` with cores/workers threads)
    and wait for them; SIGTERM or Ctrl-C here stops them at their next step boundary."""
    from leantrain.device import physical_cores

    threads = max(1, physical_cores() // workers)
    lock = StudyLock(opened.study_dir)
    if opened.storage_arg is None and lock.sole():
        fail_orphans(opened.study, opened.cfg.tune.max_retries)
    cmd = [sys.executable, "-m", "leantrain.cli", "tune", "--resume", str(opened.study_dir), "--trials", str(total),
           "--threads", str(threads), "--study-name", opened.study.study_name]
    if opened.storage_arg:
        cmd += ["--storage", opened.storage_arg]
    procs = [subprocess.Popen([*cmd, "--worker-index", str(i)]) for i in range(workers)]
    run = TuneRun(opened.study_dir, opened.study.study_name)
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    finally:
        lock.release()
    bad = [f"worker {i} exited with {c}" for i, c in enumerate(codes) if c not in (0, 143, 130)]
    run.warnings += bad
    run.stopped = "SIGTERM" if any(c == 143 for c in codes) else None
    mine = {str(p.pid) for p in procs}
    run.ran = sorted(t.number for t in opened.study.get_trials(deepcopy=False)
                     if t.user_attrs.get("worker", ":").rsplit(":", 1)[1] in mine)
    run.total = counted(opened.study)
    return run
