"""Masked language modelling (model.objective = mlm): the bidirectional encoder, span masking in the data path,
a tiny run from the CLI that learns, exact resume, masked-token accuracy, and logits parity with transformers'
EuroBertForMaskedLM after export."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain import api
from leantrain.config import load_config
from leantrain.errors import DataError
from leantrain.model import Transformer
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.loader import BatchLoader, val_batches
from leantrain.tokens.masking import MASK, MaskedLoader, SpanMasker, span_mask

pytestmark = pytest.mark.usefixtures("one_thread")
MASK_ID = 4  # reserved by every tokenizer `data prepare` trains, after <|endoftext|> and the three FIM sentinels


def _tiny_model(objective: str, kernel: str) -> Transformer:
    cfg = load_config(overrides={"model": {"n_layers": 2, "dim": 32, "n_heads": 2, "n_kv_heads": 1, "seq_len": 16,
                                           "vocab_size": 64, "objective": objective}}).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for layer in model.layers:
        layer.attention.kernel = kernel
    return model


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_attention_is_bidirectional(kernel):
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 64
    encoder, decoder = _tiny_model("mlm", kernel), _tiny_model("causal", kernel)
    with torch.no_grad():
        # the last token moves the encoder's output at every earlier position, and the decoder's at none
        assert (encoder(x)[0, :-1] - encoder(changed)[0, :-1]).abs().amax(-1).min() > 1e-4
        torch.testing.assert_close(decoder(x)[0, :-1], decoder(changed)[0, :-1])
        with pytest.raises(ValueError, match="no incremental decoding"):
            encoder(x, cache=encoder.new_cache())


def _runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a bool vector."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


@pytest.mark.parametrize("rate, span", [(0.25, 4), (0.15, 1), (0.5, 3)])
def test_span_mask_rate_and_spans(rate, span):
    lengths = []
    for i in range(300):
        mask = span_mask(64, rate, span, np.random.default_rng(i))
        n = round(rate * 64)
        runs = _runs(mask)
        assert mask.sum() == n  # the rate exactly, in every sequence
        assert len(runs) == round(n / span)  # the planned spans, none touching another
        lengths += runs.tolist()
    assert np.mean(lengths) == pytest.approx(round(rate * 64) / round(round(rate * 64) / span))
    if span > 1:  # span lengths vary around the mean
        assert len(set(lengths)) >= 3


def test_masker_replaces_80_10_10_and_labels_the_originals():
    x = torch.randint(0, 500, (64, 64), generator=torch.Generator().manual_seed(0))
    inputs, labels = SpanMasker(mask_id=510, vocab_size=500, rate=0.25, mean_span=3, seed=1).mask_rows(x, (1, 0, 0))
    chosen = labels != -100
    assert (chosen.sum(1) == 16).all()
    assert torch.equal(labels[chosen], x[chosen]) and torch.equal(inputs[~chosen], x[~chosen])
    masked = (inputs[chosen] == 510).float().mean().item()
    kept = (inputs[chosen] == x[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.05 and abs(kept - 0.1) < 0.04  # 1024 chosen tokens: 3 sigma is 0.04 / 0.03
    hidden, _ = SpanMasker(mask_id=510, vocab_size=500, rate=0.25, mean_span=3, seed=1).mask_rows(x, (1, 0, 0), True)
    assert (hidden[chosen] == 510).all() and torch.equal(hidden[~chosen], x[~chosen])  # validation hides them all


def test_masks_follow_step_and_row_not_process_layout(dataset):
    """Rank r's micro-batch m holds global rows (m * world + r) * mb...: masked alike in any split of the batch."""
    shards = TokenDataset(dataset).shards("train")
    masker = SpanMasker(512, 512, 0.15, 3, seed=7)
    whole = MaskedLoader(BatchLoader(shards, 32, 4, 1, 7), masker)
    ranks = [MaskedLoader(BatchLoader(shards, 32, 1, 2, 7, rank=r, world_size=2), masker) for r in range(2)]
    for _ in range(2):
        x, y = whole.next_step()[0]
        parts = [loader.next_step() for loader in ranks]
        order = [parts[r][m] for m in range(2) for r in range(2)]
        assert torch.equal(x, torch.cat([p[0] for p in order])) and torch.equal(y, torch.cat([p[1] for p in order]))
    resumed = MaskedLoader(BatchLoader(shards, 32, 4, 1, 7), masker)
    resumed.load_state_dict(whole.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_step()[0], whole.next_step()[0], strict=True))
    other = MaskedLoader(BatchLoader(shards, 32, 4, 1, 7), SpanMasker(512, 512, 0.3, 3, seed=7))
    with pytest.raises(DataError, match="data.mask_rate"):
        other.load_state_dict(whole.state_dict())


