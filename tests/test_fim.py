"""Fill-in-the-middle: the window transform (exact layouts, invertible, deterministic, rate), its place in the
loader (resume, layout independence), the sentinels in the tokenizer, a FIM run from the CLI that resumes
exactly, `generate --prefix/--suffix/--infill` end to end, and the sentinels in an HF export."""

import json
import re
import warnings

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from helpers import stop_then_resume, tiny_config
from leantrain import api
from leantrain.cli import main
from leantrain.config import load_config
from leantrain.errors import DataError
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.fim import (
    FimTokens,
    FimTransform,
    add_fim_tokens,
    fim_for_dataset,
    fim_layout,
    fim_split,
    find_fim_tokens,
    infill_prompt,
    split_at_marker,
)
from leantrain.tokens.loader import BatchLoader
from leantrain.tokens.prepare import prepare_dataset
from leantrain.tokens.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, load_tokenizer, train_tokenizer
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 0
SENT = FimTokens(prefix=1, suffix=2, middle=3)


def stream(n_docs: int, seed: int = 0, lengths: tuple[int, int] = (1, 40)) -> np.ndarray:
    """Documents of `lengths` tokens (ids 4..99, never a sentinel or EOT), each followed by EOT."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        parts += [rng.integers(4, 100, size=int(rng.integers(lengths[0], lengths[1] + 1))), np.array([EOT])]
    return np.concatenate(parts).astype(np.int64)


def restore(piece: list[int]) -> tuple[list[int], str]:
    """The document a piece came from, and its layout ("plain", "psm" or "spm"): the transform's inverse."""
    if not piece or piece[0] != SENT.prefix:
        return piece, "plain"
    if piece[1] == SENT.suffix:  # SPM: P S suffix M prefix+middle
        m = piece.index(SENT.middle)
        return piece[m + 1:] + piece[2:m], "spm"
    s, m = piece.index(SENT.suffix), piece.index(SENT.middle)
    return piece[1:s] + piece[m + 1:] + piece[s + 1:m], "psm"


def pieces(window: np.ndarray) -> list[list[int]]:
    """The EOT-separated pieces of a window, the last (cut by the window's end) dropped."""
    out, cur = [], []
    for t in window.tolist():
        if t == EOT:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


# ---------------------------------------------------------------- the transform


def test_split_and_layouts_are_exact():
    doc = np.arange(10, 30)
    for seed in range(20):
        pre, mid, suf = fim_split(doc, np.random.default_rng(seed))
        assert np.array_equal(np.concatenate([pre, mid, suf]), doc)
        assert fim_layout(pre, mid, suf, SENT).tolist() == [1, *pre, 2, *suf, 3, *mid]
        assert fim_layout(pre, mid, suf, SENT, spm=True).tolist() == [1, 2, *suf, 3, *pre, *mid]
    cuts = {tuple(map(len, fim_split(doc, np.random.default_rng(s)))) for s in range(200)}
    assert any(0 in c for c in cuts) and len(cuts) > 50  # empty parts happen; cut points vary


