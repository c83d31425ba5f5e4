"""Pruning (one-shot and gradual) and knowledge distillation on real tiny models and real data."""

import dataclasses
import json
import shutil

import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain import api
from leantrain.compress.prune import apply_pruning
from leantrain.config import ModelConfig
from leantrain.errors import ConfigError
from leantrain.model import Transformer, generate, param_count
from leantrain.model.sparsity import cubic_sparsity, is_two_four, prunable_weights
from leantrain.train.distill import Distiller
from leantrain.train.pruning import MASKS_FILE
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

BASE = ModelConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, seq_len=16, vocab_size=97)


def model_of(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kv,arch", [(2, "llama"), (4, "llama"), (2, "qwen2"), (4, "gpt2")])
def test_structured_pruning_is_the_masked_model_made_smaller(kv, arch):
    """The smaller model computes exactly what the big one does with the dropped heads' output columns and the
    dropped channels' down-projection columns zeroed: the right slices were cut, and nothing else changed."""
    cfg = dataclasses.replace(BASE, n_kv_heads=kv, arch=arch)
    big = model_of(cfg)
    heads = 0.0 if arch == "gpt2" else 0.5
    small, small_cfg, info = apply_pruning(model_of(cfg), cfg, "prune-structured",
                                           {"heads_fraction": heads, "channels_fraction": 0.5}, None)
    assert info["params_after"] == param_count(small_cfg) == sum(p.numel() for p in small.parameters())
    assert info["params_after"] < info["params_before"] == param_count(cfg)
    assert small_cfg.n_heads == (4 if arch == "gpt2" else 2) and small_cfg.ffn_dim == info["ffn_dim"][1]
    assert small_cfg.n_kv_heads == (2 if kv == 2 else small_cfg.n_heads)
    hd = 32 // 4
    with torch.no_grad():
        for i, layer in enumerate(big.layers):
            dropped = sorted(set(range(4)) - set(info["heads_kept"][i]))
            for h in dropped:
                layer.attention.wo.weight[:, h * hd:(h + 1) * hd] = 0
            w2 = layer.feed_forward.w2.weight
            kept_cols = {tuple(c.tolist()) for c in small.layers[i].feed_forward.w2.weight.T}
            for j in range(w2.size(1)):
                if tuple(w2[:, j].tolist()) not in kept_cols:
                    w2[:, j] = 0
        x = torch.randint(0, 97, (2, 16))
        torch.testing.assert_close(small(x), big(x), rtol=1e-4, atol=1e-5)
    assert len(generate(small, [1, 2, 3], 5, temperature=0)) == 5


def test_taylor_scores_use_calibration_batches():
    cfg = BASE
    batches = [torch.randint(0, 97, (2, 17)) for _ in range(2)]
    _, small_cfg, info = apply_pruning(model_of(cfg), cfg, "prune-structured",
                                       {"heads_fraction": 0.5, "channels_fraction": 0.25, "score": "taylor"}, batches)
    assert info["score"] == "taylor" and small_cfg.n_heads == 2
    with pytest.raises(ConfigError, match="calibration"):
        apply_pruning(model_of(cfg), cfg, "prune-structured", {"score": "taylor"}, None)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeros_half_of_the_block_linears(scope):
    model = model_of(BASE)
    emb = model.tok_embeddings.weight.clone()
    _, cfg, info = apply_pruning(model, BASE, "prune-magnitude", {"sparsity": 0.5, "scope": scope}, None)
    assert cfg == BASE and info["sparsity"]["all"] == pytest.approx(0.5, abs=1e-4)
    per_layer = [v for k, v in info["sparsity"].items() if k != "all"]
    assert len(per_layer) == 2 * 7 and (scope == "global" or all(v == pytest.approx(0.5, abs=1e-3) for v in per_layer))
    assert torch.equal(model.tok_embeddings.weight, emb)  # the (tied) embedding and output head stay dense
    assert info["params_after"] == info["params_before"] > info["nonzero_params_after"]


def test_two_four_pattern_and_honest_kernel_note():
    model = model_of(BASE)
    _, _, info = apply_pruning(model, BASE, "prune-2:4", {}, None)
    assert all(is_two_four(w != 0) for w in prunable_weights(model).values())
    assert info["sparsity"]["all"] == pytest.approx(0.5) and info["accelerated"] is False
    if not torch.cuda.is_available():
        assert "CPU" in info["kernel"]


@pytest.mark.parametrize("options,match", [({"sparsity": 1.0}, "sparsity"), ({"heads_fraction": 0.8}, "leaves none"),
                                           ({"channels_fraction": -0.1}, "channels_fraction"),
                                           ({"score": "random"}, "score")])
def test_bad_pruning_options_are_one_line_errors(options, match):
    method = "prune-magnitude" if "sparsity" in options else "prune-structured"
    with pytest.raises(ConfigError, match=match) as e:
        apply_pruning(model_of(BASE), BASE, method, options, None)
    assert "\n" not in str(e.value)


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 10, 20) == 0.0 and cubic_sparsity(20, 0.8, 10, 20) == 0.8
    assert cubic_sparsity(15, 0.8, 10, 20) == pytest.approx(0.8 * (1 - 0.5**3))


