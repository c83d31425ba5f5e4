"""The client side: a Flower ClientApp whose training is leantrain's own Trainer and train step.

Each train message carries the global weights and, in its config record, the run's resolved leantrain config
(TOML text), the round and where the client's partition lies. The client builds a Trainer on its partition
(same model, optimizer, precision and guard as `leantrain train`), loads the global weights, and takes
`federated.local_steps` train steps. The work is a pure function of (global weights, round, partition):
the optimizer starts fresh each round, the loader is placed at the round's first batch and the lr follows
the schedule over all rounds, so a round that is redone (server resumed, client restarted) gives the same
update. FedProx adds mu/2 * ||w - w_global||^2 to the loss through the Trainer's `loss_terms`.

With differential privacy on, Flower's `fixedclipping_mod` clips the update before it leaves the client.
With secure aggregation on (federated/secure.py), the server's messages are SecAgg+ stages: Flower's
`secaggplus_mod` answers them and, in the stage that collects masked vectors, calls the same local training
through a legacy `NumPyClient`, then masks its weights before they leave.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from leantrain.config import Config, load_config
from leantrain.federated.weights import exchanged, load_record, to_record
from leantrain.files import write_durable

CONFIG_KEY = "leantrain-config"
NAMES_KEY = "array-names"  # secure aggregation: the weights' names (legacy Parameters are a bare list)


def client_config(cfg: Config, data_path: str | Path, threads: int | None = None) -> Config:
    """The config a client trains with: the run's, on its own partition, with the schedule spanning all rounds."""
    f = cfg.federated
    train = dataclasses.replace(cfg.train, steps=f.rounds * f.local_steps, sample_tokens=0,
                                threads=cfg.train.threads if threads is None else threads)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path)), train=train,
                               log=dataclasses.replace(cfg.log, trackers=(), progress="none"))


def local_train(cfg: Config, data_path: str | Path, work_dir: str | Path, weights: ArrayRecord, server_round: int,
                proximal_mu: float = 0.0, threads: int | None = None,
                run_id: int | None = None) -> tuple[ArrayRecord, dict[str, Any]]:
    """Train the global `weights` for local_steps on the partition at `data_path`; returns the new weights and
    what it cost (tokens, mean loss, energy, seconds). `work_dir` holds the client Trainer's run files."""
    from leantrain.train.rundir import claim_run_dir
    from leantrain.train.trainer import Trainer

    t0 = time.perf_counter()
    ccfg = client_config(cfg, data_path, threads)
    f = cfg.federated
    first = (server_round - 1) * f.local_steps
    losses, skipped = [], 0
    lock = claim_run_dir(work_dir)  # before anything is written there; the Trainer below shares this claim
    progress = Path(work_dir) / "progress.json"  # which run and round this client is in, and its process (operators)
    where = {"run": run_id, "round": server_round, "pid": os.getpid()}
    write_durable(progress, json.dumps({**where, "local_step": 0}))
    with Trainer(ccfg, work_dir, resume=False) as trainer:
        load_record(trainer.model, weights, f.lora_only)
        state = trainer.loader.state_dict()
        trainer.loader.load_state_dict({**state, "step": first})
        trainer.step = first  # the lr schedule runs over all rounds
        if proximal_mu > 0:
            anchor = {n: p.detach().clone() for n, p in exchanged(trainer.model, f.lora_only).items()
                      if p.requires_grad}
            params = [(p, anchor[n]) for n, p in trainer.model.named_parameters() if n in anchor]

            def proximal() -> torch.Tensor:
                return proximal_mu / 2 * sum((p - w).pow(2).sum() for p, w in params)

            trainer.loss_terms.append(proximal)
        start_tokens = trainer.tokens
        for i in range(f.local_steps):
            result = trainer.train_step(trainer.loader.next_step())
            if result.skipped:
                skipped += 1
            else:
                losses.append(result.loss.item())
            write_durable(progress, json.dumps({**where, "local_step": i + 1, "of": f.local_steps}))
        energy = trainer.energy.summary()
        out = to_record(trainer.model, f.lora_only)
        tokens = trainer.tokens - start_tokens
    lock.release()
    metrics = {"tokens": tokens, "loss": sum(losses) / len(losses) if losses else float("nan"),
               "skipped_steps": skipped, "energy_j": float(energy.get("energy_j", 0.0)),
               "seconds": time.perf_counter() - t0}
    return out, metrics


def _where(config: Mapping[str, Any], context: Context) -> tuple[int, Path, Path]:
    """(partition id, partition dataset, work folder): from the supernode's --node-config when given
    (data-path, work-dir), else the run's partitions folder on a shared disk (simulation, local tests)."""
    node = context.node_config
    pid = int(node["partition-id"])
    data = Path(str(node["data-path"])) if "data-path" in node else Path(str(config["partitions"])) / f"client-{pid}"
    work = Path(str(node["work-dir"])) if "work-dir" in node else \
        Path(str(config["run-dir"])) / "clients" / f"client-{pid}"
    return pid, data, work


def _train_on(config: Mapping[str, Any], context: Context, received: ArrayRecord,
              server_round: int) -> tuple[ArrayRecord, dict[str, Any]]:
    """Local training as the server's config asks; returns the new weights and the reply's metrics."""
    cfg = load_config(overrides=tomllib.loads(str(config[CONFIG_KEY])))  # the server's resolved config
    pid, data, work = _where(config, context)
    threads = int(config["client-threads"]) if "client-threads" in config else None
    arrays, m = local_train(cfg, data, work, received, server_round, float(config.get("proximal-mu", 0.0)), threads,
                            run_id=context.run_id)
    return arrays, {
        "num-examples": int(m["tokens"]), "tokens": int(m["tokens"]), "loss": float(m["loss"]),
        "skipped-steps": int(m["skipped_steps"]), "energy-j": m["energy_j"], "seconds": m["seconds"],
        "partition-id": pid, "bytes-received": int(received.count_bytes()), "bytes-sent": int(arrays.count_bytes()),
    }


def _train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    arrays, metrics = _train_on(config, context, msg.content["arrays"], int(config["server-round"]))
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


class SecureClient(NumPyClient):
    """The legacy client SecAgg+ masks: `fit` is the same local training, on weights named by the server (legacy
    Parameters are a bare list) and returned in the same order."""

    def __init__(self, context: Context):
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        names = json.loads(str(config[NAMES_KEY]))
        received = ArrayRecord(torch_state_dict={n: torch.from_numpy(np.asarray(a)) for n, a in
                                                 zip(names, parameters, strict=True)})
        server_round = int(config["server-round"])
        arrays, metrics = _train_on(config, self.context, received, server_round)
        # SecAgg+ rounds each weight stochastically with numpy's global generator after this returns: seeded by
        # (round, client), a resumed federation masks and rounds exactly as the uninterrupted one did
        np.random.seed((server_round * 1_000_003 + int(metrics["partition-id"])) % 2**32)
        return arrays.to_numpy_ndarrays(), int(metrics["tokens"]), metrics


def secure_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ stage: Flower's mod runs the protocol; the masked-vector stage calls `SecureClient.fit`."""
    def legacy(m: Message, c: Context) -> Message:
        return handle_legacy_message_from_msgtype(lambda ctx: SecureClient(ctx).to_client(), m, c)

    return secaggplus_mod(msg, context, legacy)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's train entry: local training, with the update clipped by Flower when the server asks (DP), or
    a stage of the SecAgg+ protocol (secure aggregation)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secure_train(msg, context)
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, _train)
    return _train(msg, context)
