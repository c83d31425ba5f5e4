"""Every Hugging Face architecture leantrain speaks, both ways, on transformers-made tiny random models.

Per arch: a transformers model imports to the same logits, a leantrain model exports to a folder that
transformers loads to the same logits (max abs diff <= 1e-4, fp32), parameter counts agree three ways
(`param_count`, the module, HF's `num_parameters()`), and greedy decoding with and without the KV cache
gives the same tokens, through both attention kernels, also when prompt + new tokens pass the sliding
window. Nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from leantrain.config import ModelConfig
from leantrain.export.hf import write_safetensors
from leantrain.model import Transformer, generate, param_count
from leantrain.model.hf import HFFormatError, hf_config, load_hf_weights, model_config_from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 256, 64
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5,
          "rope_theta": 5000.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
# arch -> (transformers config class, its fields beyond COMMON): the features each arch adds
HF_ARCHS = {
    "llama": ("LlamaConfig", {"head_dim": 32}),  # an explicit head_dim other than hidden/heads
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # q_proj is 4 * 32 = 128 wide on a 64-wide model
    "phi3": ("Phi3Config", {"sliding_window": 12}),
}
# leantrain configs for the export direction: the same features, set from our side
OURS = {
    "llama": {"head_dim": 32},
    "mistral": {"sliding_window": 8},
    "qwen2": {"tie_embeddings": True},
    "qwen3": {"head_dim": 32, "n_kv_heads": 1},
    "phi3": {"sliding_window": 12, "tie_embeddings": False},
    "gpt2": {"n_kv_heads": 4},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _noisy(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norms and biases too), so a mis-mapped tensor cannot hide behind init 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _ids(n: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(7))


def _save_hf(arch: str, path) -> torch.nn.Module:
    cls, extra = HF_ARCHS[arch]
    torch.manual_seed(3)
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**(COMMON | extra))).eval()
    _noisy(m, 3)
    m.save_pretrained(path)
    return m


def _import(path) -> Transformer:
    model = Transformer(ModelConfig(**model_config_from_hf(path)))
    load_hf_weights(model, path)
    return model.eval()


def _ours(arch: str) -> Transformer:
    torch.manual_seed(4)
    fields = {"arch": arch, "n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "seq_len": SEQ,
              "vocab_size": VOCAB, "ffn_dim": 96, "tie_embeddings": False}
    model = Transformer(ModelConfig(**(fields | OURS[arch])))
    _noisy(model, 4)
    return model.eval()


def _export(model: Transformer, path) -> None:
    """The folder `leantrain export` writes, from the same two functions (no run needed)."""
    path.mkdir()
    write_safetensors(to_hf(dict(model.state_dict()), model.cfg), path, 10**9)
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg, 0)))


@pytest.mark.parametrize("arch", list(HF_ARCHS))
def test_import_gives_the_same_logits_and_parameter_count(arch, tmp_path):
    hf = _save_hf(arch, tmp_path)
    ours = _import(tmp_path)
    assert ours.cfg.arch == arch
    assert param_count(ours.cfg) == sum(p.numel() for p in ours.parameters()) == hf.num_parameters()
    x = _ids()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    if arch in ("mistral", "phi3"):  # the window (8, 12) is shorter than the 32 tokens: it did matter
        assert ours.layers[0].attention.window == HF_ARCHS[arch][1]["sliding_window"]


@pytest.mark.parametrize("arch", list(OURS))
def test_export_loads_in_transformers_with_the_same_logits(arch, tmp_path):
    ours = _ours(arch)
    _export(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == hf_config(ours.cfg, 0)["architectures"][0]
    assert hf.num_parameters() == param_count(ours.cfg) == sum(p.numel() for p in ours.parameters())
    x = _ids()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
        back = _import(tmp_path / "hf")  # and the export imports again to the same model
        assert (back(x) - ours(x)).abs().max().item() <= 1e-5
    assert {k: v for k, v in back.cfg.__dict__.items() if k != "init_std"} == {
        k: v for k, v in ours.cfg.__dict__.items() if k != "init_std"}


@pytest.mark.parametrize("arch", list(OURS))
def test_init_is_reproducible_and_sets_the_new_parts(arch):
    """A build runs the documented init on every tensor (to_empty leaves garbage otherwise): same seed, same
    model; qwen2's biases start at 0 and qwen3's q/k norms at 1."""
    cfg = _ours(arch).cfg
    builds = []
    for _ in range(2):
        torch.manual_seed(0)
        builds.append(Transformer(cfg).state_dict())
    assert all(torch.equal(builds[0][k], builds[1][k]) for k in builds[0])
    attn = Transformer(cfg).layers[1].attention
    if arch == "qwen2":
        assert all(not m.bias.any() for m in (attn.wq, attn.wk, attn.wv)) and attn.wo.bias is None
    if arch == "qwen3":
        assert (attn.q_norm.weight == 1).all() and (attn.k_norm.weight == 1).all()
        assert attn.wq.weight.shape == (4 * 32, 64) and attn.wo.weight.shape == (64, 4 * 32)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("arch", list(OURS))
def test_greedy_decoding_is_the_same_with_and_without_the_cache(arch, kernel):
    """20 new tokens after a 6-token prompt: past the mistral/phi3 windows (8, 12) the cache masks old keys."""
    model = _ours(arch)
    for layer in model.layers:
        layer.attention.kernel = kernel
    prompt = _ids(1, 6)[0].tolist()
    cached = generate(model, prompt, 20, temperature=0)
    assert cached == generate(model, prompt, 20, temperature=0, use_cache=False)
    assert len(cached) == 20


def test_sliding_window_greedy_tokens_match_transformers(tmp_path):
    """Decoding past the window, transformers (its own sliding cache) and leantrain pick the same tokens."""
    hf = _save_hf("mistral", tmp_path)
    ours = _import(tmp_path)
    prompt = _ids(1, 6)[0].tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert generate(ours, prompt, 20, temperature=0) == theirs[0, len(prompt):].tolist()


def test_window_at_least_seq_len_is_plain_causal_attention():
    """sliding_window >= seq_len computes what no window computes, through the plain causal path."""
    weights = _ours("mistral").state_dict()
    outs = []
    for window in (SEQ, 0, SEQ - 1):
        model = Transformer(ModelConfig(**(_ours("mistral").cfg.__dict__ | {"sliding_window": window}))).eval()
        model.load_state_dict(weights)
        assert model.layers[0].attention.window == (SEQ - 1 if window == SEQ - 1 else 0)
        with torch.no_grad():
            outs.append(model(_ids(t=SEQ)))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # a window one shorter than the sequence does change the last rows
    assert torch.allclose(outs[0][:, :SEQ - 1], outs[2][:, :SEQ - 1], atol=1e-5)


def test_window_masks_in_both_kernels_agree_in_training():
    model = _ours("phi3").train()
    x = _ids(t=SEQ)
    losses = []
    for kernel in ("sdpa", "matmul"):
        for layer in model.layers:
            layer.attention.kernel = kernel
        model.zero_grad()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append((loss.item(), model.layers[0].attention.wq.weight.grad.clone()))
    assert abs(losses[0][0] - losses[1][0]) < 1e-5
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-5)


@pytest.mark.parametrize("change,words", [
    ({"model_type": "qwen2", "use_sliding_window": True}, ("use_sliding_window = True", "not supported")),
    ({"model_type": "mistral", "layer_types": ["sliding_attention", "full_attention"]}, ("layer_types",)),
    ({"model_type": "phi3", "partial_rotary_factor": 0.5}, ("partial_rotary_factor = 0.5",)),
    ({"model_type": "qwen3", "head_dim": 15}, ("head_dim = 15 is odd",)),
    ({"model_type": "qwen3", "attention_bias": True}, ("attention_bias = True",)),
    ({"model_type": "mistral", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     ("rope_scaling has rope type 'yarn'",)),
    ({"model_type": "gemma"}, ("'gemma'", "not supported", "Mistral", "Qwen3", "Phi-3")),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps(COMMON | {"architectures": ["X"]} | change))
    with pytest.raises(HFFormatError) as e:
        model_config_from_hf(tmp_path)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_finetune_a_qwen3_import_and_export_it(dataset, tmp_path):
    """A real run from a transformers Qwen3 folder: trains, samples with the cache, exports, loads in transformers."""
    from leantrain.cli import main
    from leantrain.export.hf import export_hf
    from leantrain.train.runs import load_trained

    hf_dir = tmp_path / "qwen3"
    cls, extra = HF_ARCHS["qwen3"]
    torch.manual_seed(5)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**(COMMON | extra | {"vocab_size": 512}))).save_pretrained(
        hf_dir)
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(hf_dir), "--run-dir", str(run), f"--data.path={dataset}",
                 "--train.steps=3", "--train.micro_batch_size=2", "--train.eval_steps=1", "--train.sample_tokens=8",
                 "--model.seq_len=32", "--log.progress=none", "--precision.dtype=fp32"]) == 0
    model, _, cfg, step, _ = load_trained(run)
    assert (cfg.model.arch, cfg.model.head_dim, step) == ("qwen3", 32, 3)
    export_hf(run, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x)).abs().max().item() <= 1e-4