def windows_of(data: np.ndarray, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.random.default_rng(1).integers(0, len(data) - width, size=n)
    return np.stack([data[s:s + width] for s in starts]), starts


def layouts_restored(windows: np.ndarray, out: np.ndarray) -> list[str]:
    """The layout of every whole non-empty piece, after checking that the pieces give the window back."""
    layouts = []
    for orig, new in zip(windows, out, strict=True):
        restored = []
        for piece in pieces(new):
            doc, kind = restore(piece)
            restored += [*doc, EOT]
            if doc:  # an empty piece (a window starting at an EOT) has nothing to rearrange
                layouts.append(kind)
        # every whole piece gives its text back in order: the transformed window is the original, rearranged
        assert restored == orig[:len(restored)].tolist()
    return layouts


def test_transform_is_deterministic_invertible_and_respects_the_rates():
    windows, starts = windows_of(stream(3000), 65, 400)
    fim = FimTransform(SENT, EOT, rate=0.5, spm_rate=0.25, seed=7)
    out = fim(windows, starts)
    assert out.shape == windows.shape
    assert np.array_equal(out, fim(windows.copy(), starts.copy()))  # same (seed, index, tokens): same result
    assert not np.array_equal(out, FimTransform(SENT, EOT, 0.5, 0.25, seed=8)(windows, starts))
    assert len(layouts_restored(windows, out)) > 600
    assert np.array_equal(FimTransform(SENT, EOT, 0.0, 0.5, 7)(windows, starts), windows)
    every = layouts_restored(windows, FimTransform(SENT, EOT, 1.0, 0.0, 7)(windows, starts))
    assert "plain" not in every
    # the rates, on long documents: a PSM piece with an empty prefix reads as SPM, rare when cuts have 201 places
    long_windows, long_starts = windows_of(stream(3000, lengths=(200, 200)), 1001, 500)
    layouts = layouts_restored(long_windows, fim(long_windows, long_starts))
    fimmed = [k for k in layouts if k != "plain"]
    assert len(layouts) > 1500 and abs(len(fimmed) / len(layouts) - 0.5) < 0.05
    assert abs(fimmed.count("spm") / len(fimmed) - 0.25) < 0.05


def test_loader_with_fim_resumes_and_ignores_the_process_layout():
    shards = [stream(400, seed=2).astype(np.uint16)]
    fim = FimTransform(SENT, EOT, 0.5, 0.5, seed=3)
    a = BatchLoader(shards, 32, 4, 1, seed=5, transform=fim)
    steps = [a.next_step() for _ in range(3)]
    assert any((x == SENT.prefix).any() for (x, _), in steps)
    b = BatchLoader(shards, 32, 2, 2, seed=5, transform=fim)  # another split of the same global batch
    b.load_state_dict(a.state_dict() | {"step": 2})
    (x2a, y2a), (x2b, y2b) = b.next_step()
    assert np.array_equal(np.concatenate([x2a, x2b]), steps[2][0][0])
    assert np.array_equal(np.concatenate([y2a, y2b]), steps[2][0][1])
    other = BatchLoader(shards, 32, 4, 1, seed=5, transform=FimTransform(SENT, EOT, 0.2, 0.5, seed=3))
    with pytest.raises(DataError, match="fim_rate"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="fim_rate"):
        BatchLoader(shards, 32, 4, 1, seed=5).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- sentinels and prompts


def bare_tokenizer(extra: list[AddedToken] | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer with EOT only, as another tool would make it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    tok.train_from_iterator(["def f(x):\n    return x\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if extra:
        tok.add_tokens(extra)
    return tok


def test_trained_tokenizers_reserve_the_sentinels_and_others_gain_them():
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 20, 300)
    found = find_fim_tokens(tok)
    assert found is not None and found.ids() == tuple(tok.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert add_fim_tokens(tok, tok.token_to_id("<|endoftext|>"), "t") == (found, False)
    bare = bare_tokenizer()
    n = bare.get_vocab_size()
    tokens, added = add_fim_tokens(bare, 0, "bare")
    assert added and tokens.ids() == (n, n + 1, n + 2) and find_fim_tokens(bare) == tokens
    starcoder = bare_tokenizer()
    starcoder.add_special_tokens(["<fim_prefix>", "<fim_middle>", "<fim_suffix>"])
    assert find_fim_tokens(starcoder) == FimTokens(n, n + 2, n + 1)  # another scheme's sentinels are reused
    clash = bare_tokenizer([AddedToken(FIM_PREFIX, special=False)])
    with pytest.raises(DataError, match="ordinary token"):
        add_fim_tokens(clash, 0, "clash")


def test_infill_prompt_layouts_and_marker():
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 20, 300)
    t = find_fim_tokens(tok)
    pre, suf = tok.encode("def f(").ids, tok.encode("):\n    return x\n").ids
    assert infill_prompt(tok, "def f(", "):\n    return x\n", t) == [t.prefix, *pre, t.suffix, *suf, t.middle]
    assert infill_prompt(tok, "def f(", "):\n    return x\n", t, "spm") == [t.prefix, t.suffix, *suf, t.middle, *pre]
    typed = infill_prompt(tok, FIM_MIDDLE, "", t)  # a sentinel's name in the text is text
    assert typed.count(t.middle) == 1 and len(typed) > 4
    assert split_at_marker("a<FILL>b") == ("a", "b")
    with pytest.raises(DataError, match="2 times"):
        split_at_marker("<FILL><FILL>")


def test_a_tokenizer_without_sentinels_gains_them_in_the_run(tmp_path):
    bare = bare_tokenizer()
    bare.save(str(tmp_path / "tok.json"))
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)]
    from leantrain.corpus.readers import Document

    prepare_dataset(lambda: (Document(str(i), d, "test") for i, d in enumerate(docs)), tmp_path / "ds",
                    tokenizer_path=tmp_path / "tok.json", val_fraction=0.1)
    data = TokenDataset(tmp_path / "ds")
    with pytest.raises(DataError, match=f"model.vocab_size={data.vocab_size + 3}"):
        fim_for_dataset(data, 0.5, 0.5, 0, data.vocab_size)
    fim, tok = fim_for_dataset(data, 0.5, 0.5, 0, data.vocab_size + 3)
    assert tok is not None and fim.tokens.ids() == tuple(range(data.vocab_size, data.vocab_size + 3))
    cfg = tiny_config(tmp_path / "ds", data__fim_rate=0.5, model__vocab_size=data.vocab_size + 3, train__steps=1,
                      train__eval_every=1, train__eval_steps=1, model__seq_len=16, checkpoint__every=1)
    Trainer(cfg, tmp_path / "run").fit()
    assert find_fim_tokens(load_tokenizer(tmp_path / "run")) == fim.tokens  # the run's tokenizer knows them


# ---------------------------------------------------------------- a FIM run, resumed; infilling; export


# helpers.tiny_config's model and loop, with FIM: the same settings for the CLI run and the Trainer runs
FIM_RUN = {
    "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "seq_len": 64, "vocab_size": 512},
    "data": {"fim_rate": 0.5, "fim_spm_rate": 0.5},
    "train": {"steps": 6, "micro_batch_size": 4, "eval_every": 3, "eval_steps": 2, "sample_tokens": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "precision": {"dtype": "fp32"},
    "checkpoint": {"every": 3, "keep": 2},
    "log": {"every": 1, "progress": "none"},
}


@pytest.fixture(scope="module")
def fim_run(dataset, tmp_path_factory):
    """A 6-step FIM run trained by `leantrain train` on the built-in corpus's tiny dataset, and its config."""
    run = tmp_path_factory.mktemp("fim") / "run"
    settings = {**FIM_RUN, "data": {**FIM_RUN["data"], "path": str(dataset)}}
    args = [f"--{section}.{key}={value}" for section, keys in settings.items() for key, value in keys.items()]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    return run, load_config(overrides=settings)


def test_fim_run_from_the_cli_resumes_exactly(fim_run, tmp_path):
    run, cfg = fim_run
    stop_then_resume(cfg, tmp_path / "resumed", 3)

    def losses(r):
        return {m["step"]: m["loss"] for m in read_jsonl(r / "metrics.jsonl")}

    assert losses(tmp_path / "resumed") == losses(run) and len(losses(run)) == 6
    state = json.loads((run / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["loader"]["transform"] == {"kind": "fim", "rate": 0.5, "spm_rate": 0.5, "sentinels": [1, 2, 3]}


def test_generate_infill_end_to_end(fim_run, tmp_path, capsys):
    run, _ = fim_run
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    common = ["--max-new-tokens", "6", "--temperature", "0"]
    assert main(["generate", str(run), "--prefix", prefix, "--suffix", suffix, *common]) == 0
    middle = capsys.readouterr().out
    assert middle == api.generate(run, prefix, suffix=suffix, max_new_tokens=6, temperature=0) + "\n"
    hole = tmp_path / "hole.py"
    hole.write_text(prefix + "<FILL>" + suffix)
    assert main(["generate", str(run), "--infill", str(hole), *common]) == 0
    assert capsys.readouterr().out == middle
    assert main(["generate", str(run), "--prefix", prefix, "--suffix", suffix, "--fim-mode", "spm", *common]) == 0
    assert "<|fim" not in capsys.readouterr().out
    # a constraint shapes the middle too: the tiny model's middle, held to a regex, matches it
    with warnings.catch_warnings():
        warnings.simplefilter("error", api.IncompleteOutputWarning)
        constrained = api.generate(run, prefix, suffix=suffix, regex=r"c = [a-z]{1,3}", max_new_tokens=12,
                                   temperature=1.0, seed=3)
    assert re.fullmatch(r"c = [a-z]{1,3}", constrained), constrained


def test_hf_export_carries_the_sentinels(fim_run, tmp_path):
    run, _ = fim_run
    api.export(run, tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    run_tok = load_tokenizer(run)
    for name in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE):
        assert special[name] == run_tok.token_to_id(name)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = hf(FIM_PREFIX + "def" + FIM_MIDDLE, add_special_tokens=False)["input_ids"]
    assert ids[0] == special[FIM_PREFIX] and ids[-1] == special[FIM_MIDDLE]
    assert hf.decode(ids, skip_special_tokens=True) == "def"
