"""Mixture-of-experts models beyond training from scratch: export to Mixtral, Qwen2-MoE, Qwen3-MoE and GLM-4.5 MoE
with the same logits and greedy text in transformers, import of transformers-made MoE folders (both weight layouts),
init_from, the one-line refusals of settings no transformers class computes, LoRA on attention and experts
(trains, resumes exactly, merges, exports), and the guard skipping a NaN step. Random tiny models, no downloads."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain.cli import _load_train_config, main
from leantrain.config import ModelConfig
from leantrain.errors import ConfigError
from leantrain.export.hf import write_safetensors
from leantrain.model import Transformer, generate, param_count
from leantrain.model.hf import (
    HFFormatError,
    hf_config,
    load_hf_weights,
    model_config_from_hf,
    read_hf_weights,
    to_hf,
)
from leantrain.model.hf_moe import moe_family
from leantrain.train.runs import load_trained
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

VOCAB = 512  # the shared test dataset's vocabulary
EOT = 0
SHAPE = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "seq_len": 128, "vocab_size": VOCAB,
         "tie_embeddings": False, "moe_experts": 4, "moe_top_k": 2, "moe_hidden": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _noisy(model: torch.nn.Module, seed: int, biases: bool = True) -> None:
    """Random values everywhere (norms, routers and DeepSeek-V3 selection biases too), so a mis-mapped tensor
    cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if biases and (name.endswith("expert_bias") or name.endswith("e_score_correction_bias")):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _ids(n: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, t), generator=torch.Generator().manual_seed(7))


def _import(path) -> Transformer:
    model = Transformer(ModelConfig(**model_config_from_hf(path)))
    load_hf_weights(model, path)
    return model.eval()


def _write(model: Transformer, folder) -> None:
    """The weights and config.json an export writes (export/hf.py adds the tokenizer files)."""
    folder.mkdir()
    write_safetensors(to_hf(dict(model.state_dict()), model.cfg), folder, 10**9)
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg, EOT)))


def _same_greedy(ours: torch.nn.Module, theirs: torch.nn.Module, n: int = 64) -> list[int]:
    prompt = _ids(1, 8)[0].tolist()
    mine = generate(ours, prompt, n, temperature=0, eos_id=EOT)
    hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=EOT,
                         pad_token_id=EOT)[0, len(prompt):].tolist()
    assert mine == hf
    return mine


# ---- export --------------------------------------------------------------------------------------

EXPORTS = {  # the [model] MoE settings -> the transformers class they export as
    "mixtral": ({}, "MixtralForCausalLM"),
    "qwen2-moe-gated-shared-every-2": ({"moe_shared_experts": 1, "moe_shared_gate": True, "moe_every": 2},
                                       "Qwen2MoeForCausalLM"),
    "qwen2-moe-top-1": ({"moe_top_k": 1}, "Qwen2MoeForCausalLM"),  # raw top-1 gate, a zero-width shared expert
    "mixtral-top-1-normalised": ({"moe_top_k": 1, "moe_gate_norm": "on"}, "MixtralForCausalLM"),
    "qwen2-moe-qkv-bias-raw-gates": ({"arch": "qwen2", "moe_gate_norm": "off", "moe_shared_experts": 2,
                                      "moe_shared_gate": True}, "Qwen2MoeForCausalLM"),
    "qwen3-moe-every-2": ({"arch": "qwen3", "moe_every": 2}, "Qwen3MoeForCausalLM"),
    "glm4-moe-sigmoid-bias-shared": ({"moe_router": "sigmoid", "moe_balance": "bias", "moe_shared_experts": 1},
                                     "Glm4MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_gives_same_logits_and_greedy_text_and_imports_back(case, tmp_path):
    over, cls = EXPORTS[case]
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**(SHAPE | over))).eval()
    _noisy(ours, 1)
    _write(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == cls
    x = _ids()
    with torch.no_grad():
        want = ours(x)
        assert (hf(x).logits - want).abs().max().item() <= 1e-4
        back = _import(tmp_path / "hf")
        assert (back(x) - want).abs().max().item() <= 1e-5
    keys = ("arch", "moe_experts", "moe_top_k", "moe_hidden", "moe_every", "moe_shared_experts", "moe_shared_gate",
            "moe_router", "moe_gate_norm", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "tie_embeddings")
    assert {k: getattr(back.cfg, k) for k in keys} == {k: getattr(ours.cfg, k) for k in keys}
    assert param_count(back.cfg) == sum(p.numel() for p in back.parameters())
    assert len(_same_greedy(ours, hf)) > 0


def test_cli_export_of_a_trained_moe_run_loads_in_transformers(dataset, tmp_path):
    run = tmp_path / "run"
    moe = {"model__moe_experts": 4, "model__moe_top_k": 2, "model__moe_hidden": 32}
    Trainer(tiny_config(dataset, train__steps=2, checkpoint__every=0, train__eval_every=0, **moe), run).fit()
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    model, tok, _, _, _ = load_trained(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = _ids(t=64)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
    ids = tok.encode("def parse(self, text):\n    return").ids
    eot = tok.token_to_id("<|endoftext|>")
    ours = generate(model, ids, 64, temperature=0, eos_id=eot)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs and len(ours) > 0
    assert tok.decode(ours) == transformers.AutoTokenizer.from_pretrained(out).decode(theirs)


@pytest.mark.parametrize("over, words", [
    ({"moe_balance": "bias"}, ("moe_balance = bias", "moe_router = sigmoid")),
    ({"moe_shared_experts": 1}, ("moe_shared_experts = 1", "moe_shared_gate = true")),
    ({"moe_router": "sigmoid", "moe_shared_experts": 1, "moe_shared_gate": True}, ("moe_shared_gate = false",)),
    ({"moe_router": "sigmoid", "moe_every": 2, "n_layers": 4}, ("moe_every = 2", "moe_every = 1")),
    ({"arch": "qwen3", "moe_shared_experts": 1}, ("arch = qwen3", "Qwen3-MoE has no shared experts")),
    ({"arch": "qwen2", "moe_router": "sigmoid"}, ("arch = qwen2 with moe_router = sigmoid", "arch = llama")),
])
def test_settings_no_transformers_class_computes_are_refused_in_one_line(over, words):
    with pytest.raises(ConfigError) as e:
        moe_family(ModelConfig(**(SHAPE | over)))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)
    # a sigmoid router whose MoE blocks are a suffix (block 1 of 2) is GLM-4.5 MoE with first_k_dense_replace = 1
    assert moe_family(ModelConfig(**(SHAPE | {"moe_router": "sigmoid", "moe_every": 2}))) == "glm4_moe"


# ---- import --------------------------------------------------------------------------------------

COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128, "num_experts_per_tok": 2,
          "tie_word_embeddings": False}
