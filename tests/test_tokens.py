"""Tokenizer, shards, token dataset, prepare and loader: real files, real tokenizers, no mocks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from leantrain.corpus.readers import Document, ReadStats, read_paths
from leantrain.errors import DataError
from leantrain.tokens.dataset import ShardWriter, TokenDataset, dtype_for_vocab
from leantrain.tokens.loader import BatchLoader, val_batches
from leantrain.tokens.prepare import prepare_dataset, split_hash
from leantrain.tokens.tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer

VOCAB = 400

# ---------------------------------------------------------------- fixtures


def _text(rng: random.Random, n_lines: int) -> str:
    words = ["def", "return", "self", "import", "value", "class", "for", "in", "if", "else", "None", "x", "y"]
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randint(0, 2)
        lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + ":")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 small documents: text files in folders plus a jsonl with some bad lines."""
    root = tmp_path_factory.mktemp("corpus") / "src"
    rng = random.Random(0)
    for i in range(24):
        p = root / f"pkg{i % 3}" / f"mod{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_text(rng, 20))
    (root / "notes.md").write_text("# Notes\n\nünïcödé ✓ 日本語 🐍 and a literal <|endoftext|> inside text\n")
    rows = [json.dumps({"text": _text(rng, 10)}) for _ in range(15)] + ["{broken"]
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _docs(corpus: Path):
    return lambda: read_paths([corpus])


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ds") / "tiny"
    meta = prepare_dataset(_docs(corpus), out, vocab_size=VOCAB, shard_tokens=2000, val_fraction=0.1)
    return out, meta


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_vocab(corpus: Path) -> None:
    texts = [d.text for d in read_paths([corpus])]
    tok = train_tokenizer(texts, vocab_size=VOCAB)
    assert 257 < tok.get_vocab_size() <= VOCAB
    assert eot_id(tok) == tok.token_to_id(EOT)
    for s in ["def f(x):\n\treturn x  # ünïcödé ✓\r\n", "日本語 🐍 \x00\x7f", "  leading spaces", ""]:
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s
    # merges were learned: common words take fewer tokens than bytes
    assert len(tok.encode("return self").ids) < len("return self")


def test_tokenizer_is_deterministic(corpus: Path) -> None:
    texts = [d.text for d in read_paths([corpus])]
    assert train_tokenizer(texts, 350).to_str() == train_tokenizer(iter(texts), 350).to_str()


def test_tokenizer_vocab_too_small() -> None:
    with pytest.raises(DataError, match="at least 261"):
        train_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not a tokenizer")
    with pytest.raises(DataError, match="cannot be read"):
        load_tokenizer(bad)
    tok = train_tokenizer(["abc abc"], 300)
    tok.save(str(tmp_path / "good.json"))
    assert load_tokenizer(tmp_path / "good.json").to_str() == tok.to_str()
    blob = json.loads(tok.to_str())
    blob["added_tokens"] = []
    blob["model"]["vocab"].pop(EOT)
    (tmp_path / "noeot.json").write_text(json.dumps(blob))
    with pytest.raises(DataError, match="endoftext"):
        load_tokenizer(tmp_path / "noeot.json")


# ---------------------------------------------------------------- shards


def test_shard_writer_round_trip_and_rolling(tmp_path: Path) -> None:
    data = [np.arange(7), np.arange(100, 118), np.array([], dtype=np.int64), [5, 6, 7]]
    w = ShardWriter(tmp_path / "train", np.uint16, shard_tokens=10)
    for a in data:
        w.write(a)
    shards = w.close()
    assert [p.name for p in shards] == ["000000.bin", "000001.bin", "000002.bin"]
    assert [p.stat().st_size for p in shards] == [20, 20, 16]
    assert not list((tmp_path / "train").glob("*.tmp"))
    back = np.concatenate([np.memmap(p, dtype=np.uint16, mode="r") for p in shards])
    assert back.tolist() == np.concatenate([np.asarray(a) for a in data]).tolist()
    assert w.tokens == 28


