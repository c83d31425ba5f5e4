"""Hugging Face interop for data: `datasets` folders and files as input, local HF tokenizer folders as tokenizers.

Everything is made here, offline: a `save_to_disk` folder and a parquet file of real text (standard
library sources) with duplicates, an empty and a null row; a tiny byte-level BPE trained with
`tokenizers` and saved by transformers' `PreTrainedTokenizerFast.save_pretrained` with bos/eos/pad
and a chat marker. The data goes through the real curation pipeline (dedup counted on the card), the
token ids are checked against transformers' own encoding, and a 5-step run on them generates and
exports a folder that `AutoTokenizer` reads back with the same special tokens.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from leantrain import api  # noqa: E402
from leantrain.cli import main  # noqa: E402
from leantrain.corpus.hf import HFSource  # noqa: E402
from leantrain.corpus.readers import read_builtin  # noqa: E402

N_DOCS = 24
DUPES = 3
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def texts():
    """Distinct real documents: the first standard-library sources of a few KB each."""
    docs = (d.text for d in read_builtin("stdlib") if 500 < len(d.text) < 6000)
    return list(itertools.islice(docs, N_DOCS))


def _rows(texts):
    """The column as a user's dataset might hold it: duplicates, an empty string and a null."""
    return [*texts, *texts[:DUPES], "", None]


