"""LAMB, Lion, Muon, schedule-free AdamW, the schedules and the lr finder.

Each optimizer's update is checked against the paper's formulas worked out with Python floats on
tiny tensors; each one's state must survive a checkpoint so that a resumed run is bit-identical.
"""

import json
import math

import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain.cli import main
from leantrain.config import ModelConfig, OptimConfig, load_config
from leantrain.errors import ConfigError
from leantrain.model import Transformer
from leantrain.train.checkpoint import read_checkpoint
from leantrain.train.lr_find import lr_find, smooth, suggest
from leantrain.train.optim import build_optimizer, lr_at, muon_param_groups
from leantrain.train.optimizers import Lamb, Lion, Muon, ScheduleFreeAdamW, newton_schulz
from leantrain.train.optimizers.muon import NS_COEFFICIENTS
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

NEW = ["lamb", "lion", "muon", "schedule_free_adamw"]


def sign(x):
    return (x > 0) - (x < 0)


def step_with(opt, p, grad):
    p.grad = torch.tensor(grad, dtype=p.dtype).reshape(p.shape)
    opt.step()


# ---- updates against hand-computed references ------------------------------------------------

def test_lion_matches_hand_computed_steps():
    lr, wd, b1, b2 = 0.1, 0.5, 0.9, 0.99
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    w, m = [1.0, -2.0, 0.5, 3.0], [0.0] * 4
    for g in ([0.5, -0.1, 0.0, 2.0], [-1.0, 0.3, 0.2, -0.01]):
        step_with(opt, p, g)
        w = [wi * (1 - lr * wd) - lr * sign(b1 * mi + (1 - b1) * gi) for wi, mi, gi in zip(w, m, g, strict=True)]
        m = [b2 * mi + (1 - b2) * gi for mi, gi in zip(m, g, strict=True)]
        torch.testing.assert_close(p.detach(), torch.tensor(w))
    # second step, last coordinate: momentum 0.02 outweighs the new gradient -0.01, so it still moves down
    assert w[3] == pytest.approx((3.0 * 0.95 - 0.1) * 0.95 - 0.1)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(m))


def test_lamb_matches_hand_computed_step_with_trust_ratio():
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-6
    w0 = [3.0, 4.0, 0.0, 0.0]  # ||w|| = 5
    p = torch.nn.Parameter(torch.tensor(w0).reshape(2, 2))
    opt = Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    g = [0.2, -0.4, 1.0, 0.0]
    step_with(opt, p, g)
    # step 1: bias-corrected moments are g and g^2, so Adam's step is g/(|g| + eps)
    u = [gi / (abs(gi) + eps) + wd * wi for gi, wi in zip(g, w0, strict=True)]
    trust = 5.0 / math.sqrt(sum(x * x for x in u))
    want = [wi - lr * trust * ui for wi, ui in zip(w0, u, strict=True)]
    torch.testing.assert_close(p.detach().flatten(), torch.tensor(want))
    assert trust == pytest.approx(5.0 / math.sqrt((1 + 0.03) ** 2 + (1 - 0.04) ** 2 + 1), rel=1e-5)


def test_lamb_zero_weights_take_a_plain_adam_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lamb([p], lr=0.1)
    step_with(opt, p, [1.0, -2.0, 0.0])
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, 0.0]), rtol=1e-5, atol=1e-6)


