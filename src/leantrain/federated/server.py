"""The server side: a round loop over Flower's strategies, with leantrain's run directory around it.

The global model lives in a Trainer on the full dataset in the run directory, which gives the federation
what a training run has: the run lock, `metrics.jsonl` (one line per round, `step` = round, with the global
`val_loss` on the dataset's validation windows), `events.jsonl`, the energy meter of the server process and
a checkpoint of the global model after every round (`checkpoints/step-NNNNNNN`, step = round), which
`leantrain generate / evaluate / export` read as any run's. The loop is Flower's `Strategy.start` with a
start round: a server killed mid-federation is started again with the same command and goes on after the
last checkpointed round (the strategy's own state, FedAdam/FedYogi moments and the DP accountant, is kept
beside each checkpoint in `federated/round-NNNNNNN.*`).

Per round and per client the line records tokens, loss, energy and the bytes of weights each way (the
payload of the ArrayRecords; gRPC framing adds a little on the wire). With `federated.secure_aggregation` the
round's exchange goes through Flower's SecAgg+ workflow instead (secure.py; the bytes are then every message of
its four stages) and the rest of the round is the same. Replies are aggregated in partition
order and every random draw is seeded by the round, so with deterministic clients a resumed federation
gives the same numbers as one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from leantrain.config import Config, to_toml
from leantrain.errors import LeantrainError
from leantrain.federated import privacy
from leantrain.federated.client import CONFIG_KEY
from leantrain.federated.weights import load_record, to_record
from leantrain.files import write_durable


def make_strategy(cfg: Config, noise: float) -> Any:
    """The Flower strategy named by federated.strategy (wrapped for DP when `noise` > 0)."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

    f = cfg.federated
    per_round = f.clients_per_round or f.clients
    need = f.min_available or per_round
    common = {"fraction_train": per_round / f.clients, "fraction_evaluate": 0.0, "min_train_nodes": need,
              "min_available_nodes": need}
    if f.strategy == "fedprox":
        strategy = FedProx(proximal_mu=f.proximal_mu, **common)
    elif f.strategy in ("fedadam", "fedyogi"):
        cls = FedAdam if f.strategy == "fedadam" else FedYogi
        strategy = cls(eta=f.server_lr, eta_l=cfg.optim.lr, tau=f.server_tau, **common)
    else:
        strategy = FedAvg(**common)
    return privacy.wrap(strategy, f, noise) if noise > 0 else strategy


def _inner(strategy: Any) -> Any:
    return getattr(strategy, "strategy", strategy)