IMPORTS = {  # a transformers-made MoE -> save_pretrained's layout (per expert, or transformers 5's fused one)
    "mixtral": (lambda: transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4), True),
    "qwen1.5-moe-like": (lambda: transformers.Qwen2MoeConfig(  # q/k/v biases, top-4 of 8 with raw gates
        **(COMMON | {"num_experts_per_tok": 4}), intermediate_size=96, num_experts=8, moe_intermediate_size=32,
        shared_expert_intermediate_size=64), True),
    "qwen3-moe": (lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=32, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True), True),
    "qwen2-moe-fused": (lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        decoder_sparse_step=2, norm_topk_prob=True, qkv_bias=False), False),
    "glm4-moe": (lambda: transformers.Glm4MoeConfig(
        **COMMON, intermediate_size=96, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 1.0}), True),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_import_of_a_transformers_moe_gives_same_logits(case, tmp_path):
    make, original = IMPORTS[case]
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(make()).eval()
    _noisy(hf, 3)
    hf.save_pretrained(tmp_path, save_original_format=original)
    fused = any(k.endswith("experts.gate_up_proj") for k in read_hf_weights(tmp_path))
    assert fused != original
    ours = _import(tmp_path)
    assert ours.cfg.moe_experts == (8 if case == "qwen1.5-moe-like" else 4)
    x = _ids()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_init_from_a_mixtral_folder_fills_the_moe_fields_and_loads_the_weights(dataset, tmp_path):
    make, _ = IMPORTS["mixtral"]
    torch.manual_seed(4)
    hf = transformers.MixtralForCausalLM(make()).eval()
    _noisy(hf, 4)
    hf.save_pretrained(tmp_path / "hf")
    cfg = _load_train_config(None, "tiny", [f"--train.init_from={json.dumps(str(tmp_path / 'hf'))}",
                                            f"--data.path={json.dumps(str(dataset))}", "--precision.dtype=fp32"])
    m = cfg.model
    assert (m.moe_experts, m.moe_top_k, m.moe_hidden, m.moe_every, m.moe_router, m.dim) == (4, 2, 32, 1, "softmax", 64)
    tr = Trainer(cfg, tmp_path / "run")
    x = _ids()
    with torch.no_grad():
        assert (hf(x).logits - tr.model.eval()(x)).abs().max().item() <= 1e-4
    with pytest.raises(ConfigError, match="model.moe_experts = 8 contradicts --init-from"):
        _load_train_config(None, None, [f"--train.init_from={json.dumps(str(tmp_path / 'hf'))}",
                                        "--model.moe_experts=8"])


def test_moe_folders_leantrain_cannot_express_are_refused_in_one_line(tmp_path):
    def refused(config: dict) -> str:
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFFormatError) as e:
            model_config_from_hf(tmp_path)
        assert "\n" not in str(e.value)
        return str(e.value)

    qwen = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=32).to_dict()
    assert "mlp_only_layers = [1] is not supported" in refused(qwen | {"mlp_only_layers": [1]})
    assert "shared_expert_intermediate_size = 40 is not a multiple" in refused(
        qwen | {"shared_expert_intermediate_size": 40})
    mixtral = transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4).to_dict()
    assert "sliding_window = 64 is not supported" in refused(mixtral | {"sliding_window": 64})
    assert "num_experts_per_tok = 5 is more than the 4 experts" in refused(mixtral | {"num_experts_per_tok": 5})
    glm = transformers.Glm4MoeConfig(**COMMON, n_routed_experts=4, moe_intermediate_size=32).to_dict()
    assert "partial_rotary_factor" in refused(glm | {"first_k_dense_replace": 0})
    assert "routed_scaling_factor = 2.5" in refused(glm | {"first_k_dense_replace": 0, "routed_scaling_factor": 2.5})


