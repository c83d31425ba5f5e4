"""Weighted source mixing: `data prepare --source`, the loader's draw by weight, resume, the run's report.

The two sources are made so that their tokens never overlap: "words" documents hold only lowercase
letters, "digits" documents only digits (plus spaces and newlines, which both share). A window never
crosses a source, so whether its tokens decode to digits tells, from the batch alone, which source it came
from: the realised mix is counted on what the loader really hands out.
"""

import json
import random

import numpy as np
import pytest

from helpers import StopAt, tiny_config
from leantrain.cli import main
from leantrain.config import CurationConfig
from leantrain.dataprep import prepare
from leantrain.errors import DataError
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.loader import BatchLoader
from leantrain.tokens.mix import resolve_weights
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_sources(root):
    rng = random.Random(0)
    words, digits = root / "words", root / "digits"
    words.mkdir(parents=True)
    digits.mkdir()
    for i in range(60):
        (words / f"{i}.txt").write_text("\n".join(" ".join("".join(rng.choice("abcdefghij") for _ in range(
            rng.randint(2, 7))) for _ in range(12)) for _ in range(20)))
    for i in range(15):
        (digits / f"{i}.txt").write_text("\n".join(" ".join(str(rng.randint(0, 99999)) for _ in range(12))
                                                   for _ in range(20)))
    return words, digits


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    words, digits = write_sources(root)
    # weights 4 : 1 are stored normalised (0.8 : 0.2); the second source is named after its folder
    result = prepare(out=root / "mixed", sources=[f"real={words}:4", f"{digits}:1"], vocab_size=300,
                     val_fraction=0.1, curation=CurationConfig(executor="serial"), plot=False)
    return result


def loader(ds, weights=None, seed=7, mb=8, rank=0, world=1):
    w = weights or ds.mix
    return BatchLoader(ds.shards("train"), 64, mb, 1, seed, rank=rank, world_size=world,
                       mix=[(n, w[n], k) for n, k in zip(ds.mix, ds.source_shard_counts("train"), strict=True)])


def digit_ids(ds):
    tok = ds.tokenizer()
    return np.array([i for i in range(tok.get_vocab_size()) if any(c.isdigit() for c in tok.decode([i]))])


def from_digits(ds, x):
    """Per window of x: True when it came from the digits source (any digit token), False for words."""
    has_digit = np.isin(x.numpy(), digit_ids(ds)).any(axis=1)
    tok = ds.tokenizer()
    letters = np.array([i for i in range(tok.get_vocab_size()) if any(c.isalpha() for c in tok.decode([i]))])
    assert not (has_digit & np.isin(x.numpy(), letters).any(axis=1)).any()  # a window never mixes sources
    return has_digit


def test_prepare_writes_each_source_and_records_the_mix(mixed):
    out, meta = mixed.out, mixed.meta
    ds = TokenDataset(out)
    assert ds.mix == pytest.approx({"real": 0.8, "digits": 0.2})
    for split in ("train", "val"):
        parts = meta["splits"][split]["sources"]
        assert list(parts) == ["real", "digits"] and all(parts[n]["tokens"] > 0 for n in parts)
        assert all(rel.startswith(f"{split}/{n}/") for n in parts for rel in parts[n]["shards"])
        assert sum(p["tokens"] for p in parts.values()) == ds.num_tokens(split)
    src = meta["mix"]["sources"]
    assert src["digits"]["tokens_per_epoch"] == round(src["digits"]["train_tokens"] / 0.2)
    card = json.loads((out / "data_card.json").read_text())
    assert card["mix"]["sources"]["real"]["train_tokens"] == ds.source_tokens("train")["real"]
    md = (out / "data_card.md").read_text()
    assert "## Mixture" in md and "| digits | 0.2 |" in md


