"""LoRA adapters in PEFT's layout, both ways, on real tiny models: leantrain -> `PeftModel.from_pretrained`
and adapters made by `peft.get_peft_model` -> leantrain, each with logits parity (max abs diff <= 1e-4, fp32).

Every model is built locally with random weights; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config
from leantrain import api
from leantrain.cli import main
from leantrain.errors import LeantrainError
from leantrain.export.peft import export_peft
from leantrain.model.lora import LoRALinear
from leantrain.model.peft import read_peft
from leantrain.train.runs import load_trained
from leantrain.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 512  # the shared test dataset's vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(7))


def _hf_model(arch: str, path, seed: int = 1):
    """A transformers-made tiny Llama (GQA, untied) or GPT-2, saved to `path`."""
    torch.manual_seed(seed)
    if arch == "llama":
        c = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, tie_word_embeddings=False)
        m = transformers.LlamaForCausalLM(c)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj: each leantrain part gets its rows of B
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0,
            pad_token_id=0, tie_word_embeddings=False))
    else:
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64,
                                                                 n_layer=2, n_head=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    m.eval().save_pretrained(path)
    return m


def _leantrain_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).float()


def _peft_logits(base_dir, adapter_dir, x: torch.Tensor) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(x).logits.float()


# ---- leantrain -> PEFT -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-init-from", "gpt2-own-base"])
def test_leantrain_lora_loads_in_peft_with_same_logits(case, dataset, tmp_path):
    """A Llama fine-tuned from a transformers folder (adapters on every linear and the head), and a GPT-2
    LoRA run with no HF base (its base is exported beside the adapter; wq+wv stack into the fused c_attn)."""
    over = {"train__steps": 3, "optim__lr": 2e-2, "optim__warmup_steps": 1, "checkpoint__every": 0,
            "train__eval_every": 0, "finetune__lora_rank": 4, "finetune__lora_alpha": 8.0}
    if case == "llama-init-from":
        hf_dir = tmp_path / "base-hf"
        _hf_model("llama", hf_dir)
        cfg = api.load_config(overrides={"data.path": str(dataset), "train.init_from": str(hf_dir),
                                         "model.seq_len": 32, "train.steps": 3, "train.micro_batch_size": 2,
                                         "train.sample_tokens": 0, "precision.dtype": "fp32", "optim.lr": 2e-2,
                                         "optim.warmup_steps": 1, "checkpoint.every": 0, "train.eval_every": 0,
                                         "log.progress": "none", "finetune.lora_rank": 4,
                                         "finetune.lora_alpha": 8.0, "finetune.lora_targets": "all-linear,output"})
    else:
        cfg = tiny_config(dataset, model__arch="gpt2", model__n_kv_heads=4, model__tie_embeddings=True,
                          model__seq_len=32, finetune__lora_targets="wq,wv,w2", **over)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    out = tmp_path / "adapter"
    info = export_peft(run, out)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert conf["lora_dropout"] == 0.0 and conf["lora_alpha"] / conf["r"] == 8.0 / 4
    from safetensors.torch import load_file

    keys = set(load_file(out / "adapter_model.safetensors"))
    if case == "llama-init-from":
        assert conf["r"] == 4 and sorted(conf["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.lm_head.lora_B.weight" in keys
        base_dir = hf_dir
        assert conf["base_model_name_or_path"] == str(hf_dir.resolve()) and not (out / "base").exists()
    else:  # wq and wv share c_attn: rank 2 x 4, alpha scaled alike; mlp.c_proj is not attn.c_proj
        assert conf["r"] == 8 and sorted(conf["target_modules"]) == ["attn.c_attn", "mlp.c_proj"]
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
        base_dir = out / "base"
        assert conf["base_model_name_or_path"] == str(base_dir.resolve())
    assert len(keys) == 2 * len({k.rsplit(".lora_", 1)[0] for k in keys})
    assert info["files"] and (out / ".leantrain-export.json").is_file()

    merged, *_ = load_trained(run)
    x = _ids()
    ours = _leantrain_logits(merged, x)
    base_only = _leantrain_logits(load_trained(run, merge=False)[0], x)
    assert (ours - base_only).abs().max() < 1e-5  # merged or not: the same function
    plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(x).logits - ours).abs().max() > 1e-3  # the adapters matter, so parity below means something
    diff = (_peft_logits(base_dir, out, x) - ours).abs().max().item()
    assert diff <= 1e-4, diff


# ---- PEFT -> leantrain -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,targets,rslora", [("llama", ["q_proj", "v_proj", "down_proj"], False),
                                                 ("gpt2", ["c_attn", "c_fc"], True),
                                                 ("phi3", ["qkv_proj", "gate_up_proj", "lm_head"], False)])
def test_peft_made_adapter_loads_into_leantrain_with_same_logits(arch, targets, rslora, dataset, tmp_path, capsys):
    hf_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    base = _hf_model(arch, hf_dir)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                           task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: make it count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(adapter_dir)
    x = _ids()
    with torch.no_grad():
        theirs = model.eval()(x).logits

    overrides = {"data.path": str(dataset), "train.init_from": str(hf_dir), "finetune.adapter": str(adapter_dir),
                 "model.seq_len": 32, "train.steps": 2, "train.micro_batch_size": 2, "train.sample_tokens": 0,
                 "precision.dtype": "fp32", "checkpoint.every": 0, "train.eval_every": 0, "log.progress": "none"}
    cfg = api.load_config(overrides=overrides)
    ft = cfg.finetune
    assert ft.lora_rank == 4 and ft.lora_alpha == pytest.approx(8 * 2 if rslora else 8)  # rsLoRA: alpha/sqrt(r)
    want = {"llama": "wq,wv,w2", "gpt2": "wq,wk,wv,w1", "phi3": "wq,wk,wv,w1,w3,output"}[arch]
    assert ft.lora_targets == want
    tr = Trainer(cfg, tmp_path / "probe")
    n_out = "output" in want
    assert sum(isinstance(m, LoRALinear) for m in tr.model.modules()) == 2 * (len(want.split(",")) - n_out) + n_out
    ours = _leantrain_logits(tr.model, x)
    assert (ours - theirs).abs().max().item() <= 1e-4
    tr.close()

    # fine-tune on from it through the CLI: one line of trainable / total parameters, then back to PEFT
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *[f"--{k}={v}" for k, v in overrides.items()]]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("trainable params:"))
    n_train = sum(t.numel() for t in read_peft(adapter_dir, cfg.model).tensors.values())
    n_all = sum(p.numel() for p in tr.model.parameters())  # the leantrain model with its adapters
    assert line.startswith(f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%:"), line
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "again")]) == 0
    trained, *_ = load_trained(run)
    assert (_peft_logits(hf_dir, tmp_path / "again", x) - _leantrain_logits(trained, x)).abs().max() <= 1e-4


def test_unmappable_and_unsupported_adapters_are_named(dataset, tmp_path):
    hf_dir = tmp_path / "hf"
    base = _hf_model("llama", hf_dir)
    emb = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    emb.save_pretrained(tmp_path / "emb")
    cfg = api.load_config(overrides={"data.path": str(dataset), "train.init_from": str(hf_dir)})
    with pytest.raises(LeantrainError, match="target module 'embed_tokens' is not a linear layer leantrain can map"):
        read_peft(tmp_path / "emb", cfg.model)
    base = _hf_model("llama", tmp_path / "hf2")
    dora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(LeantrainError, match="use_dora = True is not supported"):
        read_peft(tmp_path / "dora", cfg.model)
    plain = peft.get_peft_model(_hf_model("llama", tmp_path / "hf3"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(LeantrainError, match="finetune.lora_rank = 8 contradicts finetune.adapter"):
        api.load_config(overrides={"data.path": str(dataset), "train.init_from": str(hf_dir),
                                   "finetune.adapter": str(tmp_path / "plain"), "finetune.lora_rank": 8})