class FederatedServer:
    """Runs `cfg.federated.rounds` rounds on a Flower Grid into `run_dir`. `partitions` is the folder of the
    clients' token datasets (sent to clients that have no data-path of their own); `client_threads` caps the
    threads each client trains with (simulation, where clients share the machine)."""

    def __init__(self, cfg: Config, run_dir: str | Path, partitions: str | Path, client_threads: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.partitions = Path(partitions)
        self.client_threads = client_threads
        self.state_dir = self.run_dir / "federated"
        self.noise = privacy.noise_multiplier(cfg.federated)

    def run(self, grid: Grid) -> dict[str, Any]:
        """The federation; returns its summary (rounds, val_loss, tokens, bytes, epsilon, energy)."""
        from leantrain.train.trainer import Trainer

        cfg, f = self.cfg, self.cfg.federated
        server_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=f.rounds, sample_tokens=0))
        strategy = make_strategy(cfg, self.noise)
        with Trainer(server_cfg, self.run_dir, resume=True) as trainer, contextlib.ExitStack() as stack:
            start = trainer.step
            totals = self._restore(strategy, start) if start else {"bytes_sent": 0, "bytes_received": 0,
                                                                    "client_energy_j": 0.0}
            self._emit(trainer, "federated_start" if not start else "federated_resume", round=start,
                       strategy=f.strategy, clients=f.clients, rounds=f.rounds, noise_multiplier=self.noise,
                       secure_aggregation=f.secure_aggregation)
            secure = None
            if f.secure_aggregation:
                from leantrain.federated.secure import SecureAggregation

                secure = SecureAggregation(cfg, grid)
                stack.callback(secure.close)
            if not start:
                trainer.last_val_loss = trainer.evaluate()
                self._log(trainer, {"step": 0, "round": 0, "tokens": 0, "val_loss": trainer.last_val_loss})
            record: dict[str, Any] = {}
            for rnd in range(start + 1, f.rounds + 1):
                record = self._round(trainer, strategy, secure, grid, rnd, totals)
            summary = {"rounds": trainer.step, "val_loss": trainer.last_val_loss, "tokens": trainer.tokens,
                       "resumed_from_round": start, "noise_multiplier": self.noise,
                       "secure_aggregation": f.secure_aggregation, **totals,
                       **({"dp_epsilon": record.get("dp_epsilon"), "dp_delta": f.dp_delta} if self.noise else {})}
            summary["energy_j"] = totals["client_energy_j"] + float(trainer.energy.summary().get("energy_j", 0.0))
            self._emit(trainer, "end", **summary)
            for o in trainer.observers:
                o.on_end({"step": trainer.step, "tokens": trainer.tokens, "val_loss": trainer.last_val_loss})
        return summary

    # ---- one round -------------------------------------------------------------------------

    def _round(self, trainer: Any, strategy: Any, secure: Any, grid: Grid, rnd: int,
               totals: dict[str, Any]) -> dict[str, Any]:
        cfg, f = self.cfg, self.cfg.federated
        t0 = time.perf_counter()
        config = ConfigRecord({CONFIG_KEY: to_toml(cfg), "partitions": str(self.partitions.resolve()),
                               "run-dir": str(self.run_dir.resolve())})
        if self.client_threads:
            config["client-threads"] = self.client_threads
        random.seed(cfg.train.seed * 1_000_003 + rnd)  # which clients are sampled: the same again on resume
        arrays = to_record(trainer.model, f.lora_only)
        if secure is None:
            new, clients, failed, sent, received = self._exchange(trainer, strategy, grid, rnd, arrays, config)
        else:
            new, clients, failed, sent, received = self._secure_exchange(trainer, secure, rnd, arrays, config)
        if new is not None:
            load_record(trainer.model, new, f.lora_only)
        trainer.step = rnd
        tokens = sum(c["tokens"] for c in clients)
        trainer.tokens += tokens
        trainer.last_val_loss = trainer.evaluate()
        totals["bytes_sent"] += sent
        totals["bytes_received"] += received
        totals["client_energy_j"] += sum(c["energy_j"] for c in clients)
        weight = sum(c["tokens"] for c in clients)
        record = {
            "step": rnd, "round": rnd, "tokens": trainer.tokens, "round_tokens": tokens,
            "loss": sum(c["loss"] * c["tokens"] for c in clients) / weight if weight else None,
            "val_loss": trainer.last_val_loss, "clients_ok": len(clients), "clients_failed": failed,
            "bytes_sent": sent, "bytes_received": received, "round_s": round(time.perf_counter() - t0, 3),
            "client_energy_j": round(sum(c["energy_j"] for c in clients), 3), "clients": clients,
            **trainer.energy.read(rnd),
        }
        if self.noise:
            spent = strategy.privacy_spent()
            record["dp_epsilon"], record["dp_delta"] = float(spent.epsilon), float(spent.delta)
        self._log(trainer, record)  # before the checkpoint: a resume from the round before discards this line
        self._save_state(strategy, rnd, totals)
        trainer.save_checkpoint()
        return record

    def _exchange(self, trainer: Any, strategy: Any, grid: Grid, rnd: int, arrays: Any,
                  config: ConfigRecord) -> tuple[Any, list[dict[str, Any]], int, int, int]:
        """A round through a Message-API strategy: (new global arrays or None, client rows, failed, bytes sent,
        bytes received)."""
        f = self.cfg.federated
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        sent = sum(m.content["arrays"].count_bytes() for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=f.round_timeout))
        ok = sorted((r for r in replies if not r.has_error()),
                    key=lambda r: int(r.content["metrics"]["partition-id"]))
        for r in replies:
            if r.has_error():
                self._emit(trainer, "client_failed", round=rnd, node=r.metadata.src_node_id, message=r.error.reason)
        clients = [self._client_row(r.content["metrics"]) for r in ok]
        new = None
        if len(ok) >= f.min_replies:
            np.random.seed((self.cfg.train.seed * 1_000_003 + rnd) % 2**32)  # DP noise: the same again on resume
            new, _ = strategy.aggregate_train(rnd, ok)
        else:
            self._round_failed(trainer, rnd, len(ok))
        return new, clients, len(messages) - len(ok), sent, sum(c["bytes_sent"] for c in clients)

    def _secure_exchange(self, trainer: Any, secure: Any, rnd: int, arrays: Any,
                         config: ConfigRecord) -> tuple[Any, list[dict[str, Any]], int, int, int]:
        """A round through SecAgg+ (secure.py), returning what `_exchange` does; a client's bytes are all the
        protocol's messages to and from it."""
        f = self.cfg.federated
        fit_config = {**dict(config), "server-round": rnd}
        if f.strategy == "fedprox":
            fit_config["proximal-mu"] = f.proximal_mu
        out = secure.round(rnd, arrays, fit_config)
        clients = sorted(({**self._client_row(m), "bytes_received": out["bytes_to"].get(node, 0),
                           "bytes_sent": out["bytes_from"].get(node, 0)} for node, m in out["replies"]),
                         key=lambda c: c["client"])
        failed = out["sampled"] - len(clients)
        if failed:
            self._emit(trainer, "client_failed", round=rnd, clients=failed,
                       message=f"{failed} of {out['sampled']} sampled clients did not finish the SecAgg+ round")
        new = out["new"]
        if new is None or len(clients) < f.min_replies:
            new = None
            self._round_failed(trainer, rnd, len(clients))
        return new, clients, failed, sum(out["bytes_to"].values()), sum(out["bytes_from"].values())

    def _round_failed(self, trainer: Any, rnd: int, replies: int) -> None:
        f = self.cfg.federated
        self._emit(trainer, "round_failed", round=rnd, replies=replies, min_replies=f.min_replies,
                   message=f"round {rnd}: {replies} replies, fewer than federated.min_replies = {f.min_replies} (or "
                   "the SecAgg+ protocol halted); the global model stays as it was")

    @staticmethod
    def _client_row(m: Any) -> dict[str, Any]:
        loss = float(m["loss"])
        return {"client": int(m["partition-id"]), "tokens": int(m["tokens"]),
                "loss": loss if math.isfinite(loss) else None, "energy_j": float(m["energy-j"]),
                "seconds": round(float(m["seconds"]), 3), "bytes_received": int(m["bytes-received"]),
                "bytes_sent": int(m["bytes-sent"]), "skipped_steps": int(m["skipped-steps"])}

    # ---- records and resumable strategy state ----------------------------------------------

    @staticmethod
    def _log(trainer: Any, record: dict[str, Any]) -> None:
        for o in trainer.observers:
            o.on_step(record)

    @staticmethod
    def _emit(trainer: Any, kind: str, **fields: Any) -> None:
        for o in trainer.observers:
            o.on_event({"event": kind, "step": trainer.step, **fields})

    def _save_state(self, strategy: Any, rnd: int, totals: dict[str, Any]) -> None:
        """What the strategy carries between rounds, beside the round's checkpoint (written before it, so a
        checkpoint never lacks its state); older rounds' files are pruned like checkpoints."""
        from safetensors.numpy import save

        inner = _inner(strategy)
        state: dict[str, Any] = {"round": rnd, "totals": totals}
        if getattr(strategy, "accountant", None) is not None:
            state["accountant"] = strategy.accountant.state_dict()
        self.state_dir.mkdir(exist_ok=True)
        moments = {f"{kind}/{k}": v for kind in ("m_t", "v_t") for k, v in (getattr(inner, kind, None) or {}).items()}
        if moments:
            write_durable(self.state_dir / f"round-{rnd:07d}.safetensors", save(moments))
        write_durable(self.state_dir / f"round-{rnd:07d}.json", json.dumps(state))
        keep = {f"round-{r:07d}" for r in range(rnd - self.cfg.checkpoint.keep, rnd + 1)}
        for p in self.state_dir.glob("round-*"):
            if p.name.split(".")[0] not in keep:
                p.unlink(missing_ok=True)

    def _restore(self, strategy: Any, rnd: int) -> dict[str, Any]:
        """The strategy state and running totals of round `rnd` (the checkpoint the Trainer resumed from)."""
        from safetensors.numpy import load

        path = self.state_dir / f"round-{rnd:07d}.json"
        if not path.is_file():
            raise LeantrainError(f"{path} is missing, so the federation cannot resume exactly at round {rnd}; start "
                                 "a new run directory (--run-dir) or restore the file")
        state = json.loads(path.read_text())
        if "accountant" in state and getattr(strategy, "accountant", None) is not None:
            strategy.accountant.load_state_dict(state["accountant"])
        moments = self.state_dir / f"round-{rnd:07d}.safetensors"
        if moments.is_file():
            inner, tensors = _inner(strategy), load(moments.read_bytes())
            for kind in ("m_t", "v_t"):
                setattr(inner, kind, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(kind + "/")})
        return state["totals"]
