"""Mixture-of-experts: the sorted/grouped expert compute against an all-experts reference, the balance losses
on a hand-checked case, the loss-free bias, counts, decoding, and a real training run that resumes exactly."""

import dataclasses
import math
import re

import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain import api
from leantrain.config import ModelConfig
from leantrain.model import Transformer, generate, param_count
from leantrain.model import moe as moe_module
from leantrain.model.flops import active_param_count, ffn_hidden_dim, flops_per_token, matmul_params
from leantrain.model.moe import MoEFeedForward, MoETracker, reference_forward
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

BASE = ModelConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, seq_len=32, vocab_size=97, moe_experts=4,
                   moe_top_k=2, moe_hidden=24)


def moe_layer(**over) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(dataclasses.replace(BASE, **over))
    layer.reset_parameters(0.3, 0.3)  # large weights: routing far from uniform, outputs far from 0
    return layer


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "loop"])
@pytest.mark.parametrize("router, top_k, capacity, shared", [
    ("softmax", 1, 0.0, 0), ("softmax", 2, 0.0, 0), ("sigmoid", 1, 0.0, 0), ("sigmoid", 2, 0.0, 1),
    ("softmax", 2, 0.5, 0), ("sigmoid", 1, 0.75, 1),
])
def test_sorted_expert_compute_equals_all_experts_reference(monkeypatch, grouped, router, top_k, capacity, shared):
    if not grouped:
        monkeypatch.setattr(moe_module, "grouped_mm_available", lambda *a: False)
    elif not moe_module.grouped_mm_available("cpu", torch.float32):
        pytest.skip("this PyTorch has no CPU grouped matmul")
    layer = moe_layer(moe_router=router, moe_top_k=top_k, moe_capacity=capacity, moe_shared_experts=shared)
    x = torch.randn(3, 20, BASE.dim)
    out = layer(x)  # training mode: capacity applies
    ref = reference_forward(layer, x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert out.abs().mean() > 1e-2  # not two zeros agreeing
    dropped = layer.last["dropped"].item()
    assert (dropped > 0) == (capacity > 0)  # a capacity below 1 must drop some assignments
    layer.eval()  # dropless in eval whatever the capacity
    assert (layer(x) - reference_forward(layer, x)).abs().max().item() <= 1e-5


def test_switch_aux_and_z_loss_on_a_hand_checked_case():
    """2 experts, top-1, router logits [ln 3, 0] for 3 tokens and [0, ln 3] for 1: probabilities 3/4, 1/4.
    f = (3/4, 1/4), P = (5/8, 3/8): aux = 2 * (3/4 * 5/8 + 1/4 * 3/8) = 1.125; z = (ln 4)^2 per token."""
    layer = MoEFeedForward(dataclasses.replace(BASE, dim=8, moe_experts=2, moe_top_k=1))
    layer.reset_parameters(0.1, 0.1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 1] = math.log(3)
    x = torch.zeros(4, 8)
    x[:3, 0] = 1.0
    x[3, 1] = 1.0
    layer(x)
    assert layer.last["aux"].item() == pytest.approx(1.125, abs=1e-6)
    assert layer.last["z"].item() == pytest.approx(math.log(4) ** 2, abs=1e-6)
    assert layer.last["counts"].tolist() == [3.0, 1.0]
    assert layer.last["loss"].item() == pytest.approx(0.01 * 1.125 + 0.001 * math.log(4) ** 2, abs=1e-7)


def test_balanced_routing_has_aux_one_and_no_bias_loss():
    layer = moe_layer(moe_balance="bias")
    layer(torch.randn(64, BASE.dim))
    assert layer.aux_weight == 0.0  # bias balancing adds no aux loss, only the z-loss
    assert layer.last["loss"].item() == pytest.approx(0.001 * layer.last["z"].item(), rel=1e-6)


def test_bias_method_moves_load_toward_balance():
    layer = moe_layer(moe_balance="bias", moe_bias_rate=0.02, moe_top_k=1)
    with torch.no_grad():
        layer.router.weight[0, 0] += 2.0  # with feature 0 set to 1 below, expert 0 attracts most tokens
    tracker = MoETracker([layer])
    x = torch.randn(256, BASE.dim)
    x[:, 0] = 1.0

    def imbalance() -> float:
        layer(x)
        counts = layer.last["counts"]
        tracker.micro_batch_loss(True, 1)
        return (counts.max() / counts.mean()).item()

    before = imbalance()
    for _ in range(40):
        tracker.end_step()
        after = imbalance()
    assert before > 1.5 and after < before - 0.5
    assert layer.expert_bias[0] < 0 < layer.expert_bias[1:].max()
    assert "expert_bias" in layer.state_dict()  # saved with the weights: checkpoints carry it


def test_gradients_reach_router_and_every_used_expert():
    layer = moe_layer()
    x = torch.randn(2, 16, BASE.dim, requires_grad=True)
    out = layer(x)
    (out.square().mean() + layer.last["loss"]).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    used = layer.last["counts"] > 0
    assert used.any()
    for w in (layer.w1, layer.w2, layer.w3):
        per_expert = w.grad.flatten(1).abs().sum(1)
        assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()
    assert x.grad.abs().sum() > 0


def test_router_runs_in_float32_under_bf16_autocast():
    layer = moe_layer()
    x = torch.randn(2, 8, BASE.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores, _, gates = layer.route(x.view(-1, BASE.dim))
        out = layer(x)
    assert logits.dtype == scores.dtype == gates.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("over", [{}, {"moe_shared_experts": 1, "moe_every": 2, "moe_hidden": 0}, {"moe_experts": 0}])
def test_param_counts_match_the_module_and_flops_use_active(over):
    cfg = dataclasses.replace(BASE, **over)
    model = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    moe_layers = sum(isinstance(b.feed_forward, MoEFeedForward) for b in model.layers)
    assert moe_layers == (0 if not cfg.moe_experts else cfg.n_layers // cfg.moe_every)
    if cfg.moe_experts:
        expert = 3 * cfg.dim * model.layers[-1].feed_forward.hidden
        assert param_count(cfg) - active_param_count(cfg) == moe_layers * (cfg.moe_experts - cfg.moe_top_k) * expert
        dense = dataclasses.replace(cfg, moe_experts=0)
        # active FLOPs: the router and the top_k routed + shared experts a token uses, not all of them
        active_ffn = cfg.dim * cfg.moe_experts + (cfg.moe_top_k + cfg.moe_shared_experts) * expert
        dense_ffn = 3 * cfg.dim * ffn_hidden_dim(cfg)
        assert matmul_params(cfg) - matmul_params(dense) == moe_layers * (active_ffn - dense_ffn)
        assert flops_per_token(cfg) - flops_per_token(dense) == 6 * (matmul_params(cfg) - matmul_params(dense))
    else:
        assert active_param_count(cfg) == param_count(cfg)


def test_dense_model_has_no_moe_modules_and_moe_forward_returns_logits():
    dense = Transformer(dataclasses.replace(BASE, moe_experts=0))
    assert not any(isinstance(m, MoEFeedForward) for m in dense.modules())
    assert MoETracker.of(dense) is None
    moe = Transformer(BASE)
    idx = torch.randint(0, BASE.vocab_size, (2, 10))
    assert moe(idx).shape == (2, 10, BASE.vocab_size)


def test_greedy_generation_is_the_same_with_and_without_kv_cache():
    torch.manual_seed(1)
    model = Transformer(dataclasses.replace(BASE, moe_capacity=0.5))  # capacity never applies when decoding
    prompt = [3, 14, 15, 92, 65]
    cached = generate(model, prompt, 20, temperature=0, use_cache=True)
    plain = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 20


MOE = {"model__moe_experts": 4, "model__moe_top_k": 2, "model__moe_balance": "bias", "model__moe_bias_rate": 0.01,
       "model__moe_capacity": 1.25}


def test_moe_trains_through_the_api_and_resumes_exactly(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=4, train__eval_every=0, checkpoint__every=2, **MOE)
    api.train(cfg, tmp_path / "straight")
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 2))
    assert first.fit()["step"] == 2
    bias_at_2 = [b.clone() for n, b in first.model.named_buffers() if n.endswith("expert_bias")]
    assert any(b.abs().sum() > 0 for b in bias_at_2)  # the bias moved, so resuming must restore it
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.step == 2
    for restored, saved in zip([b for n, b in second.model.named_buffers() if n.endswith("expert_bias")], bias_at_2,
                               strict=True):
        assert torch.equal(restored, saved)
    second.fit()
    straight, resumed = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(
        tmp_path / "resumed" / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight] and len(straight) == 4
    last = straight[-1]
    for key in ("moe_aux", "moe_z", "moe_dropped", "moe_load_max_over_mean"):
        assert math.isfinite(last[key])
    assert len(last["moe_load"]) == 2 and all(len(row) == 4 for row in last["moe_load"])
    assert last["moe_load_max_over_mean"] >= 1.0 and 0 <= last["moe_dropped"] < 1
    # the report draws the load as a heat map: one cell per layer x expert x logged step, hover text = the value
    page = (tmp_path / "straight" / "report.html").read_text()
    assert "Expert load" in page and "Expert imbalance" in page
    cells = re.findall(r"<title>L(\d) e(\d) at (\d+): ([0-9.e-]+)</title>", page)
    assert len(cells) == 2 * 4 * len(straight)
    assert {(int(la), int(e), int(st)) for la, e, st, _ in cells} == {
        (la, e, r["step"]) for la in range(2) for e in range(4) for r in straight}
    la, e, st, v = cells[-1]
    assert float(v) == pytest.approx(straight[-1]["moe_load"][int(la)][int(e)], rel=1e-2, abs=1e-3)


def test_aux_loss_reaches_the_router_gradient(dataset, tmp_path):
    """The balance loss is added in the trainer's step: with a huge aux weight the router's gradient changes
    while the logged (language-model) loss does not."""
    grads, losses = [], []
    for weight in (0.0, 10.0):
        cfg = tiny_config(dataset, model__moe_experts=4, model__moe_aux_weight=weight, model__moe_z_weight=0.0)
        tr = Trainer(cfg, tmp_path / f"w{weight}", resume=False)
        batches = tr.loader.next_step()
        loss, _ = tr.forward_backward(batches)
        losses.append(loss.item())
        grads.append(tr.model.layers[0].feed_forward.router.weight.grad.clone())
        tr.close()
    assert losses[0] == losses[1]
    assert (grads[0] - grads[1]).abs().max() > 1e-4


def test_fsdp_two_ranks_match_single_process_with_the_bias_synced(dataset, tmp_path):
    """Two gloo ranks under FSDP2 on half the batch each: the loads are summed over ranks before the bias moves,
    so the biases, the routing and the losses are the single process's (dropless, bias balancing: the z-loss is
    a per-token mean, which data parallelism averages exactly)."""
    from test_distributed import make_cfg, records, torchrun

    over = {"train__steps": 6, "checkpoint__every": 0, "log__grad_health_every": 0, "model__moe_experts": 4,
            "model__moe_balance": "bias", "model__moe_bias_rate": 0.05}
    Trainer(make_cfg(dataset, **over), tmp_path / "single").fit()
    torchrun(make_cfg(dataset, train__micro_batch_size=4, **over), tmp_path / "fsdp")
    got, want = records(tmp_path / "fsdp"), records(tmp_path / "single")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), f"step {s}"
    assert want[6]["loss"] < want[1]["loss"]
