"""Hugging Face exchange on real tiny models: export -> transformers, transformers -> import, and bad folders.

Every model is built locally with random weights; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config
from leantrain.cli import _load_train_config, main
from leantrain.config import ModelConfig
from leantrain.errors import ConfigError, LeantrainError
from leantrain.export.hf import export_hf, parse_size
from leantrain.model import Transformer, generate, param_count
from leantrain.model.hf import HFFormatError, init_model_fields, load_hf_weights, model_config_from_hf
from leantrain.train.runs import load_trained
from leantrain.train.trainer import Trainer

transformers = pytest.importorskip("transformers")

VOCAB = 512  # the shared test dataset's vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _noisy(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm weights and biases too), so a mis-mapped tensor cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(n: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(7))


# ---- export ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, dataset, tmp_path_factory):
    """A two-step run: Llama with GQA and untied embeddings, or GPT-2 (tied)."""
    arch = request.param
    over = {"model__arch": arch, "model__tie_embeddings": arch == "gpt2", "train__steps": 2,
            "checkpoint__every": 0, "train__eval_every": 0}
    if arch == "gpt2":
        over["model__n_kv_heads"] = 4
    run_dir = tmp_path_factory.mktemp(f"run-{arch}")
    Trainer(tiny_config(dataset, **over), run_dir).fit()
    return run_dir


def test_export_loads_in_transformers_with_same_logits_and_greedy_text(run, tmp_path):
    out = tmp_path / "hf"
    info = export_hf(run, out, max_shard_bytes=40_000)  # tiny limit: sharded with an index
    model, tok, cfg, _, _ = load_trained(run)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(info["files"])
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the temporary folder was renamed, nothing left over

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if cfg.model.arch == "gpt2" else "LlamaForCausalLM")
    x = _ids()
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4
    with torch.no_grad():  # and back: the exported folder imports to the same model
        assert (_import(out)(x) - model(x)).abs().max().item() < 1e-5

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    prompt = "def parse(self, text):\n    return"
    ids = tok.encode(prompt).ids
    assert hf_tok(prompt)["input_ids"] == ids and hf_tok.decode(ids) == prompt
    eot = tok.token_to_id("<|endoftext|>")
    ours = generate(model, ids, 20, temperature=0, eos_id=eot)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs and len(ours) > 0


def test_export_refuses_to_overwrite_and_replaces_with_overwrite(run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LeantrainError, match="not empty; pass --overwrite"):
        export_hf(run, out)
    assert main(["export", str(run), "--out", str(out)]) == 2
    # a folder leantrain did not write is never replaced, --overwrite or not; its own export is
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(["export", str(run), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from an earlier export")
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--overwrite",
                 "--max-shard-size", "1GB"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200kb") == 200_000 and parse_size("123") == 123
    with pytest.raises(ConfigError):
        parse_size("lots")


# ---- import ------------------------------------------------------------------------------------

def _save_llama(path, tie: bool, kv: int = 2, shard: str | None = None):
    c = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                                 rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=tie)
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(c).eval()
    _noisy(m, 1)
    m.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return m


def _save_gpt2(path):
    torch.manual_seed(2)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64,
                                                             n_layer=2, n_head=4)).eval()
    _noisy(m, 2)
    m.save_pretrained(path)
    return m


def _import(path, **over) -> Transformer:
    model = Transformer(ModelConfig(**(model_config_from_hf(path) | over)))
    load_hf_weights(model, path)
    return model.eval()


@pytest.mark.parametrize("tie,kv,shard", [(False, 2, None), (True, 4, None), (False, 1, "100KB")])
def test_import_llama_gives_same_logits(tmp_path, tie, kv, shard):
    hf = _save_llama(tmp_path, tie, kv, shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    fields = model_config_from_hf(tmp_path)
    assert fields | {"rope_theta": 0} == {"arch": "llama", "n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": kv,
                                          "seq_len": 64, "vocab_size": VOCAB, "ffn_dim": 96, "rope_theta": 0,
                                          "norm_eps": 1e-5, "tie_embeddings": tie, "head_dim": 0, "sliding_window": 0}
    assert fields["rope_theta"] == 5000.0
    x = _ids()
    with torch.no_grad():
        assert (hf(x).logits - _import(tmp_path)(x)).abs().max().item() < 1e-4


def test_import_gpt2_gives_same_logits_also_with_a_shorter_window(tmp_path):
    hf = _save_gpt2(tmp_path)
    ours = _import(tmp_path)
    assert ours.cfg.arch == "gpt2" and ours.output.weight is ours.tok_embeddings.weight
    assert param_count(ours.cfg) == sum(p.numel() for p in ours.parameters())
    x = _ids(t=64)
    with torch.no_grad():
        ref = hf(x).logits
        assert (ref - ours(x)).abs().max().item() < 1e-4
        short = _import(tmp_path, seq_len=32)  # the 64 learned positions are cut to 32
        assert (ref[:, :32] - short(x[:, :32])).abs().max().item() < 1e-4


def test_bad_folders_give_one_line_errors(tmp_path):
    def err(path, model=None) -> str:
        with pytest.raises(HFFormatError) as e:
            load_hf_weights(model or Transformer(ModelConfig(vocab_size=VOCAB)), path)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "not a folder" in err(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert "config.json is missing" in err(tmp_path / "empty")
    transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    assert "architecture 'bert' (unknown) is not supported; leantrain imports Llama" in err(tmp_path / "bert")

    llama = tmp_path / "llama"
    _save_llama(llama, tie=False)
    wrong = Transformer(ModelConfig(**(model_config_from_hf(llama) | {"ffn_dim": 128})))
    assert "mlp.gate_proj.weight has shape [96, 64] but the model expects [128, 64]" in err(llama, wrong)
    deeper = Transformer(ModelConfig(**(model_config_from_hf(llama) | {"n_layers": 3})))
    assert "missing, first model.layers.2." in err(llama, deeper)
    gpt2_model = Transformer(ModelConfig(**(model_config_from_hf(llama) | {"arch": "gpt2", "n_kv_heads": 4})))
    assert "is a llama checkpoint but model.arch = gpt2" in err(llama, gpt2_model)

    (llama / "model.safetensors").write_bytes(b"not safetensors")
    assert "cannot be read as safetensors" in err(llama)
    (llama / "model.safetensors").unlink()
    (llama / "pytorch_model.bin").write_bytes(b"")
    assert "safe_serialization=True" in err(llama)

    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    assert "hidden_act = 'gelu' is not supported" in err(llama)


# ---- init_from in the config and the trainer -----------------------------------------------------

def test_init_model_fields_fill_the_model_section_and_refuse_contradictions(tmp_path):
    _save_gpt2(tmp_path)
    assert init_model_fields(tmp_path, {"seq_len": 32})["arch"] == "gpt2"
    assert "seq_len" not in init_model_fields(tmp_path, {"seq_len": 32, "dim": 64})
    with pytest.raises(ConfigError, match="model.dim = 128 contradicts --init-from"):
        init_model_fields(tmp_path, {"dim": 128})
    with pytest.raises(ConfigError, match="exceeds the 64 learned positions"):
        init_model_fields(tmp_path, {"seq_len": 128})
    # the tiny recipe's model fields give way; the user's explicit ones stay
    cfg = _load_train_config(None, "tiny", [f"--train.init_from={json.dumps(str(tmp_path))}",
                                            "--model.seq_len=32"])
    assert (cfg.model.arch, cfg.model.dim, cfg.model.n_layers, cfg.model.seq_len) == ("gpt2", 64, 2, 32)


def test_trainer_starts_from_hf_weights_and_cli_trains(dataset, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf = _save_llama(hf_dir, tie=True)
    cfg = _load_train_config(None, None, [f"--train.init_from={json.dumps(str(hf_dir))}",
                                          f"--data.path={json.dumps(str(dataset))}", "--precision.dtype=fp32",
                                          "--model.seq_len=32"])
    tr = Trainer(cfg, tmp_path / "run")
    x = _ids(t=32)
    with torch.no_grad():
        assert (hf(x).logits - tr.model.eval()(x)).abs().max().item() < 1e-4

    run = tmp_path / "cli-run"
    args = ["train", "--init-from", str(hf_dir), "--run-dir", str(run), f"--data.path={dataset}",
            "--train.steps=1", "--train.micro_batch_size=2", "--train.eval_steps=1", "--train.sample_tokens=0",
            "--model.seq_len=32", "--log.progress=none", "--precision.dtype=fp32", "--optim.lr=1e-5",
            "--optim.warmup_steps=0"]
    assert main(args) == 0
    model, _, run_cfg, step, _ = load_trained(run)
    assert step == 1 and run_cfg.train.init_from == str(hf_dir) and run_cfg.model.ffn_dim == 96
    with torch.no_grad():  # one small step away from the imported weights, far from a random init
        assert 0 < (hf(x).logits - model(x)).abs().max().item() < 0.05
    capsys.readouterr()
    assert main([*args[:4], str(tmp_path / "other"), *args[5:], "--model.n_kv_heads=4"]) == 2
    assert "model.n_kv_heads = 4 contradicts --init-from" in capsys.readouterr().err


def test_hf_tokenizer_without_our_eot_uses_its_eos(tmp_path):
    """A Llama-style tokenizer with </s> but no <|endoftext|> prepares a dataset, eot mapped to </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from leantrain.corpus.readers import Document
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.prepare import prepare_dataset
    from leantrain.tokens.tokenizer import eot_id

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *pre_tokenizers.ByteLevel.alphabet()])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert eot_id(tok) == 2

    def docs():
        return iter([Document(id=str(i), text=f"doc number {i}\n" * 5, source="t") for i in range(20)])

    prepare_dataset(docs, tmp_path / "ds", tokenizer_path=tmp_path / "tokenizer.json", val_fraction=0.2)
    ds = TokenDataset(tmp_path / "ds")
    assert ds.eot_id == 2
    import numpy as np

    train = np.concatenate([np.asarray(s) for s in ds.shards("train")])
    assert (train == 2).sum() > 0 and train[-1] == 2