def ns_scalar(s, steps):
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def test_newton_schulz_on_a_diagonal_matrix_is_the_quintic_per_singular_value():
    # diag(3, 4) padded to 2x3: singular values 3 and 4, normalised by the Frobenius norm 5
    g = torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]])
    want = torch.tensor([[ns_scalar(0.6, 5), 0.0, 0.0], [0.0, -ns_scalar(0.8, 5), 0.0]])
    torch.testing.assert_close(newton_schulz(g, 5), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(newton_schulz(g.T, 5), want.T, rtol=1e-5, atol=1e-6)  # tall: transposed path
    assert 0.6 < ns_scalar(0.6, 5) < 1.2 and 0.6 < ns_scalar(0.8, 5) < 1.2  # orthogonal-ish, not exact


def test_muon_matches_hand_computed_nesterov_steps():
    lr, beta, wd = 0.02, 0.95, 0.1
    p = torch.nn.Parameter(torch.ones(3, 2))  # tall: the update is scaled by sqrt(3/2)
    opt = Muon([{"params": [p], "use_muon": True, "lr_scale": 2.0, "weight_decay": wd}], lr=lr / 2,
               momentum=beta)
    w = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    buf = [0.0, 0.0]  # the diagonal entries; the rest stay 0
    for g in ([3.0, 4.0], [-1.0, 2.0]):
        step_with(opt, p, [[g[0], 0.0], [0.0, g[1]], [0.0, 0.0]])
        buf = [b + (1 - beta) * (gi - b) for b, gi in zip(buf, g, strict=True)]
        upd = [gi + beta * (b - gi) for b, gi in zip(buf, g, strict=True)]
        fro = math.sqrt(sum(u * u for u in upd))
        ortho = [math.copysign(ns_scalar(abs(u) / fro, 5), u) for u in upd]
        w = [[x * (1 - lr * wd) for x in row] for row in w]
        w[0][0] -= lr * math.sqrt(1.5) * ortho[0]
        w[1][1] -= lr * math.sqrt(1.5) * ortho[1]
        torch.testing.assert_close(p.detach(), torch.tensor(w), rtol=1e-5, atol=1e-6)


def test_muon_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "use_muon": False, "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(5, 4)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(3))])


def test_schedule_free_matches_the_papers_recursion_and_switches_weights():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    p = torch.nn.Parameter(torch.tensor([1.0, -0.5]))
    opt = ScheduleFreeAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    # Defazio et al.: y = (1-b1) z + b1 x; z' = z - lr*step(y); x' = (1-c) x + c z' with c = lr^2 / sum lr^2
    z, x, v = [1.0, -0.5], [1.0, -0.5], [0.0, 0.0]
    lr_sq_sum = 0.0
    for t, g in enumerate(([0.3, -0.2], [0.1, 0.4], [-0.5, 0.05]), 1):
        y = [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x, strict=True)]
        step_with(opt, p, g)
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        s = [gi / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * yi for gi, vi, yi in zip(g, v, y, strict=True)]
        z = [zi - lr * si for zi, si in zip(z, s, strict=True)]
        lr_sq_sum += lr * lr
        c = lr * lr / lr_sq_sum
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z, strict=True)]
        y = [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x, strict=True)]
        torch.testing.assert_close(p.detach(), torch.tensor(y))
    opt.eval()
    torch.testing.assert_close(p.detach(), torch.tensor(x))
    opt.eval()  # idempotent
    torch.testing.assert_close(p.detach(), torch.tensor(x))
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    torch.testing.assert_close(p.detach(), torch.tensor(y))


# ---- wiring: config, parameter groups --------------------------------------------------------

def tiny_model(**over):
    return Transformer(ModelConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=2, seq_len=8, vocab_size=64, **over))


def test_muon_takes_hidden_matrices_only():
    model = tiny_model(tie_embeddings=False)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    muon = [names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adam = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert sorted(muon) == sorted(n for n in names.values() if n.startswith("layers.") and n.endswith("w1.weight")
                                  or n.split(".")[-2] in ("wq", "wk", "wv", "wo", "w2", "w3"))
    assert "output.weight" in adam and "tok_embeddings.weight" in adam and "norm.weight" in adam
    assert [g["lr_scale"] for g in opt.param_groups if g["use_muon"]] == [pytest.approx(20.0)]
    assert sum(len(g["params"]) for g in muon_param_groups(tiny_model(), 0.1, 1.0)) == len(list(
        tiny_model().parameters()))


@pytest.mark.parametrize("name, cls", [("lamb", Lamb), ("lion", Lion), ("muon", Muon),
                                       ("schedule_free_adamw", ScheduleFreeAdamW)])
def test_config_names_build_their_optimizer(name, cls):
    cfg = load_config(overrides=[f"--optim.name={name}"]).optim
    assert isinstance(build_optimizer(tiny_model(), cfg, torch.device("cpu")), cls)


def test_defaults_stay_adamw_cosine_and_bad_names_are_config_errors():
    cfg = OptimConfig()
    assert (cfg.name, cfg.schedule, cfg.wsd_shape) == ("adamw", "cosine", "linear")
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(overrides=["--optim.name=sgd"])
    with pytest.raises(ConfigError, match="optim.wsd_shape"):
        load_config(overrides=["--optim.wsd_shape=exp"])


# ---- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_shapes(shape, mid):
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, wsd_shape=shape)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[:80] == [1.0] * 80
    assert lrs[89] == pytest.approx(mid)  # halfway through the 20 decay steps
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_inverse_sqrt_after_warmup():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="inverse_sqrt")
    assert [lr_at(s, 100, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(15, 100, cfg) == pytest.approx(0.5)  # sqrt(4/16)
    assert lr_at(99, 100, cfg) == pytest.approx(0.2)


# ---- checkpoints: exact resume for every new optimizer -----------------------------------------

def losses(run_dir):
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.parametrize("name", NEW)
def test_resume_is_bit_exact(dataset, tmp_path, name):
    over = {"optim__name": name, "train__steps": 8, "train__eval_every": 2, "checkpoint__every": 4}
    over["optim__lr"] = {"lion": 3e-4, "lamb": 2e-2}.get(name, 3e-3)  # LAMB steps are relative to |w|
    cfg = tiny_config(dataset, **over)
    Trainer(cfg, tmp_path / "straight").fit()
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 4))
    assert first.fit()["step"] == 4
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.step == 4 and second.optimizer.state  # optimizer state came back
    second.fit()
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "straight")
    assert got == want and len(want) == 8
    assert want[8][0] < want[1][0]  # it trains