def prunable_sparsity(model) -> float:
    ws = prunable_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


PRUNE = {"prune__method": "magnitude", "prune__sparsity": 0.5, "prune__start_step": 2, "prune__end_step": 8,
         "prune__every": 2, "train__eval_every": 0, "checkpoint__every": 5}


def test_gradual_pruning_reaches_target_and_resumes_exactly(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=10, **PRUNE)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    assert prunable_sparsity(straight.model) == pytest.approx(0.5, abs=1e-3)
    events = [e for e in read_jsonl(tmp_path / "straight" / "events.jsonl") if e["event"] == "prune"]
    assert [e["step"] for e in events] == [2, 4, 6, 8]
    assert [e["sparsity_target"] for e in events] == sorted(e["sparsity_target"] for e in events)
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 5))
    assert first.fit()["step"] == 5
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000005" / MASKS_FILE).is_file()
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.step == 5 and all(torch.equal(second.pruner.masks[n], m) for n, m in first.pruner.masks.items())
    second.fit()
    loss = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == loss
    for p, q in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gradual_two_four_ends_in_the_pattern(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=4, **{**PRUNE, "prune__method": "2:4", "prune__end_step": 4,
                                                  "checkpoint__every": 0})
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit()
    assert all(is_two_four(w != 0) for w in prunable_weights(tr.model).values())
    assert prunable_sparsity(tr.model) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    api.train(tiny_config(dataset, train__steps=12, train__eval_every=0, checkpoint__every=0), run)
    return run


def test_distillation_trains_with_the_kl_term(dataset, teacher, tmp_path):
    cfg = tiny_config(dataset, model__dim=32, model__n_heads=2, model__n_kv_heads=2, train__steps=4,
                      train__eval_every=0, checkpoint__every=0, distill__teacher=str(teacher), distill__alpha=0.7,
                      distill__temperature=2.0, distill__chunk=24)
    tr = Trainer(cfg, tmp_path / "student")
    tr.fit()
    records = read_jsonl(tmp_path / "student" / "metrics.jsonl")
    assert len(records) == 4
    for r in records:  # one step per line: the logged loss is the objective, CE and KL named apart
        assert r["distill_kl"] > 0
        assert r["loss"] == pytest.approx(0.7 * 4.0 * r["distill_kl"] + 0.3 * r["distill_ce"], rel=1e-4)
    assert not any(p.requires_grad for p in tr.distill.teacher.parameters())
    # chunking changes no number: the same loss with the whole sequence at once
    x, y = tr.loader.next_step()[0]
    whole = Distiller(api.load_model(teacher).model, dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, chunk=0)))
    torch.testing.assert_close(tr.distill.loss(tr.model, x, y), whole.loss(tr.model, x, y), rtol=1e-5, atol=1e-4)


def test_teacher_with_another_vocabulary_is_refused(dataset, teacher, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        Trainer(tiny_config(dataset, model__vocab_size=600, distill__teacher=str(teacher)), tmp_path / "a")
    other = tmp_path / "other-data"
    shutil.copytree(dataset, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer of the same size
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="another tokenizer"):
        Trainer(tiny_config(other, distill__teacher=str(teacher)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_init_from_a_leantrain_run_starts_from_its_weights(dataset, teacher, tmp_path):
    cfg = api.load_config(overrides={"data.path": str(dataset), "train.init_from": str(teacher),
                                     "precision.dtype": "fp32", "log.progress": "none"})
    src = api.load_model(teacher)
    assert cfg.model == src.config.model
    tr = Trainer(cfg, tmp_path / "ft")
    for (n, p), q in zip(tr.model.state_dict().items(), src.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_structured_output_fine_tunes_and_exports(dataset, teacher, tmp_path):
    """The whole recovery path: compress -> train --init-from (a smaller model) -> a Hugging Face export whose
    logits are leantrain's (head_dim travels in config.json)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    pruned = tmp_path / "p50"
    api.compress(teacher, pruned, "prune-structured", options={"heads_fraction": 0.5, "channels_fraction": 0.5},
                 speed_tokens=0, eval_batches=1)
    cfg = api.load_config(overrides={"data.path": str(dataset), "train.init_from": str(pruned), "train.steps": 2,
                                     "train.eval_every": 0, "train.eval_steps": 1, "train.micro_batch_size": 2,
                                     "train.sample_tokens": 0, "checkpoint.every": 0, "precision.dtype": "fp32",
                                     "log.progress": "none"})
    assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim) == (2, 2, 16)
    result = api.train(cfg, tmp_path / "ft")
    assert result.step == 2
    api.export(tmp_path / "ft", tmp_path / "hf")
    ours = api.load_model(tmp_path / "ft").model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-4, atol=1e-4)
