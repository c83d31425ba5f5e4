"""Start a federation: claim the run directory, write the clients' partitions, then run the rounds on
Flower's simulation engine (every client a virtual client on this machine, Ray actors) or, under the
deployment engine, on the Grid that `flwr run` hands the ServerApp (leantrain.federated.app)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from leantrain.config import Config
from leantrain.errors import LeantrainError
from leantrain.federated.partition import make_partitions
from leantrain.files import write_durable

PARTITIONS = "partitions"


def prepare_run(cfg: Config, run_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """Claim `run_dir` (lock held by the returned object; the server's Trainer in this process shares it) and
    make the partitions unless the same ones are there (a resumed run); returns (lock, partition record)."""
    from leantrain.train.rundir import claim_run_dir

    f = cfg.federated
    run_dir = Path(run_dir)
    lock = claim_run_dir(run_dir)
    out = run_dir / PARTITIONS
    want = {"scheme": f.partition, "alpha": f.alpha if f.partition == "dirichlet" else None, "seed": cfg.train.seed,
            "data": str(cfg.data.path)}
    done = out / "partitions.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if len(record.get("clients", [])) == f.clients and all(record.get(k) == v for k, v in want.items()):
            return lock, record
    record = make_partitions(cfg.data.path, out, f.clients, f.partition, cfg.train.seed, f.alpha, f.label_groups,
                             min_tokens=cfg.model.seq_len + 1)
    return lock, record


def simulate(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the federation on Flower's simulation engine; returns the server's summary with the partitions."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from leantrain.federated.client import client_app
    from leantrain.federated.server import FederatedServer

    f = cfg.federated
    run_dir = Path(run_dir)
    lock, partitions = prepare_run(cfg, run_dir)
    cores = os.cpu_count() or 1
    parallel = min(f.sim_parallel, f.clients_per_round or f.clients, cores)
    threads = max(1, cores // parallel)
    server = FederatedServer(cfg, run_dir, run_dir / PARTITIONS, client_threads=threads)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = server.run(grid)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread below
            outcome["error"] = e

    backend = {"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": False}}
    try:
        run_simulation(server_app, client_app, num_supernodes=f.clients, backend_config=backend)
    finally:
        lock.release()
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise LeantrainError(f"the Flower simulation ended without finishing the federation; see the log above and "
                             f"{run_dir / 'events.jsonl'}, then run the same command again to resume")
    return finish(run_dir, outcome["summary"], partitions)


def finish(run_dir: Path, summary: dict[str, Any], partitions: dict[str, Any]) -> dict[str, Any]:
    """Write federated.json (summary + partition sizes and skew) and report.html; returns the summary."""
    result = {**summary, "partitions": partitions}
    write_durable(run_dir / "federated.json", json.dumps(result, indent=1) + "\n")
    try:
        from leantrain.report import write_report

        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the federation is saved; the report can be rebuilt
        result["warnings"] = [f"report.html not written ({type(e).__name__}: {e}); retry: leantrain report {run_dir}"]
    return result
