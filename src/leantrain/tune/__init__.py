"""Hyperparameter search on Optuna (`leantrain tune`, docs/tune.md): each trial a normal leantrain run, pruned
at its evaluations, studies stored in SQLite or PostgreSQL so that several workers share them and a killed
worker's trial is retried from its checkpoint.

    space.py    the [tune] space: parsed, checked, suggested, applied to a config
    storage.py  the study folder (marker, lock) and Optuna's RDB storage with heartbeats
    trial.py    one trial: the objective and the observer that reports evals and prunes
    study.py    create/join a study, the worker loop, K worker processes
    results.py  trials, best trial / Pareto front, best.toml
    page.py     the study's report.html
"""