# ---- LoRA on attention and on experts -------------------------------------------------------------

def test_lora_on_attention_and_experts_trains_adapters_only_resumes_exactly_and_merges(dataset, tmp_path, capsys):
    cfg = tiny_config(dataset, train__steps=4, train__eval_every=0, checkpoint__every=2, model__moe_experts=4,
                      model__moe_top_k=2, model__moe_hidden=32, finetune__lora_rank=4,
                      finetune__lora_targets="wq,wv,w1,w2,w3")
    straight = Trainer(cfg, tmp_path / "straight")
    params = dict(straight.model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    assert "layers.0.feed_forward.parametrizations.w1.0.lora_a" in trainable
    assert "layers.0.attention.wq.lora_b" in trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    base = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    straight.fit()
    assert all(torch.equal(p, base[n]) for n, p in straight.model.named_parameters() if n in base)
    assert all(straight.model.get_parameter(f"layers.{i}.feed_forward.parametrizations.{w}.0.lora_b").abs().sum() > 0
               for i in range(2) for w in ("w1", "w2", "w3"))  # every expert adapter trained

    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 2))
    assert first.fit()["step"] == 2
    Trainer(cfg, tmp_path / "resumed").fit()
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4

    merged, _, _, _, _ = load_trained(tmp_path / "straight")  # adapters folded in, plain expert weights again
    assert not any("parametrizations" in n or "lora" in n for n in merged.state_dict())
    x = _ids()
    with torch.no_grad():
        assert (merged(x) - straight.model.eval()(x)).abs().max().item() <= 1e-5
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "straight"), "--out", str(out), "--dtype", "fp32"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(x).logits - merged(x)).abs().max().item() <= 1e-4
    # PEFT has no layout for adapters on 3-D expert weights here: one line, exit 2, nothing written
    assert main(["export", str(tmp_path / "straight"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err and not (tmp_path / "peft").exists()


# ---- the guard ------------------------------------------------------------------------------------

class NaNOnce:
    """A forward hook on the real model: the training loss of step `at` becomes NaN once; when that step is tried
    again, records whether the skipped update left the experts' selection biases and weights as they were."""

    def __init__(self, trainer, at):
        self.trainer, self.at, self.before, self.unchanged = trainer, at, None, None
        trainer.model.register_forward_hook(self)

    def state(self, model):
        return [t.detach().clone() for n, t in [*model.named_buffers(), *model.named_parameters()]
                if n.endswith(("expert_bias", "feed_forward.w1", "router.weight"))]

    def __call__(self, module, args, output):
        if not module.training or self.trainer.step != self.at:
            return None
        if self.before is None:
            self.before = self.state(module)
            return output * float("nan")
        if self.unchanged is None:
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.state(module), self.before, strict=True))
        return None


def test_guard_skips_a_nan_step_of_an_moe_run_without_moving_weights_or_bias(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=5, train__eval_every=0, checkpoint__every=0, guard__policy="skip",
                      model__moe_experts=4, model__moe_top_k=2, model__moe_hidden=32, model__moe_balance="bias")
    trainer = Trainer(cfg, tmp_path / "run")
    hook = NaNOnce(trainer, at=3)
    assert trainer.fit()["step"] == 5
    skips = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 3 and "non-finite" in skips[0]["message"]
    assert hook.unchanged is True and len(hook.before) == 6  # 2 layers x (bias, router, w1)
    assert any(b.abs().sum() > 0 for n, b in trainer.model.named_buffers() if n.endswith("expert_bias"))


def test_lora_on_experts_under_fsdp_two_ranks_matches_one_process(dataset, tmp_path):
    """Two gloo ranks under FSDP2, half the batch each: the expert adapters (parametrizations of sharded 3-D
    weights) train to the single process's losses."""
    from test_distributed import make_cfg, records, torchrun

    over = {"train__steps": 4, "checkpoint__every": 0, "log__grad_health_every": 0, "model__moe_experts": 4,
            "finetune__lora_rank": 4, "finetune__lora_targets": "wq,w1,w2,w3", "optim__lr": 1e-2}
    Trainer(make_cfg(dataset, **over), tmp_path / "single").fit()
    torchrun(make_cfg(dataset, train__micro_batch_size=4, **over), tmp_path / "fsdp")
    got, want = records(tmp_path / "fsdp"), records(tmp_path / "single")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-4), f"step {s}"
    assert want[4]["loss"] < want[1]["loss"]