def test_schedule_free_evaluates_and_saves_the_averaged_weights(dataset, tmp_path):
    cfg = tiny_config(dataset, optim__name="schedule_free_adamw", optim__schedule="constant", train__steps=6)
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit()
    y = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000006").model
    tr.optimizer.eval()
    x = dict(tr.model.named_parameters())
    name = "layers.0.attention.wq.weight"
    torch.testing.assert_close(saved[name], x[name].detach())
    assert not torch.equal(saved[name], y[name])
    assert tr.evaluate() == pytest.approx(tr.last_val_loss)  # the logged val loss is x's


# ---- lr finder --------------------------------------------------------------------------------

def test_suggestion_is_steepest_descent_before_the_minimum():
    lrs = [10 ** (-4 + i / 10) for i in range(40)]
    # flat, then falls fastest around index 15, minimum at 30, then rises
    curve = [5 - 3 / (1 + math.exp(-(i - 15) / 2)) + (0.05 * (i - 30) ** 2 if i > 30 else 0) for i in range(40)]
    s = suggest(lrs, curve)
    assert s["steepest"] == pytest.approx(lrs[15])
    assert s["min_loss_div10"] == pytest.approx(lrs[30] / 10)
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0


def test_lr_find_stops_on_divergence_and_writes_its_record(dataset, tmp_path):
    cfg = tiny_config(dataset, train__micro_batch_size=2)
    r = lr_find(cfg, tmp_path / "find", min_lr=1e-4, max_lr=1e3, steps=40)
    assert r["steps_run"] < 40 and ("diverged" in r["stopped"] or "finite" in r["stopped"])
    on_disk = json.loads((tmp_path / "find" / "lr_find.json").read_text())
    assert on_disk["suggested"] == r["suggested"] and 1e-4 <= r["suggested"] < 1e3
    assert r["plot"] and (tmp_path / "find" / "lr_find.png").stat().st_size > 1000


def test_lr_find_cli(dataset, tmp_path, capsys):
    code = main(["lr-find", "--steps", "8", "--min-lr", "1e-4", "--max-lr", "1e-2", "--out", str(tmp_path / "f"),
                 "--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2",
                 "--model.seq_len=32", "--model.vocab_size=512", f"--data.path={dataset}",
                 "--train.micro_batch_size=2", "--log.progress=none", "--precision.dtype=fp32"])
    out = capsys.readouterr().out
    assert code == 0 and "suggested lr" in out and (tmp_path / "f" / "lr_find.json").is_file()
    assert main(["lr-find", "--min-lr", "1", "--max-lr", "0.1", f"--data.path={dataset}"]) == 2


# ---- batch-size warmup ------------------------------------------------------------------------------

def test_batch_size_warmup_grows_linearly_from_one_sequence_to_the_micro_batch():
    from leantrain.train.optim import batch_size_at

    assert [batch_size_at(s, 4, 8) for s in range(6)] == [2, 4, 6, 8, 8, 8]
    assert [batch_size_at(s, 10, 4) for s in range(11)] == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4]
    assert [batch_size_at(s, 0, 4) for s in range(2)] == [4, 4]  # off


def test_batch_size_warmup_trains_on_a_prefix_of_each_step_and_resumes_exactly(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=8, train__eval_every=4, checkpoint__every=3,
                      train__batch_warmup_steps=4, train__grad_accum_steps=2)
    straight = Trainer(cfg, tmp_path / "straight")
    assert straight.guard.warmup_steps == 4  # the small batches stay out of the guard's spike history
    straight.fit()
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 2))  # stopped inside the warmup
    assert first.fit()["step"] == 2
    second = Trainer(cfg, tmp_path / "resumed")
    second.fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    # tokens per step: 2 micro-batches of 1, 2, 3, 4 sequences of 64 tokens, then 4 from step 4 on
    tokens = [r["tokens"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    per_step = [b - a for a, b in zip([0, *tokens[:-1]], tokens, strict=True)]
    assert per_step == [2 * k * 64 for k in (1, 2, 3, 4, 4, 4, 4, 4)]
    # a warm-up step trains on the first sequences of the full step's windows: its loss is theirs
    plain = Trainer(tiny_config(dataset, train__steps=8, train__grad_accum_steps=2), tmp_path / "plain")
    (x0, y0), (x1, y1) = plain.loader.next_step()
    with torch.no_grad():
        want = (plain.model(x0[:1], y0[:1], reduction="sum") + plain.model(x1[:1], y1[:1], reduction="sum")) / 128
    assert losses(tmp_path / "straight")[1][0] == pytest.approx(want.item(), rel=1e-5)
    plain.close()