def test_realised_mix_matches_the_weights_and_ranks_split_it(mixed):
    ds = TokenDataset(mixed.out)
    ld = loader(ds)
    seen = np.concatenate([from_digits(ds, x) for _ in range(250) for x, _ in ld.next_step()])
    assert len(seen) == 2000 and abs(seen.mean() - 0.2) < 0.04  # 4.5 standard deviations
    # the count of what was handed out is the loader's own account of the draw
    assert seen.sum() == sum(int(ld.sources_of_step(s).sum()) for s in range(250))
    # re-weighed for one run ([data] mix) far from the sources' token shares (digits hold ~23% of the tokens):
    # what is drawn follows the weights, not the sizes
    assert ds.source_tokens("train")["digits"] / ds.num_tokens("train") < 0.3
    heavy = loader(ds, resolve_weights(ds.mix, {"digits": 3, "real": 2}, ds.path))
    seen = np.concatenate([from_digits(ds, x) for _ in range(125) for x, _ in heavy.next_step()])
    assert abs(seen.mean() - 0.6) < 0.05
    # sources left out get 0
    only = loader(ds, resolve_weights(ds.mix, {"digits": 3}, ds.path))
    assert all(from_digits(ds, x).all() for _ in range(20) for x, _ in only.next_step())
    # two ranks of 4 see the two halves of the one-rank batch of 8: disjoint parts of the same draw
    one = loader(ds, mb=8)
    ranks = [loader(ds, mb=4, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        (x, _), = one.next_step()
        (x0, _), = ranks[0].next_step()
        (x1, _), = ranks[1].next_step()
        assert (x[:4] == x0).all() and (x[4:] == x1).all()


def test_mix_is_deterministic_and_resumes_exactly(mixed):
    ds = TokenDataset(mixed.out)
    a, b = loader(ds), loader(ds)
    straight = [a.next_step()[0][0] for _ in range(12)]
    assert all((x == b.next_step()[0][0]).all() for x in straight)  # two loaders, same batches
    assert not (loader(ds, seed=8).next_step()[0][0] == straight[0]).all()  # the seed matters
    first = loader(ds)
    for _ in range(5):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's state.json keeps it
    resumed = loader(ds)
    resumed.load_state_dict(state)
    assert all((resumed.next_step()[0][0] == x).all() for x in straight[5:])
    with pytest.raises(DataError, match="source mix"):
        loader(ds, {"real": 0.5, "digits": 0.5}).load_state_dict(state)


def test_weights_that_cannot_be_used_are_refused(mixed):
    ds = TokenDataset(mixed.out)
    with pytest.raises(DataError, match="'synthetic', which the dataset does not have"):
        resolve_weights(ds.mix, {"synthetic": 1.0}, ds.path)
    with pytest.raises(DataError, match="do not sum to a positive"):
        resolve_weights(ds.mix, {"real": 0, "digits": 0}, ds.path)
    with pytest.raises(DataError, match="not a mixed dataset"):
        resolve_weights(None, {"real": 1}, "data/x")


def test_cli_prepares_and_trains_on_a_mix_and_resumes_bit_for_bit(tmp_path, capsys):
    words, digits = write_sources(tmp_path / "in")
    out = tmp_path / "mixed"
    assert main(["data", "prepare", "--source", f"real={words}:0.8", "--source", f"synthetic={digits}:0.2",
                 "--out", str(out), "--vocab-size", "300", "--executor", "serial"]) == 0
    printed = capsys.readouterr().out
    assert "source real: weight 0.8" in printed and "source synthetic: weight 0.2" in printed
    args = ["train", "--run-dir", str(tmp_path / "run"), f"--data.path={out}", "--model.n_layers=1",
            "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32",
            "--model.vocab_size=300", "--train.steps=6", "--train.micro_batch_size=4", "--train.eval_steps=1",
            "--train.sample_tokens=0", "--precision.dtype=fp32", "--log.progress=lines"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mix" in printed and "synthetic weight 0.2" in printed and "epochs" in printed
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    syn = plan["mix"]["synthetic"]
    assert syn["epochs"] == pytest.approx(0.2 * 6 * 4 * 32 / syn["train_tokens"])
    event = next(e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "mix")
    assert event["sources"] == plan["mix"]

    # a run stopped mid-way and resumed trains on exactly the batches of one that was not
    cfg = tiny_config(out, model__vocab_size=300, train__steps=8, checkpoint__every=4, data__mix={"synthetic": 1,
                                                                                                 "real": 1})
    Trainer(cfg, tmp_path / "straight").fit()
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 4))
    assert first.fit()["step"] == 4
    Trainer(cfg, tmp_path / "resumed").fit()

    def losses(run):
        return {r["step"]: r["loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl")}
    assert losses("resumed") == losses("straight") and len(losses("straight")) == 8
