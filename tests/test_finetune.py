"""Fine-tuning on real tiny models and real data: LoRA, freezing, chat data with a loss mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import stop_then_resume, tiny_config
from leantrain.cli import main
from leantrain.config import ModelConfig, load_config
from leantrain.errors import ConfigError, DataError
from leantrain.model import Transformer
from leantrain.model.lora import LoRALinear, apply_lora, freeze, merge_lora
from leantrain.tokens.chat import DEFAULT_TEMPLATE, ChatEncoder, ChatExample, prepare_chat_dataset
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.loader import BatchLoader, val_batches
from leantrain.tokens.tokenizer import load_tokenizer
from leantrain.train.runs import load_trained
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, seq_len=16, vocab_size=64) | kw
    return Transformer(ModelConfig(**cfg))


def write_pairs(path, n=300):
    """A tiny task with a learnable answer: the response repeats a word of the prompt."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    with open(path, "w") as f:
        for i in range(n):
            w = words[i % len(words)]
            f.write(json.dumps({"prompt": f"say {w} twice", "response": f"{w} {w}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_data(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = write_pairs(root / "pairs.jsonl")
    prepare_chat_dataset([src], root / "data", tokenizer_path=dataset, val_fraction=0.1)
    return root / "data"


def ft_config(data, **over):
    # an untied output head with an adapter: a random-init base's tiny output weights cannot make
    # peaked predictions, so adapters in the blocks alone barely lower the loss
    base = {"model__seq_len": 32, "model__tie_embeddings": False, "train__steps": 16, "optim__lr": 3e-2,
            "optim__warmup_steps": 2, "checkpoint__every": 8, "train__eval_every": 0, "finetune__lora_rank": 4,
            "finetune__lora_targets": "all-linear,output"}
    return tiny_config(data, **(base | over))


# ---- the adapters themselves ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", [{}, {"arch": "gpt2", "n_kv_heads": 4}])
def test_lora_keeps_names_starts_at_base_and_merges_exactly(arch):
    model = tiny_model(**arch)
    x = torch.randint(0, 64, (2, 16))
    base_logits = model(x)
    base_keys = set(model.state_dict())
    wrapped = apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets="wq,wv,w2")
    assert wrapped == [f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wv", "feed_forward.w2")]
    keys = set(model.state_dict())
    assert base_keys <= keys and "layers.0.attention.wq.weight" in keys
    assert keys - base_keys == {f"{w}.lora_{ab}" for w in wrapped for ab in "ab"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"{w}.lora_{ab}" for w in wrapped for ab in "ab"]
    torch.testing.assert_close(model(x), base_logits, rtol=0, atol=0)  # B = 0: the base model exactly
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.2)
    adapted = model(x)
    assert (adapted - base_logits).abs().max() > 1e-3
    merge_lora(model)
    assert set(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(x) - adapted).abs().max() < 1e-5


def test_lora_trains_only_adapters_under_bf16_autocast():
    model = tiny_model(seq_len=16)
    assert len(apply_lora(model, rank=2, alpha=4.0, dropout=0.1, targets="all-linear")) == 2 * 7
    assert len(apply_lora(tiny_model(arch="gpt2", n_kv_heads=4), 2, 4.0, 0.0, "all-linear")) == 2 * 6  # no w3
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- LoRA through the trainer --------------------------------------------------------------------

def test_lora_finetune_lowers_loss_keeps_base_bitwise_and_exports_merged(chat_data, tmp_path, capsys):
    cfg = ft_config(chat_data)
    tr = Trainer(cfg, tmp_path / "run")
    base = {n: p.detach().clone() for n, p in tr.model.named_parameters() if ".lora_" not in n}
    trainable = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(trainable) == 2 * (7 * 2 + 1) and all(p.requires_grad for p in trainable)  # a, b x 15 linears
    summary = tr.fit()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 1.0, losses
    for n, p in tr.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"{n} changed"
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["finetune"]["lora_modules"] == 15

    ckpt = tmp_path / "run" / "checkpoints" / "step-0000016"
    adapters = load_file(ckpt / "adapters.safetensors")
    assert set(adapters) == {n for n, _ in tr.model.named_parameters() if ".lora_" in n}
    assert "adapters.safetensors" in json.loads((ckpt / "manifest.json").read_text())["files"]

    merged, _, _, step, _ = load_trained(tmp_path / "run")
    assert step == 16 and type(merged) is Transformer
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(Transformer(cfg.model).state_dict())
    tr.model.eval()
    x = tr.val[0][0][:2]
    with torch.no_grad():
        assert (merged(x) - tr.model(x)).abs().max() < 1e-4  # fp32 rounding of W + BA on logits ~10
    assert summary["step"] == 16
    assert (tmp_path / "run" / "chat_template.txt").read_text() == DEFAULT_TEMPLATE
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "say beta twice", "--chat", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert "<|assistant|>" not in capsys.readouterr().out  # the answer alone


def test_lora_resume_is_bit_for_bit(chat_data, tmp_path):
    cfg = ft_config(chat_data, train__steps=6, checkpoint__every=3, finetune__lora_dropout=0.1)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    second = stop_then_resume(cfg, tmp_path / "resumed", 3)

    def losses(run):
        return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for (n, p), q in zip(straight.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_freeze_keeps_named_params_bitwise_equal(dataset, tmp_path):
    cfg = tiny_config(dataset, train__steps=3, checkpoint__every=0, train__eval_every=0,
                      finetune__freeze="tok_embeddings,layers.0")
    tr = Trainer(cfg, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    after = dict(tr.model.named_parameters())
    for n, p in before.items():
        frozen = n.startswith(("tok_embeddings", "layers.0.", "output"))  # output is tied to the embedding
        assert torch.equal(p, after[n]) == frozen, n
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x", "--chat"]) == 2  # not chat data


def test_freeze_and_targets_that_match_nothing_are_one_line_errors():
    with pytest.raises(ConfigError, match="finetune.freeze pattern 'layers.9'") as e:
        freeze(tiny_model(), "layers.0,layers.9")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="finetune.lora_targets 'wqq' matches no linear") as e:
        apply_lora(tiny_model(), 4, 16.0, 0.0, "wq,wqq")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="tied to the embedding"):
        apply_lora(tiny_model(), 4, 16.0, 0.0, "all-linear,output")
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        apply_lora(tiny_model(), 4, 16.0, 0.0, " , ")
    with pytest.raises(ConfigError, match="finetune.lora_rank"):
        load_config(overrides={"finetune": {"lora_rank": -1}})


# ---- chat data and the loss mask -----------------------------------------------------------------

def test_chat_mask_covers_exactly_the_response_and_end_token(dataset, chat_data):
    tok = load_tokenizer(dataset)
    enc = ChatEncoder(tok, DEFAULT_TEMPLATE)
    (ids, mask), = enc.encode([ChatExample("x", "say beta twice <|endoftext|>", "beta beta")])
    eot = tok.token_to_id("<|endoftext|>")
    answer = ids[mask == 1].tolist()
    assert answer[-1] == eot and tok.decode(answer[:-1]) == "beta beta"
    assert tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False) == \
        "<|user|>\nsay beta twice <|endoftext|>\n<|assistant|>\n"
    assert ids.tolist().count(eot) == 1  # the literal in the prompt is text, not a boundary
    assert mask.tolist() == sorted(mask.tolist())  # prompt first, then only the answer
    assert enc.encode_prompt("say beta twice <|endoftext|>") == ids[mask == 0].tolist()

    data = TokenDataset(chat_data)
    assert data.chat_template == DEFAULT_TEMPLATE
    meta = data.meta["splits"]["train"]
    tokens, masks = np.concatenate(data.shards("train")), np.concatenate(data.masks("train"))
    assert meta["masks"] == ["train/mask/000000.bin"] and len(masks) == len(tokens) == meta["tokens"]
    assert int(masks.sum()) == meta["target_tokens"]
    assert meta["documents"] + data.meta["splits"]["val"]["documents"] == 300
    ends = np.flatnonzero(tokens == eot)
    assert len(ends) == meta["documents"] and masks[ends].all()  # every end token is trained on
    first = tokens[: ends[0] + 1]
    assert tok.decode(first[masks[: ends[0] + 1] == 1][:-1].tolist()) in {f"{w} {w}" for w in
                                                                          ("alpha", "beta", "gamma", "delta", "omega",
                                                                           "sigma", "kappa", "theta")}


def test_damaged_mask_is_a_clear_error(chat_data, tmp_path):
    import shutil

    copy = tmp_path / "chat"
    shutil.copytree(chat_data, copy)
    mask = copy / "train" / "mask" / "000000.bin"
    mask.write_bytes(mask.read_bytes()[:-3])
    with pytest.raises(DataError, match="loss mask train/mask/000000.bin is missing or not"):
        TokenDataset(copy)


def test_loader_turns_prompt_targets_into_ignore_index(chat_data):
    data = TokenDataset(chat_data)
    shards, masks = data.shards("train"), data.masks("train")
    loader = BatchLoader(shards, 32, 4, 2, seed=3, masks=masks)
    plain = BatchLoader(shards, 32, 4, 2, seed=3)
    flat = np.concatenate(masks)
    for (x, y), (px, py) in zip(loader.next_step(), plain.next_step(), strict=True):
        assert torch.equal(x, px)
        keep = y != -100
        assert torch.equal(y[keep], py[keep]) and 0 < int(keep.sum()) < y.numel()
    # the mask of a target is the mask byte of that target token
    assert len(shards) == 1  # so a window's flat index is its offset in the shard
    starts = loader._step_starts(0)[:4]
    x, y = BatchLoader(shards, 32, 4, 2, seed=3, masks=masks).next_step()[0]
    for row, s in enumerate(starts):
        assert ((y[row] != -100).numpy() == flat[s + 1:s + 33].astype(bool)).all()
    vx, vy = val_batches(shards, 32, 4, 1, masks=masks)[0]
    assert (vy == -100).any() and (vy != -100).any()


def test_loss_ignores_prompt_tokens_against_hand_computation():
    model = tiny_model(seed=1)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :10] = -100
    y[1, 3:7] = -100
    with torch.no_grad():
        logits = model(x).double()
        logp = torch.log_softmax(logits, dim=-1)
        picked = [-logp[b, t, y[b, t]] for b in range(2) for t in range(16) if y[b, t] != -100]
        want_sum = torch.stack(picked).sum()
        got_sum = model(x, y, reduction="sum").double()
        got_mean = model(x, y).double()
    assert len(picked) == 32 - 10 - 4
    assert got_sum.item() == pytest.approx(want_sum.item(), rel=1e-5)
    assert got_mean.item() == pytest.approx(want_sum.item() / len(picked), rel=1e-5)
    assert got_mean.item() != pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.clamp(min=0).flatten()).item())