@pytest.fixture(scope="module")
def disk_dataset(texts, tmp_path_factory):
    """A DatasetDict folder (train + test) whose text is in a field named "body", not "text"."""
    out = tmp_path_factory.mktemp("hf") / "saved"
    rows = _rows(texts)
    train = datasets.Dataset.from_dict({"body": rows, "n": list(range(len(rows)))})
    datasets.DatasetDict({"train": train, "test": train.select(range(4))}).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def parquet_file(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "docs.parquet"
    datasets.Dataset.from_dict({"content": _rows(texts)}).to_parquet(str(out))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(texts, tmp_path_factory):
    """A local HF tokenizer folder: byte-level BPE with a bos post-processor, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = tmp_path_factory.mktemp("hf") / "tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         additional_special_tokens=SPECIALS[3:]).save_pretrained(str(out))
    return out


def _prepare(capsys, *args):
    capsys.readouterr()
    code = main(["data", "prepare", "--executor", "serial", "--val-fraction", "0.2", *args])
    return code, capsys.readouterr()


def test_save_to_disk_folder_goes_through_curation(disk_dataset, texts, tmp_path, capsys):
    code, out = _prepare(capsys, "--hf-dataset", str(disk_dataset), "--out", str(tmp_path / "nofield"))
    assert code == 2 and not (tmp_path / "nofield").exists()
    err = out.err.strip()
    assert "\n" not in err and "'text'" in err and "body" in err and "--text-field" in err, err

    code, out = _prepare(capsys, "--hf-dataset", str(disk_dataset), "--text-field", "body", "--vocab-size", "400",
                         "--out", str(tmp_path / "ds"))
    assert code == 0, out.err
    card = json.loads((tmp_path / "ds/data_card.json").read_text())
    stats = card["sources"]["read_stats"]
    # every record counted: the 24 documents and 3 duplicates read, the empty and the null row named
    assert (stats["documents"], stats["empty"], stats["bad_records"]) == (N_DOCS + DUPES, 1, 1)
    assert card["summary"]["docs_in"] == N_DOCS + DUPES
    exact = next(s for s in card["steps"] if s["name"] == "exact_dedup")
    assert sum(exact["dropped"].values()) == DUPES
    meta = json.loads((tmp_path / "ds/meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == card["summary"]["docs_out"]
    assert meta["provenance"]["hf_dataset"] == str(disk_dataset.resolve())
    assert (meta["provenance"]["hf_split"], meta["provenance"]["text_field"]) == ("train", "body")
    assert "special_tokens" not in meta and not (tmp_path / "ds/tokenizer_config.json").exists()

    # the other split of the same folder
    code, out = _prepare(capsys, "--hf-dataset", str(disk_dataset), "--hf-split", "test", "--text-field", "body",
                         "--vocab-size", "300", "--out", str(tmp_path / "test"))
    assert code == 0, out.err
    card = json.loads((tmp_path / "test/data_card.json").read_text())
    assert card["sources"]["read_stats"]["documents"] == 4


def test_parquet_file_through_the_api(parquet_file, tmp_path):
    made = api.prepare(out=tmp_path / "ds", hf_dataset=parquet_file, vocab_size=300, val_fraction=0.2,
                       curation={"text_field": "content", "executor": "serial"})
    st = made.read_stats
    assert (st.files, st.documents, st.empty, st.bad_records) == (1, N_DOCS + DUPES, 1, 1)
    assert made.card["summary"]["docs_in"] == N_DOCS + DUPES
    assert made.card["summary"]["docs_out"] <= N_DOCS
    exact = next(s for s in made.card["steps"] if s["name"] == "exact_dedup")
    assert sum(exact["dropped"].values()) == DUPES


def test_reading_streams_offline(disk_dataset, parquet_file, monkeypatch):
    """Files are read as a stream, a save_to_disk folder from its memory-mapped arrow files: nothing copied whole;
    `datasets` is kept offline, and the process's environment is left as it was."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert isinstance(HFSource(parquet_file).dataset, datasets.IterableDataset)
    assert datasets.config.HF_HUB_OFFLINE is True and "HF_HUB_OFFLINE" not in os.environ
    on_disk = HFSource(disk_dataset, "train").dataset
    assert on_disk.cache_files and all(f["filename"].startswith(str(disk_dataset)) for f in on_disk.cache_files)


def _documents(ds_dir, eos):
    """Every document's token ids (its eos dropped) in the dataset's train and val shards."""
    meta = json.loads((ds_dir / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(ds_dir / rel, dtype=meta["dtype"]) for split in ("train", "val")
                          for rel in meta["splits"][split]["shards"]]).tolist()
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur, "the last document has no eos"
    return docs


def test_hf_tokenizer_folder_end_to_end(disk_dataset, hf_tokenizer, texts, tmp_path, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer))
    ds = tmp_path / "ds"
    code, out = _prepare(capsys, "--hf-dataset", str(disk_dataset), "--text-field", "body", "--tokenizer",
                         str(hf_tokenizer), "--out", str(ds))
    assert code == 0, out.err
    assert f"--model.vocab_size={len(hf)} or more" in " ".join(out.out.split())  # however the console wraps
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["vocab_size"] == len(hf)
    assert meta["eot_id"] == hf.eos_token_id
    assert meta["special_tokens"] == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    assert json.loads((ds / "tokenizer_config.json").read_text()) == \
        json.loads((hf_tokenizer / "tokenizer_config.json").read_text())
    # the ids are transformers' encoding of each kept document (its bos included), then the eos
    want = sorted(tuple(hf(t)["input_ids"]) for t in texts)
    assert want[0][0] == hf.bos_token_id
    assert sorted(_documents(ds, hf.eos_token_id)) == want

    # 5 steps on it, then generate and export: the run carries the tokenizer's config
    run = tmp_path / "run"
    tiny = ["--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2",
            "--model.seq_len=64", f"--model.vocab_size={len(hf)}", "--train.steps=5", "--train.micro_batch_size=2",
            "--train.eval_every=5", "--train.eval_steps=1", "--train.sample_tokens=0", "--checkpoint.every=5",
            "--precision.dtype=fp32", "--log.progress=none"]
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), f"--data.path={ds}", *tiny]) == 0, capsys.readouterr().err
    assert (run / "tokenizer_config.json").read_bytes() == (hf_tokenizer / "tokenizer_config.json").read_bytes()
    text = api.generate(run, "def ", max_new_tokens=8, seed=0)
    assert isinstance(text, str) and text
    api.export(run, tmp_path / "export")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == ("<s>", "</s>", "<pad>")
    assert exported("def f(x): pass")["input_ids"] == hf("def f(x): pass")["input_ids"]
    gen = json.loads((tmp_path / "export/generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (hf.bos_token_id, hf.eos_token_id)


def test_hf_chat_records(hf_tokenizer, tmp_path):
    """Prompt/response columns of a datasets folder make a chat dataset (loss masks) with the HF tokenizer."""
    out = tmp_path / "chat"
    pairs = {"question": [f"What is {i} plus {i}?" for i in range(8)], "answer": [f"{2 * i}" for i in range(8)]}
    datasets.Dataset.from_dict(pairs).save_to_disk(str(tmp_path / "saved"))
    made = api.prepare(out=out, hf_dataset=tmp_path / "saved", format="chat", prompt_field="question",
                       response_field="answer", tokenizer=hf_tokenizer, curation={"executor": "serial"},
                       val_fraction=0.25, chat_template="<|im_start|>{prompt}<|im_end|>{response}<|endoftext|>")
    assert made.read_stats.documents == 8
    meta = made.meta
    assert meta["splits"]["train"]["masks"] and meta["special_tokens"]["eos_token"] == "</s>"
    ids = np.fromfile(out / meta["splits"]["train"]["shards"][0], dtype=meta["dtype"])
    eos = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer)).eos_token_id
    assert ids[-1] == meta["eot_id"] == eos


def test_missing_datasets_package_names_the_extra(disk_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    code, out = _prepare(capsys, "--hf-dataset", str(disk_dataset), "--out", str(tmp_path / "ds"))
    err = out.err.strip()
    assert code == 2 and "\n" not in err and "pip install 'leantrain[hf]'" in err, err