def test_shard_dtype_uint32_for_big_vocab(tmp_path: Path) -> None:
    assert dtype_for_vocab(8192) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16  # ids 0..65535 fit
    assert dtype_for_vocab(65537) == np.uint32
    ids = np.array([0, 65535, 65536, 99_999], dtype=np.int64)
    with ShardWriter(tmp_path, dtype_for_vocab(100_000), shard_tokens=3) as w:
        w.write(ids)
    back = np.concatenate([np.memmap(p, dtype=np.uint32, mode="r") for p in sorted(tmp_path.glob("*.bin"))])
    assert back.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="uint16"):
        ShardWriter(tmp_path / "small", np.uint16).write(np.array([70_000]))


def test_shard_writer_abort_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, np.uint16, shard_tokens=10) as w:
        w.write(np.arange(15))
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.bin"]


# ---------------------------------------------------------------- prepare + dataset


def test_prepare_gives_a_valid_dataset(prepared: tuple[Path, dict], corpus: Path) -> None:
    out, meta = prepared
    docs = list(read_paths([corpus]))
    ds = TokenDataset(out, vocab_size=VOCAB)
    assert ds.meta == json.loads((out / "meta.json").read_text()) == meta
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["tokenizer"] == "tokenizer.json"
    assert ds.vocab_size <= VOCAB and ds.eot_id == ds.tokenizer().token_to_id(EOT)
    s = meta["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == len(docs) == 40
    assert s["val"]["documents"] >= 1 and len(s["train"]["shards"]) > 1  # shard_tokens=2000 rolls
    assert meta["provenance"]["tokenizer"] == "trained" and meta["provenance"]["leantrain_version"]
    tok = ds.tokenizer()
    texts = {}
    for split in ("train", "val"):
        arr = np.concatenate([np.asarray(m) for m in ds.shards(split)])
        assert len(arr) == ds.num_tokens(split) == s[split]["tokens"]
        assert arr[-1] == ds.eot_id and int((arr == ds.eot_id).sum()) == s[split]["documents"]
        bounds = np.flatnonzero(arr == ds.eot_id)
        pieces = np.split(arr, bounds + 1)[:-1]
        texts[split] = [tok.decode(p[:-1].tolist()) for p in pieces]
        assert not ds.shards(split)[0].flags.writeable
    # every document is intact in exactly one split; the literal EOT string stayed text
    assert sorted(texts["train"] + texts["val"]) == sorted(d.text for d in docs)
    # the split follows the hash rule (no document needed moving here)
    val_ids = {d.id for d in docs if split_hash(d.id) < 0.1}
    assert sorted(texts["val"]) == sorted(d.text for d in docs if d.id in val_ids)


def test_prepare_is_deterministic_and_reuses_tokenizers(prepared: tuple[Path, dict], corpus: Path,
                                                        tmp_path: Path) -> None:
    out, meta = prepared
    again = tmp_path / "again"
    meta2 = prepare_dataset(_docs(corpus), again, vocab_size=VOCAB, shard_tokens=2000, val_fraction=0.1)
    assert meta2["splits"] == meta["splits"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "meta.json")
    assert files == sorted(p.relative_to(again).as_posix() for p in again.rglob("*")
                           if p.is_file() and p.name != "meta.json")
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    reused = prepare_dataset(_docs(corpus), tmp_path / "reused", tokenizer_path=out, vocab_size=999,
                             shard_tokens=2000, val_fraction=0.1)
    assert reused["provenance"]["tokenizer"] == "reused"
    assert (tmp_path / "reused" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert reused["splits"] == meta["splits"]


def test_prepare_in_many_batches_writes_the_same_bytes(prepared: tuple[Path, dict], corpus: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Several batches encode at once while the one before them is written: still input order, same bytes."""
    import leantrain.tokens.prepare as prepare_module

    out, meta = prepared
    monkeypatch.setattr(prepare_module, "_BATCH_DOCS", 2)  # ~20 batches instead of one
    again, lengths = tmp_path / "small-batches", []
    meta2 = prepare_dataset(_docs(corpus), again, vocab_size=VOCAB, shard_tokens=2000, val_fraction=0.1,
                            doc_tokens=lengths)
    assert meta2["splits"] == meta["splits"]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "meta.json")
    assert len(files) > 2
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    tok = load_tokenizer(out)
    tok.encode_special_tokens = True
    assert lengths == [len(tok.encode(d.text, add_special_tokens=False).ids) for d in read_paths([corpus]) if d.text]

    def failing():  # a read error after some batches are already encoding: nothing is left behind
        docs = list(read_paths([corpus]))
        yield from docs[:9]
        raise DataError("input vanished")

    with pytest.raises(DataError, match="vanished"):
        prepare_dataset(failing, tmp_path / "failed", tokenizer_path=out, shard_tokens=2000)
    assert not any(p.name.startswith((".failed", "failed")) for p in tmp_path.iterdir())


def test_prepare_refuses_to_overwrite(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare_dataset(_docs(corpus), out, vocab_size=300)
    before = (out / "train" / "000000.bin").read_bytes()
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dataset(_docs(corpus), out, vocab_size=VOCAB)
    assert (out / "train" / "000000.bin").read_bytes() == before
    meta = prepare_dataset(_docs(corpus), out, vocab_size=VOCAB, overwrite=True)
    assert TokenDataset(out).vocab_size == meta["vocab_size"] > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary or old folders left
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing"):
        prepare_dataset(_docs(corpus), other, vocab_size=300, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_prepare_failure_leaves_nothing(tmp_path: Path) -> None:
    def docs():
        yield Document("a", "some text " * 50, "t")
        raise DataError("input vanished")

    with pytest.raises(DataError, match="vanished"):
        prepare_dataset(docs, tmp_path / "ds", vocab_size=300)
    assert list(tmp_path.iterdir()) == []


def test_prepare_no_documents(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no documents"):
        prepare_dataset(lambda: read_paths([tmp_path / "in"]), tmp_path / "ds", vocab_size=300)
    with pytest.raises(DataError, match="no documents"):
        prepare_dataset(lambda: [Document("a", "", "x")], tmp_path / "ds2", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prepare_always_fills_both_splits(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"document number {i} " * 30, "t") for i in range(5)]
    meta = prepare_dataset(lambda: docs, tmp_path / "a", vocab_size=300, val_fraction=0.0)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (4, 1)
    ds = TokenDataset(tmp_path / "a")
    low = min(docs, key=lambda d: split_hash(d.id))  # the lowest-hash document is the one moved to val
    assert ds.tokenizer().decode(np.asarray(ds.shards("val")[0][:-1]).tolist()) == low.text
    one = [Document("only", "a single long document. " * 200, "t")]
    meta = prepare_dataset(lambda: one, tmp_path / "b", vocab_size=300, val_fraction=0.1)
    s = meta["splits"]
    assert s["train"]["documents"] == s["val"]["documents"] == 1
    assert 0.05 < s["val"]["tokens"] / (s["train"]["tokens"] + s["val"]["tokens"]) < 0.15
    ds = TokenDataset(tmp_path / "b")
    body = [np.asarray(ds.shards(x)[0][:-1]) for x in ("train", "val")]
    assert ds.tokenizer().decode(np.concatenate(body).tolist()) == one[0].text


def test_prepare_progress_reports_stages(corpus: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int | None]] = []
    prepare_dataset(_docs(corpus), tmp_path / "ds", vocab_size=300, progress=lambda *a: calls.append(a))
    assert ("tokenizer", 40, 40) in calls and calls[-1] == ("encode", 40, 40)


def test_damaged_datasets_fail_with_a_fix(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    def copy(name: str) -> Path:
        return Path(shutil.copytree(prepared[0], tmp_path / name))

    with pytest.raises(DataError, match="does not exist.*leantrain data prepare"):
        TokenDataset(tmp_path / "nothing")
    d = copy("nometa")
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json.*--overwrite"):
        TokenDataset(d)
    d = copy("odd")
    shard = d / "train" / "000000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(d)
    d = copy("short")
    shard = d / "train" / "000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="meta.json says"):
        TokenDataset(d)
    d = copy("missing")
    (d / "val" / "000000.bin").unlink()
    with pytest.raises(DataError, match="missing"):
        TokenDataset(d)
    d = copy("vocab")
    meta = json.loads((d / "meta.json").read_text())
    meta["vocab_size"] += 1
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocab_size"):
        TokenDataset(d)
    d = copy("empty")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"] = {"shards": [], "tokens": 0, "documents": 0}
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="val split is empty"):
        TokenDataset(d)
    with pytest.raises(DataError, match="model.vocab_size = 300"):
        TokenDataset(prepared[0], vocab_size=300)


def test_loader_on_a_prepared_dataset(prepared: tuple[Path, dict]) -> None:
    ds = TokenDataset(prepared[0])
    loader = BatchLoader(ds.shards("train"), seq_len=32, micro_batch_size=4, grad_accum_steps=2, seed=1)
    for x, y in loader.next_step():
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 32)
        assert int(x.max()) < ds.vocab_size and torch.equal(x[:, 1:], y[:, :-1])


# ---------------------------------------------------------------- loader

SEQ = 16


def _shards() -> list[np.ndarray]:
    """Token value = position, with gaps between shards, so a window is identified by its first token
    and a window that crossed a shard end would show a jump."""
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(2000, 2300, dtype=np.uint16),
            np.arange(5000, 5010, dtype=np.uint16)]


def _starts(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    return [x[:, 0].tolist() for x, _ in batches]


def test_loader_batches_are_windows_of_one_shard() -> None:
    loader = BatchLoader(_shards(), SEQ, micro_batch_size=8, grad_accum_steps=3, seed=0)
    seen = []
    for _ in range(50):
        step = loader.next_step()
        assert len(step) == 3
        for x, y in step:
            assert x.shape == y.shape == (8, SEQ) and x.dtype == torch.int64 and x.is_contiguous()
            assert torch.equal(y, x + 1)  # y is x shifted by one, inside one contiguous window
            seen += x[:, 0].tolist()
    seen_a = np.array(seen)
    assert not ((seen_a >= 5000).any())  # the 10-token shard cannot hold a window of 17
    assert seen_a.max() <= 2300 - SEQ - 1 and not ((seen_a > 1000 - SEQ - 1) & (seen_a < 2000)).any()
    frac = (seen_a < 1000).mean()  # shards are chosen in proportion to their valid starts: 984 vs 284
    assert abs(frac - 984 / 1268) < 0.05
    assert loader.step == 50


def test_loader_is_deterministic_by_seed() -> None:
    a = BatchLoader(_shards(), SEQ, 4, 2, seed=7)
    b = BatchLoader(_shards(), SEQ, 4, 2, seed=7)
    c = BatchLoader(_shards(), SEQ, 4, 2, seed=8)
    sa, sb, sc = ([_starts(x.next_step()) for _ in range(5)] for x in (a, b, c))
    assert sa == sb and sa != sc
    assert sa[0] != sa[1]  # steps differ from each other


def test_loader_layout_independence() -> None:
    """1 rank x accum 2 x mb 4, 2 ranks x accum 1 x mb 4 and 2 ranks x accum 2 x mb 2 see the same windows."""
    one = BatchLoader(_shards(), SEQ, 4, 2, seed=3)
    ranks = [BatchLoader(_shards(), SEQ, 4, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    small = [BatchLoader(_shards(), SEQ, 2, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        a = _starts(one.next_step())
        b = [_starts(r.next_step())[0] for r in ranks]
        c = [_starts(r.next_step()) for r in small]
        assert a == b  # micro-batch m of 1 rank == rank m of 2: windows [(m*ws + r)*mb, +mb)
        flat = sum(a, [])  # the global batch in order
        for r in range(2):
            for m in range(2):
                assert c[r][m] == flat[(m * 2 + r) * 2:(m * 2 + r) * 2 + 2]
        assert sorted(flat) == sorted(sum((sum(x, []) for x in c), []))
        assert a[0] != a[1]


def test_loader_state_round_trip_and_skip() -> None:
    orig = BatchLoader(_shards(), SEQ, 4, 2, seed=5)
    for _ in range(3):
        orig.next_step()
    orig.skip_step()
    state = json.loads(json.dumps(orig.state_dict()))
    assert state["step"] == 4 and state["seed"] == 5
    expected = [_starts(orig.next_step()) for _ in range(3)]
    resumed = BatchLoader(_shards(), SEQ, 4, 2, seed=5)
    resumed.load_state_dict(state)
    assert [_starts(resumed.next_step()) for _ in range(3)] == expected
    fresh = BatchLoader(_shards(), SEQ, 4, 2, seed=5)
    assert _starts(fresh.next_step()) != expected[0]  # the state is what makes the difference
    # the same global batch split across two ranks resumes to the same windows
    elastic = BatchLoader(_shards(), SEQ, 4, 1, seed=5, rank=1, world_size=2)
    elastic.load_state_dict(state)
    assert _starts(elastic.next_step())[0] == expected[0][1]


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"seed": 6}, "seed"),
    ({"seq_len": SEQ + 1}, "seq_len"),
    ({"micro_batch_size": 8}, "global batch"),
    ({"shards": _shards()[:1]}, "tokens"),
])
def test_loader_state_mismatch(kwargs: dict, what: str) -> None:
    state = BatchLoader(_shards(), SEQ, 4, 2, seed=5).state_dict()
    args = {"shards": _shards(), "seq_len": SEQ, "micro_batch_size": 4, "grad_accum_steps": 2, "seed": 5} | kwargs
    with pytest.raises(DataError, match=what):
        BatchLoader(**args).load_state_dict(state)


def test_loader_too_short_data() -> None:
    with pytest.raises(DataError, match=r"has 10 tokens, fewer than seq_len\+1 = 17; lower model.seq_len"):
        BatchLoader([np.arange(10, dtype=np.uint16)], SEQ, 2, 1, seed=0)
    with pytest.raises(DataError, match="longest shard has 16 tokens"):
        BatchLoader([np.arange(16), np.arange(5)], SEQ, 2, 1, seed=0)
    exact = BatchLoader([np.arange(SEQ + 1)], SEQ, 2, 1, seed=0)  # one valid window, drawn every time
    assert _starts(exact.next_step()) == [[0, 0]]


def test_val_batches_fixed_and_evenly_spaced() -> None:
    shards = _shards()
    a = val_batches(shards, SEQ, batch_size=4, n_batches=3)
    b = val_batches(shards, SEQ, batch_size=4, n_batches=3)
    assert len(a) == 3 and all(x.shape == (4, SEQ) for x, _ in a)
    assert _starts(a) == _starts(b)
    starts = sum(_starts(a), [])
    assert starts == sorted(starts) and len(set(starts)) == 12
    assert starts[0] < 100 and starts[-1] > 2100  # spread over both usable shards
    for x, y in a:
        assert torch.equal(y, x + 1)


def test_val_batches_small_split() -> None:
    small = [np.arange(SEQ + 3, dtype=np.uint16)]  # three windows fit
    got = val_batches(small, SEQ, batch_size=4, n_batches=2)
    assert len(got) == 1 and _starts(got) == [[0, 1, 2]]
    got = val_batches(small, SEQ, batch_size=2, n_batches=5)
    assert [len(x) for x, _ in got] == [2, 1]
    with pytest.raises(DataError, match="val split has 5 tokens"):
        val_batches([np.arange(5)], SEQ, 4, 2)
    assert isinstance(ReadStats().summary(), str)
