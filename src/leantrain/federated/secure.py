"""Secure aggregation: one round through Flower's SecAgg+ protocol, so the server learns only the weighted sum
of the clients' weights, never one client's.

Flower 1.42 implements SecAgg+ for its workflow API only: `SecAggPlusWorkflow` (flwr/server/workflow/
secure_aggregation/secaggplus_workflow.py) is a fit workflow over a `LegacyContext` (a legacy `Strategy`, a
`ClientManager`, the global parameters in `context.state`), and the client half is the `secaggplus_mod`
around a legacy `Client`'s `fit`. The Message-API strategies the plain rounds use (flwr.serverapp.strategy)
have no SecAgg+ path. So this module drives the workflow one round at a time from leantrain's own round loop
(server.py keeps val_loss, checkpoints, resume and accounting the same for both paths): it puts the round
number and the global weights where the workflow reads them, calls it (setup, share keys, collect masked
vectors, unmask: four message exchanges), and takes the unmasked weighted average back. The client side is in
client.py (`secure_train`).

Each client uploads its weights scaled by its weight (tokens / `max_weight`), clipped to +-`secagg_clip` and
stochastically rounded to 2^22 levels, plus masks that cancel in the sum; the result differs from plain
FedAvg by that quantization (about 2 * secagg_clip / 2^22 per weight).
"""

from __future__ import annotations

import json
import time
from collections import Counter, OrderedDict
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from leantrain.config import Config
from leantrain.federated.client import NAMES_KEY


def _config_bytes(record: ConfigRecord) -> int:
    """ConfigRecord.count_bytes's measure (keys, 8 bytes a number, strings and bytes by length), which in Flower
    1.42 fails on the empty lists the unmask stage sends."""
    def size(v: Any) -> int:
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return len(v) if isinstance(v, str | bytes) else 1 if isinstance(v, bool) else 8

    return sum(len(k) + size(v) for k, v in record.items())


def content_bytes(content: RecordDict) -> int:
    """The payload of a message: arrays, metrics and configs (keys, masks and ciphertexts are config bytes)."""
    return sum(_config_bytes(r) if isinstance(r, ConfigRecord) else r.count_bytes() for r in content.values())


class CountingGrid:
    """A Grid that counts the payload bytes of every message, per node, each way (the workflow sends four
    rounds of messages; this is where they all pass)."""

    def __init__(self, grid: Any):
        self.grid = grid
        self.to_node: Counter[int] = Counter()
        self.from_node: Counter[int] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.to_node[m.metadata.dst_node_id] += content_bytes(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_content():
                self.from_node[r.metadata.src_node_id] += content_bytes(r.content)
        return replies


class RecordingFedAvg(FedAvg):
    """Flower's legacy FedAvg that also keeps what the round sampled and the replies it aggregated (the
    workflow hands `aggregate_fit` every reply with the unmasked average in place of its weights)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.fit_config: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.sampled, self.results, self.aggregated = 0, [], False

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        self.on_fit_config_fn = lambda _: dict(self.fit_config)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = len(instructions)
        return instructions

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        self.results, self.aggregated = results, True
        return super().aggregate_fit(server_round, results, failures)


class SecureAggregation:
    """SecAgg+ rounds on a Flower Grid; `close()` stops the thread that keeps the client list current."""

    def __init__(self, cfg: Config, grid: Any):
        f = cfg.federated
        per_round = f.clients_per_round or f.clients
        need = f.min_available or per_round
        self.strategy = RecordingFedAvg(fraction_fit=per_round / f.clients, fraction_evaluate=0.0,
                                        min_fit_clients=need, min_available_clients=need,
                                        fit_metrics_aggregation_fn=lambda _: {})  # server.py keeps the per-client ones
        bare = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(bare, strategy=self.strategy)
        # a client's weight is its tokens / max_weight: the most a client can train on in a round, so it is <= 1
        # (no overflow) and, all clients equal, exactly 1 (no loss of precision)
        max_weight = f.local_steps * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.seq_len
        self.workflow = SecAggPlusWorkflow(num_shares=f.secagg_shares or 1.0,
                                           reconstruction_threshold=f.secagg_threshold or 2 / 3,
                                           max_weight=float(max_weight), clipping_range=f.secagg_clip,
                                           timeout=f.round_timeout)
        self.grid = CountingGrid(grid)
        self._thread, self._stop, registered = start_update_client_manager_thread(grid, self.context.client_manager)
        registered.wait()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def round(self, rnd: int, arrays: ArrayRecord, config: dict[str, Any]) -> dict[str, Any]:
        """One SecAgg+ round from the global `arrays`: {new (ArrayRecord or None when the protocol halted),
        replies [(node id, metrics)], sampled, bytes_to {node: n}, bytes_from {node: n}}."""
        names = list(arrays.keys())
        self.strategy.fit_config = {**config, NAMES_KEY: json.dumps(names)}
        self.strategy.reset()
        self.grid.to_node.clear()
        self.grid.from_node.clear()
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd,
                                                                  Key.START_TIME: time.perf_counter()})
        state.array_records[MAIN_PARAMS_RECORD] = arrays
        self.workflow(self.grid, self.context)
        new = None
        if self.strategy.aggregated and self.strategy.results:
            unnamed = state.array_records[MAIN_PARAMS_RECORD]  # keys "0", "1", ... in the order sent
            new = ArrayRecord(OrderedDict(zip(names, unnamed.values(), strict=True)))
        replies = [(proxy.node_id, dict(res.metrics)) for proxy, res in self.strategy.results]
        return {"new": new, "replies": replies, "sampled": self.strategy.sampled,
                "bytes_to": dict(self.grid.to_node), "bytes_from": dict(self.grid.from_node)}
