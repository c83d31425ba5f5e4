"""Expert parallelism on real processes: two gloo ranks (torchrun), each holding 2 of a MoE layer's 4 experts,
tokens exchanged by all-to-all, FSDP2 over the rest, against the single process on the same global batch.

The Switch loss uses the global batch's load and the expert gradients are averaged like FSDP2's, so the loss
curve, gradient norms and weights are the single process's within float rounding; checkpoints hold the whole
experts (gathered from both ranks) and resume in one process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from leantrain.config import load_config
from leantrain.errors import ConfigError
from leantrain.train.trainer import Trainer
from test_distributed import make_cfg, records, torchrun

MOE = {"model__moe_experts": 4, "model__moe_top_k": 2, "model__moe_hidden": 32, "model__moe_aux_weight": 0.1,
       "model__moe_z_weight": 0.01, "train__steps": 6, "checkpoint__every": 3}


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def assert_same(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), f"step {s}"
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4), f"step {s}"
        # logged from rank 0: its tokens' router probabilities against the global load (the gradient is exact)
        assert got[s]["moe_aux"] == pytest.approx(want[s]["moe_aux"], rel=5e-3), f"step {s}"


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """The one-process run (micro-batch 8, checkpoints at steps 3 and 6) the expert-parallel runs must match."""
    run = tmp_path_factory.mktemp("moe-single") / "run"
    with pytest.MonkeyPatch.context() as mp:  # conftest's per-test cache dir is not set up yet here
        mp.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        Trainer(make_cfg(dataset, **MOE), run).fit()
    return run


def test_two_expert_parallel_ranks_match_one_process_and_resume_in_it(dataset, single, tmp_path):
    ep = tmp_path / "ep"
    torchrun(make_cfg(dataset, train__micro_batch_size=4, parallel__ep=2, **MOE), ep)
    plan = json.loads((ep / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "fsdp+ep" and plan["parallel"]["ep"] == 2
    got, want = records(ep), records(single)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert_same(got, want, range(1, 7))
    assert want[6]["loss"] < want[1]["loss"]
    assert got[6]["val_loss"] == pytest.approx(want[6]["val_loss"], rel=1e-5)
    for block, norm in want[6]["grad_norms"].items():  # per-block norms reach across the experts' ranks too
        assert got[6]["grad_norms"][block] == pytest.approx(norm, rel=1e-4), block
    # the checkpoint holds every expert, gathered from both ranks, equal to the single process's weights
    a, b = weights(ep, 6), weights(single, 6)
    assert sorted(a) == sorted(b) and a["layers.0.feed_forward.w1"].shape[0] == 4
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # the expert-parallel step-3 checkpoint resumes in one process (ep = 1) onto the same curve
    shutil.rmtree(ep / "checkpoints" / "step-0000006")
    cfg = load_config(ep / "config.toml", overrides={"train": {"micro_batch_size": 8}, "parallel": {"ep": 1}})
    resumed = Trainer(cfg, ep)
    assert resumed.step == 3
    resumed.fit()
    assert_same(records(ep), want, range(4, 7))


def test_ep_must_divide_the_experts_and_the_world(dataset, tmp_path):
    with pytest.raises(ConfigError, match="parallel.ep = 3 does not divide model.moe_experts = 4"):
        make_cfg(dataset, parallel__ep=3, **MOE)
    with pytest.raises(ConfigError, match="model.moe_experts = 0"):
        make_cfg(dataset, parallel__ep=2)
    with pytest.raises(ConfigError, match="parallel.ep = 2 does not divide the world size 1"):
        Trainer(make_cfg(dataset, parallel__ep=2, **MOE), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_four_ranks_in_two_expert_groups_match_one_process(dataset, single, tmp_path):
    """ep = 2 of 4 ranks: two expert groups, each expert on two ranks whose gradients are summed (in the same
    parameter order on every rank: a set's order once paired w1 of one rank with w3 of another)."""
    run = tmp_path / "ep2x2"
    torchrun(make_cfg(dataset, train__micro_batch_size=2, parallel__ep=2, **dict(MOE, checkpoint__every=0)), run,
             nproc=4)
    assert_same(records(run), records(single), range(1, 7))


def test_planner_holds_total_params_computes_active_and_adds_the_all_to_all():
    """An 8-expert top-2 MoE on 4 GPUs: memory of all experts (split over ep under expert parallelism, the rest
    over FSDP2), compute of the active ones, and the all-to-all as exposed communication."""
    from leantrain.model.flops import active_param_count, flops_per_token, moe_hidden_dim, param_count
    from leantrain.plan.catalog import get_hardware
    from leantrain.plan.memory import routed_expert_params
    from leantrain.plan.planner import all_to_all_seconds, config_layout, estimate

    model = {"n_layers": 4, "dim": 512, "n_heads": 8, "n_kv_heads": 8, "seq_len": 1024, "vocab_size": 32000,
             "moe_experts": 8, "moe_top_k": 2}
    hw = get_hardware("h100")
    cfgs = {ep: load_config(overrides={"model": model, "parallel": {"ep": ep}, "precision": {"dtype": "bf16"},
                                       "train": {"micro_batch_size": 4}}) for ep in (1, 2, 4)}
    m = cfgs[1].model
    n, active, experts = param_count(m), active_param_count(m), routed_expert_params(m)
    assert active < n and experts == 4 * 3 * 512 * moe_hidden_dim(m) * 8
    dense = dict(model, moe_experts=0)
    assert flops_per_token(m) == pytest.approx(flops_per_token(load_config(overrides={"model": dense}).model),
                                               rel=0.05)  # active FLOPs: the dense model's, not 4x them
    est = {ep: estimate(c, hw, config_layout(c, hw, 4)) for ep, c in cfgs.items()}
    assert est[1].memory["weights"] == pytest.approx(4 * n / 4)  # FSDP2 over 4: every expert, sharded
    assert est[2].memory["weights"] == pytest.approx(4 * ((n - experts) / 4 + experts / 2))
    assert est[4].memory["weights"] == pytest.approx(est[1].memory["weights"])
    assert est[1].compute_s == est[2].compute_s  # the same active FLOPs
    a2a = {ep: all_to_all_seconds(m, hw, est[ep].layout) for ep in est}
    assert a2a[1] == 0 and 0 < a2a[2] < a2a[4]
    rows = 4 * 1024 * 2  # micro-batch x seq_len x top_k
    assert a2a[2] == pytest.approx(4 * 4 * rows * 512 * 2 * (1 / 2) / hw.link_bytes_s)
    assert est[2].layout.strategy == "FSDP2+EP2"
    with pytest.raises(ConfigError, match="parallel.ep = 4 does not divide 2 devices"):
        config_layout(cfgs[4], hw, 2)
