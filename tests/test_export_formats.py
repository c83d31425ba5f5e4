"""What an HF export carries besides the weights: the saved dtype, and a chat template under which
transformers' `apply_chat_template` gives exactly the ids a chat run trained on. Real tiny runs, no downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny_config
from leantrain.cli import main
from leantrain.export.hf import export_hf
from leantrain.tokens.chat import ChatEncoder, prepare_chat_dataset
from leantrain.tokens.dataset import TokenDataset
from leantrain.train.runs import load_trained
from leantrain.train.trainer import Trainer

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def _ids(vocab: int, n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(7))


# ---- --dtype ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_run(dataset, tmp_path_factory):
    """A two-step Llama run trained in bf16 autocast (weights kept in float32)."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    Trainer(tiny_config(dataset, train__steps=2, checkpoint__every=0, train__eval_every=0, model__seq_len=32,
                        precision__dtype="bf16"), run).fit()
    return run


# tolerances ~10x what a tiny model measured (fp16 5e-4, bf16 5e-3 on logits of size ~1)
@pytest.mark.parametrize("dtype,tol", [(None, 5e-2), ("fp32", 1e-4), ("fp16", 5e-3), ("bf16", 5e-2)])
def test_export_dtype_sets_weights_and_config_and_keeps_logits(bf16_run, tmp_path, dtype, tol):
    out = tmp_path / "hf"
    info = export_hf(bf16_run, out, dtype=dtype)
    want = {None: torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert info["dtype"] == (dtype or "bf16")  # the run trained in bf16: bf16 by default
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(want).removeprefix("torch.")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert {p.dtype for p in hf.parameters()} == {want}
    model, *_ = load_trained(bf16_run)
    x = _ids(512)
    with torch.no_grad():
        ours = model(x)
        # the same rounded weights computed in float32: exact up to fp32 noise
        rounded = {k: v.to(want).float() for k, v in model.state_dict().items()}
        model.load_state_dict(rounded)
        ours_rounded = model(x)
        hf32 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (hf32(x).logits - ours_rounded).abs().max().item() < 1e-4
        # in its own dtype: within what that dtype can hold
        diff = (hf(x).logits.float() - ours).abs().max().item()
    assert diff < tol, diff


def test_export_default_dtype_is_fp32_for_an_fp32_run(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(dataset, train__steps=1, checkpoint__every=0, train__eval_every=0, model__seq_len=32,
                        model__n_layers=1), run).fit()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    assert main(["export", str(run), "--out", str(tmp_path / "hf16"), "--dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"


# ---- chat template ---------------------------------------------------------------------------------

PAIRS = [("say beta twice", "beta beta"), ("What is 2 + 2?", "4."), ("Write a haiku\nabout rain.",
                                                                     "Grey sky, soft\ndrops fall."),
         ("  indented question ", " an answer with spaces  "), ("def f(x):\n    return x", "It returns x.\n")]


@pytest.fixture(scope="module")
def chat_run(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(60):
            p, r = PAIRS[i % len(PAIRS)]
            f.write(json.dumps({"prompt": f"{p} #{i}", "response": r}) + "\n")
    prepare_chat_dataset([root / "pairs.jsonl"], root / "data", tokenizer_path=dataset, val_fraction=0.1)
    run = root / "run"
    Trainer(tiny_config(root / "data", train__steps=2, checkpoint__every=0, train__eval_every=0, model__seq_len=64,
                        train__sample_tokens=8), run).fit()
    export_hf(run, root / "hf")
    return root


def _documents(data) -> set[tuple[int, ...]]:
    """Every document (end token included) of a token dataset, as id tuples."""
    ds = TokenDataset(data)
    docs: set[tuple[int, ...]] = set()
    for split in ("train", "val"):
        ids = np.concatenate([np.asarray(s) for s in ds.shards(split)]).tolist()
        start = 0
        for i, t in enumerate(ids):
            if t == ds.eot_id:
                docs.add(tuple(ids[start:i + 1]))
                start = i + 1
    return docs


def test_exported_chat_template_gives_exactly_the_trained_ids(chat_run):
    tok = transformers.AutoTokenizer.from_pretrained(chat_run / "hf")
    assert tok.chat_template

    def apply(messages, gen=False):
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    trained = _documents(chat_run / "data")
    for i in range(60):  # every example, as transformers renders it, is a document the run trained on
        p, r = PAIRS[i % len(PAIRS)]
        msgs = [{"role": "user", "content": f"{p} #{i}"}, {"role": "assistant", "content": r}]
        assert tuple(apply(msgs)) in trained, msgs
    encoder = ChatEncoder(load_trained(chat_run / "run")[1])
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4."}],
        [{"role": "user", "content": "one\n"}, {"role": "assistant", "content": " two\n\n"},
         {"role": "user", "content": "  three"}],
        [{"role": "system", "content": "Answer in code.\n"}, {"role": "user", "content": "def f(x):"}],
    ]
    for msgs in conversations:
        for gen in (False, True):
            assert apply(msgs, gen) == encoder.encode_conversation(msgs, gen), (msgs, gen)
    assert apply(conversations[0][1:2], True) == encoder.encode_prompt("Hi!")  # what `generate --chat` feeds


def test_chat_run_samples_an_answer_to_a_chat_prompt(chat_run):
    text = (chat_run / "run" / "samples.txt").read_text()
    header, body = text.split("\n", 1)
    assert "prompt '<|user|>" in header and "<|assistant|>" in header  # a user turn + generation prompt
    assert body.startswith("<|user|>\n") and "\n<|assistant|>\n" in body
