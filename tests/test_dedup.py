"""Exact dedup, near dedup (MinHash + LSH) and decontamination on planted duplicates."""

import json
import pickle
import random
import string

import numpy as np
import pytest

from leantrain.corpus.decontaminate import Decontaminate
from leantrain.corpus.dedup import (
    ExactDedup,
    NearDedup,
    _batch_shingles,
    _minhash,
    _permutations,
    optimal_bands_rows,
    shingle_hashes,
)
from leantrain.corpus.executors import LocalExecutor, SerialExecutor
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import StepStats
from leantrain.errors import ConfigError


@pytest.fixture(scope="module")
def pool():
    with LocalExecutor(2) as p:
        yield p


def _jaccard(a: str, b: str, shingle: str = "word", n: int = 5) -> float:
    x, y = set(shingle_hashes(a, shingle, n).tolist()), set(shingle_hashes(b, shingle, n).tolist())
    return len(x & y) / len(x | y)


def planted(seed: int = 0, bases: int = 240):
    """Synthetic documents plus exact copies, near copies (J >= 0.9) and related non-duplicates (J < 0.7),
    each copy placed after its source. Returns (docs, indices of true duplicates, indices of hard negatives)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(5000)]

    def edit(words, rate):
        """Substitute or insert a word at round(rate * len) (at least 1) random positions."""
        out = list(words)
        for _ in range(max(1, round(rate * len(words)))):
            k = rng.randrange(len(out))
            if rng.random() < 0.5:
                out[k] = rng.choice(vocab)
            else:
                out.insert(k, rng.choice(vocab))
        return out

    items = []  # (sort key, text, kind, source index)
    for i in range(bases):
        words = rng.choices(vocab, k=rng.randint(150, 400))
        text = " ".join(words)
        items.append((float(i), text, "base", -1))
        r = rng.random()
        if r < 0.15:
            copy = text.upper().replace(" ", "  \n") if rng.random() < 0.5 else text  # same after normalizing
            items.append((i + rng.uniform(0.5, 30), copy, "exact", len(items) - 1))
        elif r < 0.5:
            items.append((i + rng.uniform(0.5, 30), " ".join(edit(words, 0.005)), "near", len(items) - 1))
        elif r < 0.65:
            items.append((i + rng.uniform(0.5, 30), " ".join(edit(words, 0.08)), "hard", len(items) - 1))
    order = sorted(range(len(items)), key=lambda k: items[k][0])
    pos = {k: p for p, k in enumerate(order)}
    docs = [Document(f"doc{p:04d}", items[k][1], "test") for p, k in enumerate(order)]
    dups, hard = set(), set()
    for k, (_, text, kind, src) in enumerate(items):
        if kind == "base":
            continue
        j = _jaccard(items[src][1], text)
        if kind in ("exact", "near"):
            assert j >= 0.9, (kind, j)  # the corpus is what the test claims it is
            dups.add(pos[k])
        else:
            assert j < 0.7, j
            hard.add(pos[k])
    return docs, dups, hard


@pytest.fixture(scope="module")
def corpus():
    return planted()


def _run(step, docs, executor=None):
    stats = StepStats(step.name)
    kept = list(step.counted(iter(docs), stats, executor or SerialExecutor()))
    return kept, stats


def test_exact_dedup_removes_planted_copies_and_keeps_first(corpus):
    docs, dups, _ = corpus
    base = docs[:50]
    extra = [Document(f"copy{i}", f"  {base[i].text.upper()}\n\n", "test") for i in range(0, 50, 5)]
    stream = base + extra + [Document("raw", base[1].text + "!", "test")]
    kept, stats = _run(ExactDedup(), stream)
    removed = {d.id for d in stream} - {d.id for d in kept}
    expected = {d.id for d in extra}
    # within the first 50 documents, planted exact copies whose source is also among them
    for i, d in enumerate(base):
        if any(d.text.lower().split() == b.text.lower().split() for b in base[:i]):
            expected.add(d.id)
    assert removed == expected
    assert [d.id for d in kept] == [d.id for d in stream if d.id not in removed]  # input order
    assert stats.dropped["dedup:exact"] == len(expected) and stats.docs_out == len(kept)
    report = ExactDedup().report()
    assert report["clusters"] == []
    step = ExactDedup()
    _run(step, stream)
    clusters = step.report()["clusters"]
    assert {c["kept"] for c in clusters} >= {base[i].id for i in range(0, 50, 5)}
    assert sorted(r for c in clusters for r in c["removed"]) == sorted(expected)
    # raw comparison keeps case/whitespace variants
    kept_raw, _ = _run(ExactDedup(normalize=False), stream)
    assert {d.id for d in extra} <= {d.id for d in kept_raw}


def test_near_dedup_planted_precision_recall(corpus):
    docs, dups, hard = corpus
    step = NearDedup(threshold=0.8, num_perm=128, seed=7)
    kept, stats = _run(step, docs)
    removed = {i for i, d in enumerate(docs)} - {i for i, d in enumerate(docs) if d in kept}
    recall = len(removed & dups) / len(dups)
    precision = len(removed & dups) / max(1, len(removed))
    assert len(dups) > 60 and len(hard) > 20
    assert recall >= 0.95, recall
    assert precision == 1.0, sorted(removed - dups)
    assert stats.dropped["dedup:near"] == len(removed)
    report = step.report()
    assert report["params"]["bands"] * report["params"]["rows"] <= 128
    ids = {d.id: i for i, d in enumerate(docs)}
    seen = set()
    for n, cluster in enumerate(report["clusters"]):
        assert cluster["cluster_id"] == n
        members = [ids[cluster["kept"]]] + [ids[r] for r in cluster["removed"]]
        assert members[0] == min(members)  # the earliest document of the cluster is kept
        assert docs[members[0]] in kept and not seen & set(members)
        seen |= set(members)
    assert {ids[r] for c in report["clusters"] for r in c["removed"]} == removed


def test_verification_removes_lsh_false_positives(corpus):
    docs, dups, hard = corpus
    # a loose LSH (many bands of few rows) makes hard negatives candidates; exact Jaccard rejects them
    loose = dict(threshold=0.8, num_perm=128, bands_rows=(32, 4))
    plain, _ = _run(NearDedup(verify="none", **loose), docs)
    checked, _ = _run(NearDedup(verify="jaccard", **loose), docs)
    plain_removed = {i for i, d in enumerate(docs) if d not in plain}
    checked_removed = {i for i, d in enumerate(docs) if d not in checked}
    assert plain_removed & hard  # the test corpus does trip plain LSH
    assert not checked_removed & hard and checked_removed <= dups
    assert len(checked_removed & dups) >= len(dups) - 1


def test_near_dedup_char_shingles(corpus):
    docs, dups, _ = corpus
    kept, _ = _run(NearDedup(shingle="char", ngram=5, threshold=0.8), docs[:150])
    removed = {i for i in range(150)} - {docs.index(d) for d in kept}
    sets = [set(shingle_hashes(d.text, "char", 5).tolist()) for d in docs[:150]]
    similar = {(j, i) for i in range(150) for j in range(i)  # J >= 0.8 needs sizes within a factor 0.8
               if 0.8 * len(sets[i]) <= len(sets[j]) <= len(sets[i]) / 0.8
               and len(sets[i] & sets[j]) >= 0.8 * len(sets[i] | sets[j])}
    truth = {i for _, i in similar}  # char Jaccard >= 0.8 with an earlier document
    assert len(truth) > 30 and len(removed & truth) >= 0.9 * len(truth)
    assert removed <= truth | {j for j, _ in similar}  # verified: nothing removed without a similar partner


def test_deterministic_and_executor_independent(corpus, pool):
    docs, _, _ = corpus

    def run(executor):
        step = NearDedup(seed=3, pool_min_bytes=0)  # the pool even for this small corpus
        kept, stats = _run(step, docs, executor)
        out = "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in kept).encode()
        return out, json.dumps(step.report(), sort_keys=True), stats.to_dict()["dropped"]

    first = run(SerialExecutor())
    assert run(SerialExecutor()) == first
    assert run(pool) == first  # several worker processes, several batches: byte-identical
    small = NearDedup(seed=3)  # default: a corpus this small runs in process, with the same result
    kept, _ = _run(small, docs, pool)
    assert small.executor_used.startswith("in process") and [d.id for d in kept] == [
        json.loads(line)["id"] for line in first[0].decode().splitlines()]
    other_seed = NearDedup(seed=4)
    _run(other_seed, docs)
    assert json.loads(first[1])["params"]["seed"] == 3 and other_seed.report()["params"]["seed"] == 4


def test_batched_hashing_matches_single_documents():
    rng = random.Random(1)
    texts = [" ".join(rng.choices(["alpha", "Beta", "gamma!", "délta", "x_1", "...", "\n"], k=rng.randint(0, 900)))
             for _ in range(40)] + ["", "!!", "one two", "Ünïcode wörds"]
    step = NearDedup()
    p = step.params
    long_only = [t for t in texts if shingle_hashes(t, "word", 1).size >= p.ngram]  # the batch fast path
    shingles, offs = _batch_shingles(long_only, p)
    assert len(long_only) > 20
    for i, text in enumerate(long_only):
        assert np.array_equal(shingles[offs[i]:offs[i + 1]], shingle_hashes(text, "word", p.ngram))
    shingles, offs = _batch_shingles(texts, p)
    a, b = _permutations(p.seed, p.num_perm)
    sig = _minhash(shingles, offs, a, b)
    big = " ".join(texts) * 4  # longer than one signature block
    s_big, o_big = _batch_shingles([big], p)
    for text, got_sh, got_sig in [(t, shingles[offs[i]:offs[i + 1]], sig[i]) for i, t in enumerate(texts)] + [
            (big, s_big, _minhash(s_big, o_big, a, b)[0])]:
        ref = shingle_hashes(text, "word", p.ngram)
        assert np.array_equal(got_sh, ref)
        x = (ref >> np.uint64(32)).astype(np.uint32)
        want = (a * x[None, :] + b).min(axis=1) if x.size else np.full(p.num_perm, 0xFFFFFFFF, np.uint32)
        assert np.array_equal(got_sig, want)


def test_signature_agreement_estimates_jaccard():
    """The (a*x+b) mod 2**32 permutations behave like min-wise ones: errors ~ binomial."""
    rng = np.random.default_rng(0)
    a, b = _permutations(11, 128)
    z = []
    for _ in range(200):
        n = int(rng.integers(100, 1500))
        j = rng.uniform(0.3, 0.95)
        shared = round(2 * n * j / (1 + j))
        x = rng.integers(0, 2**63, size=2 * n - shared, dtype=np.uint64)
        sa = _minhash(x[:n], np.array([0, n]), a, b)[0]
        sb = _minhash(np.concatenate([x[:shared], x[n:]]), np.array([0, n]), a, b)[0]
        true = shared / (2 * n - shared)
        z.append(((sa == sb).mean() - true) / np.sqrt(true * (1 - true) / 128))
    assert abs(np.mean(z)) < 0.3 and 0.7 < np.std(z) < 1.3


def test_bands_rows_match_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm in [(0.5, 128), (0.7, 64), (0.8, 128), (0.85, 128), (0.9, 64), (0.95, 128)]:
        assert optimal_bands_rows(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_docs_without_words_are_never_near_duplicates():
    docs = [Document("a", "!!! ???", "t"), Document("b", "... ---", "t"), Document("c", "word " * 10, "t"),
            Document("d", "word " * 11, "t")]
    kept, _ = _run(NearDedup(), docs)
    assert [d.id for d in kept] == ["a", "b", "c"]  # c and d share their only shingle


def test_bad_near_dedup_config():
    for kwargs in ({"threshold": 1.5}, {"shingle": "token"}, {"bands_rows": (20, 20)}, {"verify": "maybe"}):
        with pytest.raises(ConfigError):
            NearDedup(**kwargs)


def test_decontaminate(tmp_path):
    question = ("What is the capital of France? The capital of France is Paris, a city on the Seine "
                "with about two million people.")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"text": question}) + "\n" + json.dumps({"text": "too short"}) + "\n")
    step = Decontaminate(eval_paths=[evals], eval_texts=["an unrelated eval passage " * 5], n=13)
    assert step.eval_docs == 3 and step.short_eval_docs == 1
    leaked = Document("leak", "Intro text.\nwhat IS the capital of france -- the capital of france is PARIS, "
                              "a city. More text follows here.", "t")
    verdict = step.apply(leaked)
    assert verdict.reason == "decontaminate:ngram_overlap"
    assert "what is the capital of france -- the capital of france is paris" in verdict.detail
    twelve = "is the capital of France? The capital of France is Paris, a"  # 12 shared words: kept
    clean = Document("clean", f"{twelve} town on the river Seine with about two", "t")
    assert step.apply(clean) is clean
    copy = pickle.loads(pickle.dumps(step))  # runs in worker processes
    assert copy.apply(leaked) == verdict and copy.apply(clean) == clean
    single = Decontaminate(eval_paths=str(evals), n=13)  # one path as a plain string
    assert single.eval_docs == 2 and single.apply(leaked).reason == "decontaminate:ngram_overlap"
    with pytest.raises(ConfigError):
        Decontaminate(eval_texts=["only four words here"], n=13)


def test_word_bytes():
    import leantrain.corpus.dedup as dedup

    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(dedup._is_word_byte(every), dedup._WORD_BYTE)
    assert dedup._WORD_BYTE[[ord("a"), ord("Z"), ord("0"), ord("_"), 0xC3]].all()
    assert not dedup._WORD_BYTE[[ord(" "), ord("-"), ord("@"), ord("["), ord("`"), ord("{"), 0]].any()


def test_long_inputs_hash_in_segments_without_changing_words(monkeypatch):
    import leantrain.corpus.dedup as dedup

    text = " ".join(["alpha", "béta", "x_1", "...", "a" * 3000, "gamma"] * 400)
    want = dedup.word_spans(text)
    monkeypatch.setattr(dedup, "_SEGMENT", 1000)  # many segments, and words longer than one
    got = dedup.word_spans(text)
    assert all(np.array_equal(x, y) for x, y in zip(want, got, strict=True))