def test_trainer_step_normalises_by_response_targets(chat_data, tmp_path):
    tr = Trainer(ft_config(chat_data), tmp_path / "run", resume=False)
    batches = tr.loader.next_step()
    n = sum(int((y != -100).sum()) for _, y in batches)
    assert n < sum(y.numel() for _, y in batches)
    with torch.no_grad():
        want = sum(tr.model(x, y, reduction="sum") for x, y in batches) / n
    loss, _ = tr.forward_backward(batches)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_bad_chat_inputs_are_one_line_errors(dataset, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n" + json.dumps({"prompt": "hi", "answer": 1}))
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'response'.*--response-field") as e:
        prepare_chat_dataset([bad], tmp_path / "out", tokenizer_path=dataset)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="bad.jsonl:1 has no string field 'question'.*--prompt-field"):
        prepare_chat_dataset([bad], tmp_path / "out", tokenizer_path=dataset, prompt_field="question")
    with pytest.raises(DataError, match="must hold"):
        prepare_chat_dataset([bad], tmp_path / "out", tokenizer_path=dataset, template="{response}{prompt}")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n")
    with pytest.raises(DataError, match="at least 2 examples"):
        prepare_chat_dataset([one], tmp_path / "out", tokenizer_path=dataset)


def test_cli_prepares_chat_data_with_custom_fields(dataset, tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "qa"
    code = main(["data", "prepare", "--format", "chat", "--prompt-field", "q", "--response-field", "a",
                 "--chat-template", "Q: {prompt}\\nA: {response}", str(src), "--tokenizer", str(dataset),
                 "--out", str(out)])
    assert code == 0 and "chat dataset written" in capsys.readouterr().out
    data = TokenDataset(out)
    assert data.chat_template == "Q: {prompt}\nA: {response}"
    tokens, masks = data.shards("train")[0], data.masks("train")[0]
    ends = np.flatnonzero(tokens == data.eot_id)  # a template without an end token still ends each example
    assert len(ends) == data.meta["splits"]["train"]["documents"] and ends[-1] == len(tokens) - 1 and masks[ends].all()
    assert main(["data", "prepare", "--format", "chat", "--prompt-field", "question", str(src), "--tokenizer",
                 str(dataset), "--out", str(tmp_path / "x")]) == 2
    assert "has no string field 'question'" in capsys.readouterr().err


def test_lora_under_fsdp2_two_ranks_matches_one_process(chat_data, tmp_path):
    """FSDP2 shards the frozen base weights and the adapters of each block together; the curve must not move."""
    import os
    import subprocess
    import sys

    from leantrain.config import to_toml
    from leantrain.train.checkpoint import read_checkpoint

    over = {"train__steps": 4, "checkpoint__every": 4, "train__threads": 1, "train__micro_batch_size": 8}
    single = Trainer(ft_config(chat_data, **over), tmp_path / "single")
    base = {k: v.clone() for k, v in single.model.state_dict().items() if ".lora_" not in k}
    single.fit()
    cfg_path = tmp_path / "fsdp.toml"
    cfg_path.write_text(to_toml(ft_config(chat_data, **(over | {"train__micro_batch_size": 4}))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "leantrain.cli", "train", str(cfg_path), "--run-dir", str(tmp_path / "fsdp")],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "plan.json").read_text())["parallel"]["strategy"] == "fsdp"
    got = [r["loss"] for r in read_jsonl(tmp_path / "fsdp" / "metrics.jsonl")]
    want = [r["loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl")]
    assert got == pytest.approx(want, rel=1e-5) and len(got) == 4
    snap = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step-0000004")
    for k, v in base.items():
        assert torch.equal(snap.model[k], v), k
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000004" / "adapters.safetensors").is_file()


def test_chat_folders_give_distinct_ids_and_skip_hidden(tmp_path):
    from leantrain.tokens.chat import read_chat

    for sub in ("a", "b", ".git"):
        (tmp_path / "d" / sub).mkdir(parents=True)
        (tmp_path / "d" / sub / "data.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    ids = [ex.id for ex in read_chat([tmp_path / "d"])]
    assert ids == ["d/a/data.jsonl#L1", "d/b/data.jsonl#L1"]