def test_resume_is_exact(dataset, tmp_path):
    from leantrain.train.trainer import Trainer

    def cfg():
        return tiny_config(dataset, model__objective="mlm", model__vocab_size=520, model__dim=32, model__n_heads=2,
                           model__n_kv_heads=1, train__steps=8, train__eval_every=4, checkpoint__every=4)

    Trainer(cfg(), tmp_path / "straight").fit()
    first = Trainer(cfg(), tmp_path / "resumed")
    first.observers.append(StopAt(first, 4))
    first.fit()
    first.__exit__(None, None, None)
    Trainer(cfg(), tmp_path / "resumed").fit()

    def lines(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r.get("val_loss"), r.get("val_masked_accuracy")) for r in rows]

    straight = lines("straight")
    assert straight == lines("resumed") and straight[-1][3] is not None
    a, b = api.load_model(tmp_path / "straight").model, api.load_model(tmp_path / "resumed").model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


MLM_ARGS = ["--model.objective=mlm", "--model.vocab_size=520", "--model.n_layers=2", "--model.dim=64",
            "--model.n_heads=4", "--model.n_kv_heads=2", "--model.seq_len=64", "--data.mask_rate=0.5",
            "--data.mask_span=1", "--train.steps=240", "--train.micro_batch_size=16", "--train.eval_every=120",
            "--train.eval_steps=4", "--optim.lr=3e-3", "--optim.warmup_steps=20", "--precision.dtype=fp32",
            # around step 100 the encoder starts to use its context and the grad norm triples within a few steps:
            # learning, which the guard's spike rule (tuned on causal runs) can take for a spike (docs/objectives.md)
            "--guard.policy=off",
            "--log.progress=lines", "--log.every=120"]


@pytest.fixture(scope="module")
def mlm_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mlm") / "run"
    r = subprocess.run([sys.executable, "-m", "leantrain.cli", "train", "--run-dir", str(run_dir),
                        f"--data.path={dataset}", *MLM_ARGS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "masked acc" in r.stdout
    return run_dir


def test_tiny_mlm_run_learns_from_the_cli(mlm_run, dataset):
    evals = [r for r in map(json.loads, (mlm_run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    # the baseline: always answering the commonest masked token of the same validation windows
    ds = TokenDataset(dataset)
    windows = SpanMasker(MASK_ID, 512, 0.5, 1, seed=0).val_batches(val_batches(ds.shards("val"), 64, 16, 4))
    labels = torch.cat([y[y != -100] for _, y in windows])
    majority = torch.bincount(labels).max().item() / len(labels)
    accuracy = [r["val_masked_accuracy"] for r in evals]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1 and accuracy[-1] > 2 * majority, (accuracy, majority)
    # the tokenizer data prepare trained reserves <|mask|>: the run's tokenizer is the dataset's
    assert api.load_model(mlm_run).tokenizer.to_str() == TokenDataset(dataset).tokenizer().to_str()
    assert not (mlm_run / "samples.txt").exists()  # an encoder writes no sample
    scores = api.evaluate_masked(mlm_run)  # the trainer's validation, reproduced from the checkpoint
    assert scores["masked_accuracy"] == pytest.approx(accuracy[-1], abs=1e-6)
    assert scores["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    assert api.evaluate(mlm_run) == pytest.approx(scores["loss"], rel=1e-6)


def test_export_matches_transformers_eurobert(mlm_run, dataset, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    info = api.export(mlm_run, tmp_path / "hf")
    assert info["auto_class"] == "AutoModelForMaskedLM"
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "EuroBertForMaskedLM" and tok.mask_token == MASK
    assert tok.mask_token_id == hf.config.mask_token_id == MASK_ID
    windows = val_batches(TokenDataset(dataset).shards("val"), 64, 4, 1)
    x, y = SpanMasker(MASK_ID, 512, 0.5, 1, seed=0).val_batches(windows)[0]
    ours = api.load_model(mlm_run).model
    with torch.no_grad():
        a, b = ours(x), hf(input_ids=x).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    scored = y != -100
    assert torch.equal(a[scored].argmax(-1), b[scored].argmax(-1))
    # and back: the EuroBERT folder imports (train --init-from) as an MLM encoder with the same logits
    from leantrain.model.hf import load_hf_weights, model_config_from_hf

    fields = model_config_from_hf(tmp_path / "hf")
    assert fields["objective"] == "mlm"
    back = Transformer(load_config(overrides={"model": fields}).model).eval()
    load_hf_weights(back, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(back(x), a)
