"""What a study found: every trial with its state and reason, the best trial (the Pareto front when there are
several objectives), `best.toml` (a config ready for `leantrain train`) and the study page."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.config import load_config, to_toml, tune_objectives
from leantrain.errors import LeantrainError
from leantrain.files import write_durable
from leantrain.tune.space import apply_params
from leantrain.tune.storage import open_storage, quiet_optuna, read_marker, storage_url

BEST_HEADER = "# leantrain tune: best trial"


@dataclass
class TrialRow:
    """One trial as `--show` prints it."""

    number: int
    state: str  # complete, pruned, fail, running, waiting
    values: list[float] | None
    params: dict[str, Any]
    attrs: dict[str, Any]
    reason: str = ""


@dataclass
class StudyResult:
    """A study's trials, its objectives, the best trial numbers (the Pareto front for several objectives),
    and the files written: best.toml and report.html."""

    study_dir: Path
    study_name: str
    objectives: list[str]
    trials: list[TrialRow]
    best: list[int]
    best_toml: Path | None = None
    report: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def row(self, number: int) -> TrialRow:
        return next(t for t in self.trials if t.number == number)


def _reason(t: Any, retried_by: dict[int, int]) -> str:
    state = t.state.name.lower()
    if state == "pruned":
        return t.user_attrs.get("pruned_reason", "pruned")
    if state == "fail":
        why = t.user_attrs.get("fail_reason") or "its worker died (killed, or its heartbeat stopped)"
        return why + (f"; retried as trial {retried_by[t.number]}" if t.number in retried_by else "")
    if "failed_trial" in t.system_attrs:
        return f"retry of trial {t.system_attrs['failed_trial']}"
    return ""


def load_study(study_dir: str | Path, storage: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(Optuna study, base config, marker) of a study folder, read only."""
    optuna = quiet_optuna()
    study_dir = Path(study_dir)
    marker = read_marker(study_dir)
    cfg = load_config(study_dir / "config.toml")
    kept = marker.get("storage")
    if storage is None and kept and "***" in kept:
        raise LeantrainError(f"the storage of {study_dir} had a password, which leantrain does not keep; pass it "
                             "again with --storage")
    db = open_storage(storage_url(storage or kept, study_dir), cfg.tune.heartbeat_s, cfg.tune.max_retries)
    try:
        study = optuna.load_study(study_name=marker["study_name"], storage=db)
    except KeyError:
        raise LeantrainError(f"the storage of {study_dir} has no study named {marker['study_name']!r}") from None
    return study, cfg, marker


def summarize(study: Any, study_dir: Path, objectives: list[str]) -> StudyResult:
    """Every trial and the best ones, from the study's storage."""
    trials = study.get_trials(deepcopy=False)
    retried_by = {}
    for t in trials:
        for n in t.system_attrs.get("retry_history", []):
            retried_by[n] = t.number
    rows = [TrialRow(t.number, t.state.name.lower(), list(t.values) if t.values else None, dict(t.params),
                     dict(t.user_attrs), _reason(t, retried_by)) for t in trials]
    done = [r for r in rows if r.state == "complete"]
    if len(objectives) == 1:
        best = [min(done, key=lambda r: r.values[0]).number] if done else []
    else:
        best = sorted((t.number for t in study.best_trials), key=lambda n: next(r.values for r in rows
                                                                                 if r.number == n)) if done else []
    return StudyResult(study_dir, study.study_name, objectives, rows, best)


def write_best_toml(result: StudyResult, cfg: Any) -> Path | None:
    """best.toml: the study's config with the best trial's values (the front's lowest val loss for several
    objectives), train.steps = the trial budget it was measured at; `leantrain train best.toml` runs it."""
    if not result.best:
        return None
    row = result.row(result.best[0])
    trial_cfg = apply_params(cfg, row.params, trial_run=True)
    trial_cfg.log.progress = cfg.log.progress
    path = result.study_dir / "best.toml"
    if path.exists() and (path.is_symlink() or not path.read_text(errors="replace").startswith(BEST_HEADER)):
        raise LeantrainError(f"{path} exists and was not written by leantrain tune; move it away and run --show again")
    values = ", ".join(f"{k} = {v!r}" for k, v in row.params.items())
    objective = ", ".join(f"{w} {v:.6g}" for w, v in zip(result.objectives, row.values or [], strict=False))
    head = f"{BEST_HEADER} {row.number} of study {result.study_name!r} ({objective})\n# {values}\n\n"
    write_durable(path, head + to_toml(trial_cfg))
    return path


def show(study_dir: str | Path, storage: str | None = None, *, page: bool = True) -> StudyResult:
    """Read a study, write best.toml and (with `page`) report.html into its folder; returns what it found."""
    study, cfg, _ = load_study(study_dir, storage)
    result = summarize(study, Path(study_dir), tune_objectives(cfg.tune.objective))
    result.best_toml = write_best_toml(result, cfg)
    if page:
        from leantrain.tune.page import write_study_page

        result.report = write_study_page(result, study)
    return result
