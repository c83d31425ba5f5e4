"""Curation: each filter at its published thresholds, PII placeholders, bad inputs, determinism, executors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from leantrain.corpus.card import summary_lines
from leantrain.corpus.executors import LocalExecutor, SerialExecutor
from leantrain.corpus.filters import C4Filter, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition
from leantrain.corpus.normalize import Normalize
from leantrain.corpus.pii import PIIScrub
from leantrain.corpus.pipeline import Pipeline, build_steps, load_curation, plan_for
from leantrain.corpus.readers import Document, ReadStats, read_paths
from leantrain.corpus.steps import DocStep, Drop
from leantrain.dataprep import curate_dataset
from leantrain.errors import ConfigError

WORDS = ["apple", "river", "stone", "the", "cloud", "and"]  # mean length 4.33, a third stop words


def doc(text: str, i: str = "d") -> Document:
    return Document(i, text, "test")


def reason(step: DocStep, text: str) -> str | None:
    """The drop reason, or None when the document is kept."""
    out = step.apply(doc(text))
    return out.reason if isinstance(out, Drop) else None


def prose(n: int, words: list[str] = WORDS) -> str:
    return " ".join(words[i % len(words)] for i in range(n))


# ---- Gopher quality ---------------------------------------------------------------------

def test_gopher_quality_word_count_and_mean_length() -> None:
    g = GopherQuality()
    assert reason(g, prose(49)) == "gopher_quality:too_few_words"
    assert reason(g, prose(50)) is None
    assert reason(GopherQuality(max_words=60), prose(61)) == "gopher_quality:too_many_words"
    loose = GopherQuality(min_words=1, min_stop_words=0)
    assert reason(loose, " ".join(["abc"] * 60)) is None  # mean 3: kept
    assert reason(loose, " ".join(["ab"] * 60)) == "gopher_quality:mean_word_length"
    assert reason(loose, " ".join(["abcdefghij"] * 60)) is None  # mean 10: kept
    assert reason(loose, " ".join(["abcdefghijk"] * 60)) == "gopher_quality:mean_word_length"


def test_gopher_quality_symbols_bullets_ellipsis() -> None:
    g = GopherQuality()
    assert reason(g, prose(50) + " #" * 5) is None  # 5 '#' per 50 words = 0.1: kept
    assert reason(g, prose(50) + " #" * 6) == "gopher_quality:hash_ratio"
    assert reason(g, prose(50) + " ..." * 6) == "gopher_quality:ellipsis_ratio"
    lines = [prose(6)] * 10
    assert reason(g, "\n".join(["- " + x for x in lines[:9]] + lines[9:])) is None  # 90% bullets: kept
    assert reason(g, "\n".join("- " + x for x in lines)) == "gopher_quality:bullet_lines"
    assert reason(g, "\n".join([x + "..." for x in lines[:3]] + lines[3:])) is None  # 30%: kept
    assert reason(g, "\n".join([x + "..." for x in lines[:4]] + lines[4:])) == "gopher_quality:ellipsis_lines"


def test_gopher_quality_alpha_and_stop_words() -> None:
    g = GopherQuality()
    assert reason(g, prose(40) + " 12345" * 10) is None  # 80% of words have a letter: kept
    assert reason(g, prose(39) + " 12345" * 11) == "gopher_quality:alpha_words"
    no_stops = ["apple", "river", "stone", "cloud", "grass"]
    assert reason(g, prose(50, no_stops) + " the") == "gopher_quality:stop_words"
    assert reason(g, prose(50, no_stops) + " the And") is None  # two distinct stop words, any case


# ---- Gopher repetition ------------------------------------------------------------------

def _only(**rules) -> GopherRepetition:
    off = dict(max_dup_line_frac=1.0, max_dup_para_frac=1.0, max_dup_line_char_frac=1.0, max_dup_para_char_frac=1.0,
               top_ngram_max_frac=(), dup_ngram_max_frac=())
    return GopherRepetition(**{**off, **rules})


def test_gopher_repetition_duplicate_lines_and_paragraphs() -> None:
    uniq = [f"line {w} number {i}" for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven"])]
    step = _only(max_dup_line_frac=0.30)
    assert reason(step, "\n".join(uniq + uniq[:3])) is None  # 3 of 10 lines repeat: 0.30 is kept
    assert reason(step, "\n".join(uniq[:6] + uniq[:4])) == "gopher_repetition:dup_lines"
    # duplicated-line characters: d / (2d + u + 2) with d = 10: u = 28 gives exactly 0.20 (kept), u = 27 drops.
    chars = _only(max_dup_line_char_frac=0.20)
    d = "abcdefghij"
    assert reason(chars, f"{d}\n{'u' * 28}\n{d}") is None
    assert reason(chars, f"{d}\n{'u' * 27}\n{d}") == "gopher_repetition:dup_line_chars"
    paras = _only(max_dup_para_frac=0.30)
    assert reason(paras, "\n\n".join(uniq + uniq[:3])) is None
    assert reason(paras, "\n\n".join(uniq[:6] + uniq[:4])) == "gopher_repetition:dup_paragraphs"
    para_chars = _only(max_dup_para_char_frac=0.20)
    assert reason(para_chars, "\n\n".join(["p" * 10, "u" * 26, "p" * 10])) is None  # 10 / 50 chars: kept
    assert reason(para_chars, "\n\n".join(["p" * 10, "u" * 25, "p" * 10])) == "gopher_repetition:dup_paragraph_chars"


def test_gopher_repetition_ngrams() -> None:
    varied = " ".join(f"w{i}x" for i in range(300))
    g = GopherRepetition()
    assert reason(g, varied) is None
    assert reason(g, varied + " spam eggs" * 80) == "gopher_repetition:top_2gram"
    five = "alpha beta gamma delta epsilon"
    # a repeated 5-gram run covering > 15% of the characters (but every 2/3/4-gram under its top limit)
    text = varied + " " + " ".join(f"{five} z{i}" for i in range(3)) * 1
    assert reason(g, text) is None
    assert reason(_only(dup_ngram_max_frac=((5, 0.15),)), " ".join(f"{five} z{i}" for i in range(30))) == \
        "gopher_repetition:dup_5gram"


# ---- C4 --------------------------------------------------------------------------------

C4_PAGE = [
    "This line has enough words and ends well.",
    "No terminal punctuation here at all",
    "Too short.",
    "Please enable Javascript to view this page.",
    "Read our privacy policy for more details.",
    "Second good sentence is right here. Third one too!",
    "Is this the fourth sentence? Yes, and a fifth one.",
    "Wikipedia says so[1] and it is true.",
    "Ends with an ellipsis and more words...",
]


def test_c4_line_and_page_rules() -> None:
    out = C4Filter().apply(doc("\n".join(C4_PAGE)))
    assert isinstance(out, Document)
    assert out.text.split("\n") == [C4_PAGE[0], C4_PAGE[5], C4_PAGE[6], "Wikipedia says so and it is true."]
    assert reason(C4Filter(min_sentences=7), "\n".join(C4_PAGE)) == "c4:too_few_sentences"  # it has 6
    assert reason(C4Filter(), "\n".join(C4_PAGE + ["Lorem ipsum dolor sit amet, consectetur."])) == "c4:lorem_ipsum"
    assert reason(C4Filter(), "\n".join(C4_PAGE + ["The set {1, 2} is small."])) == "c4:curly_bracket"
    assert reason(C4Filter(), "no punctuation\nat all") == "c4:no_lines_left"
    # FineWeb's variant keeps lines without terminal punctuation
    kept = C4Filter(terminal_punct=False).apply(doc("\n".join(C4_PAGE)))
    assert isinstance(kept, Document) and C4_PAGE[1] in kept.text


# ---- FineWeb -------------------------------------------------------------------------------

def _long_line(i: int, end: str = "") -> str:
    return f"row {i} carries several ordinary words for the reader{end}"


def test_fineweb_rules_at_thresholds() -> None:
    f = FineWebQuality(max_dup_line_char_ratio=1.0)
    lines = [_long_line(i, "." if i < 3 else "") for i in range(25)]
    assert reason(f, "\n".join(lines)) == "fineweb:line_punct_ratio"  # 3/25 = 0.12 is dropped
    lines = [_long_line(i, "." if i < 4 else "") for i in range(25)]
    assert reason(f, "\n".join(lines)) is None
    short = ["Short line here."] * 2 + [_long_line(0, ".")]
    assert reason(f, "\n".join(short)) is None  # 2/3 short = 0.667 <= 0.67
    short = [f"Short line {i}." for i in range(7)] + [_long_line(i, ".") for i in range(3)]
    assert reason(f, "\n".join(short)) == "fineweb:short_lines"
    # duplicated-line chars / non-newline chars: d / (2d + u) with d = 40, u = 320 is exactly 0.1 (dropped)
    d = ("duplicated words in a line that repeats." + " " * 40)[:40]
    u = (" ".join(f"unique{i}" for i in range(60)))[:319] + "."
    assert len(d) == 40 and len(u) == 320
    assert reason(FineWebQuality(), f"{d}\n{u}\n{d}") == "fineweb:dup_line_chars"
    assert reason(FineWebQuality(), f"{d}\n{u}x\n{d}") is None


# ---- code ---------------------------------------------------------------------------------

def test_code_quality_rules() -> None:
    c = CodeQuality()
    body = ["x = 1"] * 20
    assert reason(c, "\n".join(body + ["s = '" + "xy " * 331 + "'"])) is None  # a 999-char line
    assert reason(c, "\n".join(body + ["s = '" + "xy " * 332 + "'"])) == "code:max_line_length"
    line100 = ("xy = zw + " * 11)[:100]
    assert reason(c, "\n".join([line100] * 10)) is None  # mean line length 100: kept
    assert reason(c, "\n".join([line100 + "e"] * 10)) == "code:mean_line_length"
    assert reason(c, "a" * 25 + "-" * 75) is None  # alphanumeric fraction 0.25: kept
    assert reason(c, "a" * 24 + "-" * 76) == "code:alnum_fraction"
    gen = ["# header"] * 4 + ["# This file is AUTOGENERATED, do not edit."] + ["x = 1"] * 5
    assert reason(c, "\n".join(gen)) == "code:autogenerated"
    assert reason(c, "\n".join(["# header"] + gen)) is None  # marker on line 6: not scanned
    blob = "QUJD" * 300  # 1200 base64 chars on one line
    assert reason(c, "\n".join(["data = (", f"    '{blob[:900]}'", ")"] + ["x = 1"] * 400)) is None
    assert reason(CodeQuality(max_line_length=2000), f"data = '{blob}'\n" + "x = 1\n" * 400) == "code:encoded_data"


def test_code_profile_keeps_most_of_a_real_module() -> None:
    import json as json_module

    text = Path(json_module.__file__).read_text()
    assert reason(CodeQuality(), text) is None


# ---- normalize and PII ----------------------------------------------------------------------

def test_normalize() -> None:
    n = Normalize()
    out = n.apply(doc("\n\na  \r\nb\u0000\u200b c\r\n\r\n\r\n\r\nd\te\u0301\t\n"))
    assert isinstance(out, Document) and out.text == "a\nb c\n\n\n\nd\té\n"
    web = Normalize(max_blank_lines=1, collapse_spaces=True).apply(doc("a   b\n\n\n\nc"))
    assert isinstance(web, Document) and web.text == "a b\n\nc"
    assert reason(n, " \n\t\u200b\n") == "normalize:empty"
    same = doc("already clean\n")
    assert n.apply(same) is same


@pytest.mark.parametrize("text, expected", [
    ("mail john.doe@example.org today", "mail <EMAIL> today"),
    ("server 93.184.216.34 answers", "server <IP_ADDRESS> answers"),
    ("ipv6 2a00:1450:4001:80e::200e here", "ipv6 <IP_ADDRESS> here"),
    ("call (555) 123-4567 or +44 20 7946 0958", "call <PHONE> or <PHONE>"),
    ("key AKIAIOSFODNN7EXAMPLE set", "key <SECRET> set"),
    ('token = "ghp_' + "a1B2" * 9 + '"', 'token = "<SECRET>"'),
    ('api_key = "a8Fj2kL9xQ3mZ7pW"', 'api_key = "<SECRET>"'),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "<SECRET>"),
])
def test_pii_placeholders(text: str, expected: str) -> None:
    assert PIIScrub().scrub(text)[0] == expected


@pytest.mark.parametrize("text", [
    "localhost 127.0.0.1, lan 10.0.0.1 and 192.168.1.20, dns 8.8.8.8",
    "version 1.2.3.4.5 and section 8.2.4.44",
    "x = a[1::2]; y = b[::-1]; link fe80::1",
    'password = "changeme"',
    "dates 2021-03-15 and ids 1234567890",
    "@property\ndef f(self): return self.x @ self.y",
])
def test_pii_leaves_non_pii_alone(text: str) -> None:
    assert PIIScrub().scrub(text) == (text, [])


def test_pii_counts_kinds() -> None:
    from leantrain.corpus.steps import StepStats

    st = StepStats("pii")
    out = PIIScrub().process(doc("a@b.com and 93.184.216.34"), st)
    assert isinstance(out, Document) and out.text == "<EMAIL> and <IP_ADDRESS>"
    assert st.modified == {"pii:email": 1, "pii:ip": 1}
    assert PIIScrub(emails=False).scrub("a@b.com")[0] == "a@b.com"


# ---- readers: bad inputs -----------------------------------------------------------------

def _bad_inputs(root: Path) -> Path:
    d = root / "bad"
    d.mkdir()
    (d / "blob.dat").write_bytes(b"\x00\x01\x02" * 100)
    (d / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    (d / "huge.txt").write_bytes(b"first line\n" + b"x" * 2000 + b"\nlast line\n")
    rows = [json.dumps({"text": f"record {i}"}) for i in range(3)]
    rows[1] = json.dumps({"text": "y" * 3000})
    (d / "huge.jsonl").write_text("\n".join(rows) + "\n")
    full = gzip.compress("".join(json.dumps({"text": f"row {i} of a long file"}) + "\n"
                                 for i in range(2000)).encode())
    (d / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    (d / "garbage.txt.gz").write_bytes(b"this is not gzip at all")
    import zstandard

    z = zstandard.ZstdCompressor().compress(b"".join(b"zstd text line %d\n" % i for i in range(40000)))
    (d / "cut.txt.zst").write_bytes(z[: len(z) // 2])
    (d / "good.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zstd record"}\n'))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet one", None, "parquet three"]}), d / "rows.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), d / "other.parquet")
    (d / "skip.log").write_text("excluded by a glob\n")
    return d


def test_bad_inputs_are_counted_not_fatal(tmp_path: Path) -> None:
    d = _bad_inputs(tmp_path)
    stats = ReadStats()
    docs = {x.id.split("/", 1)[1]: x.text for x in
            read_paths([d], stats=stats, max_line_bytes=1000, exclude=["*.log"])}
    assert docs["latin.txt"] == "caf\ufffd au lait\n" and stats.replaced_utf8 == 1
    assert docs["huge.txt"] == "first line\nlast line\n"
    assert [k for k in docs if k.startswith("huge.jsonl")] == ["huge.jsonl#L1", "huge.jsonl#L3"]
    assert stats.long_lines == 2
    cut = [k for k in docs if k.startswith("cut.jsonl.gz")]
    assert 100 < len(cut) < 2000 and all(docs[k].startswith("row ") for k in cut)
    zst = docs["cut.txt.zst"]  # the decoded part before the damage, cut at its last whole line
    assert zst.startswith("zstd text line 0\n") and zst.endswith("\n") and 1000 < zst.count("\n") < 40000
    assert docs["good.jsonl.zst#L1"] == "zstd record"
    assert docs["rows.parquet#R1"] == "parquet one" and docs["rows.parquet#R3"] == "parquet three"
    assert stats.bad_records == 1
    assert (stats.truncated, stats.unreadable, stats.binary, stats.empty, stats.excluded) == (2, 2, 1, 1, 1)
    assert "skip.log" not in docs
    assert "truncated" in stats.summary() and "unreadable" in stats.summary()
    only = [x.id for x in read_paths([d], include=["*.parquet"])]
    assert only == ["bad/rows.parquet#R1", "bad/rows.parquet#R3"]


def test_default_line_limit_cuts_an_enormous_line(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_bytes(b"keep me\n" + b"z" * (9 << 20) + b"\n")
    stats = ReadStats()
    assert [x.text for x in read_paths([f], stats=stats)] == ["keep me\n"]
    assert stats.long_lines == 1


# ---- pipeline ------------------------------------------------------------------------------

def _code_docs() -> list[Document]:
    import email.utils
    import json.decoder
    import textwrap

    docs = [Document(Path(m.__file__).name, Path(m.__file__).read_text(), "stdlib")
            for m in (json.decoder, email.utils, textwrap)]
    docs.append(Document("copy.py", docs[0].text, "dup"))  # an exact copy
    docs.append(Document("near.py", docs[2].text.replace("wrap", "wrapp", 3), "dup"))  # a near copy
    docs.append(Document("gen.py", "# auto-generated by a tool\nX = 1\n", "gen"))
    docs.append(Document("contact.py", "# contact: jane@corp.example.com, host 93.184.216.34\nY = 2\n", "pii"))
    return docs


def test_pipeline_code_profile_counts_every_step() -> None:
    plan = build_steps("code")
    assert [s.name for s in plan.steps] == ["normalize", "code", "pii", "exact_dedup", "near_dedup"]
    pipe = Pipeline(lambda: iter(_code_docs()), plan.steps)
    out = list(pipe.run())
    assert [d.id for d in out] == ["decoder.py", "utils.py", "textwrap.py", "contact.py"]
    by = {s.name: s for s in pipe.stats}
    assert by["read"].docs_out == 7 and by["code"].dropped == {"code:autogenerated": 1}
    assert by["exact_dedup"].dropped == {"dedup:exact": 1} and by["near_dedup"].dropped == {"dedup:near": 1}
    assert out[-1].text.startswith("# contact: <EMAIL>, host <IP_ADDRESS>")
    assert by["pii"].modified["pii:email"] == 4  # contact.py, email/utils.py's examples, textwrap's author x2
    assert all(s.docs_in >= s.docs_out for s in pipe.stats)
    assert pipe.reports["exact_dedup"]["clusters"][0]["removed"] == ["copy.py"]


class _Twin(DocStep):
    """A synthetic-data step: adds a reversed copy of every document."""

    name = "twin"

    def apply(self, d: Document) -> list[Document]:
        return [d, Document(d.id + "#rev", d.text[::-1], "synthetic")]


def test_generator_source_and_a_step_that_adds_documents() -> None:
    def synthetic():
        for i in range(5):
            yield Document(f"s{i}", f"synthetic document {i}\n", "gen")

    pipe = Pipeline([synthetic, lambda: iter([doc("one more\n", "x")])], [Normalize(), _Twin()])
    out = list(pipe.run())
    assert [d.id for d in out][:4] == ["s0", "s0#rev", "s1", "s1#rev"] and len(out) == 12
    assert pipe.stats[-1].docs_in == 6 and pipe.stats[-1].docs_out == 12


def test_local_executor_matches_serial() -> None:
    plan = build_steps("code", dedup=False)
    docs = _code_docs() * 3
    serial = list(Pipeline(lambda: iter(docs), plan.steps, SerialExecutor(), batch_docs=2).run())
    with LocalExecutor(2) as ex:
        pipe = Pipeline(lambda: iter(docs), plan.steps, ex, batch_docs=2)
        local = list(pipe.run())
    assert local == serial
    assert pipe.stats[2].dropped == {"code:autogenerated": 3}
    assert pipe.stats[2].examples["code:autogenerated"][0]["id"] == "gen.py"


def test_ray_executor_matches_serial() -> None:
    ray = pytest.importorskip("ray")
    from leantrain.corpus.executors import RayExecutor

    plan = build_steps("code")
    docs = _code_docs()
    serial = list(Pipeline(lambda: iter(docs), plan.steps).run())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ex = RayExecutor()
        assert ex.workers == 2
        pipe = Pipeline(lambda: iter(docs), plan.steps, ex, batch_docs=2)
        assert list(pipe.run()) == serial
        assert pipe.stats[-1].dropped == {"dedup:near": 1}
    finally:
        ray.shutdown()


def test_config_file_overrides_and_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LEANTRAIN_LID_MODEL", raising=False)
    cfg = tmp_path / "curation.toml"
    cfg.write_text('profile = "web"\n[gopher_quality]\nmin_words = 20\n[c4]\nenabled = false\n')
    plan = plan_for(load_curation(cfg, ["fineweb.short_line_length=40", "pii.emails=false"]))
    names = [s.name for s in plan.steps]
    assert "c4" not in names and names[:3] == ["normalize", "gopher_quality", "gopher_repetition"]
    assert "language" not in names and "language filter skipped" in plan.notes[0]  # no model file in tests
    steps = {s.name: s for s in plan.steps}
    assert steps["gopher_quality"].min_words == 20 and steps["fineweb"].short_line_length == 40
    assert steps["pii"].emails is False and plan.settings["gopher_quality"]["max_words"] == 100_000
    assert [s.name for s in build_steps("none").steps] == ["exact_dedup", "near_dedup"]  # dedup in every profile
    assert [s.name for s in build_steps("none", dedup=False).steps] == []
    with pytest.raises(ConfigError, match="allowed: .*min_words"):
        build_steps("web", {"gopher_quality": {"min_wrds": 3}})
    with pytest.raises(ConfigError, match="unknown curation step"):
        build_steps("web", {"gopher": {}})
    with pytest.raises(ConfigError, match="gopher_quality.min_words"):
        build_steps("web", {"gopher_quality": {"min_words": "many"}})
    with pytest.raises(ConfigError, match="profile"):
        build_steps("prose")


def test_curation_is_a_section_of_the_main_config(tmp_path: Path) -> None:
    from leantrain.config import load_config as load_main
    from leantrain.config import to_toml

    main = tmp_path / "run.toml"
    main.write_text('[data]\npath = "x"\n[curation]\nprofile = "code"\ndedup = false\n'
                    '[curation.code]\nmin_alnum_fraction = 0.2\n')
    cur = load_curation(main, ["code.max_line_length=500", "pii=false"])
    assert (cur.profile, cur.dedup, cur.pii) == ("code", False, False)
    steps = {s.name: s for s in plan_for(cur).steps}
    assert list(steps) == ["normalize", "code"]
    assert steps["code"].min_alnum_fraction == 0.2 and steps["code"].max_line_length == 500
    # the same section through the main loader and its --section.field overrides, and back through TOML
    cfg = load_main(main, None, ["--curation.code.max_line_length=500", "--curation.pii=false"])
    assert cfg.curation == cur
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_main(again).curation == cur
    with pytest.raises(ConfigError, match="profile"):
        load_curation(None, ["profile=prose"])
    with pytest.raises(ConfigError, match="is a folder"):
        load_curation(tmp_path)


def test_steps_of_the_same_name_keep_their_own_counts() -> None:
    pipe = Pipeline(lambda: iter([doc("a\n", "1"), doc("a\n", "2"), doc("b\n", "3")]),
                    [Normalize(), *build_steps("none").steps, Normalize(), *build_steps("none").steps])
    assert [d.id for d in pipe.run()] == ["1", "3"]
    names = [s.name for s in pipe.stats]
    assert names == ["read", "normalize", "exact_dedup", "near_dedup", "normalize#2", "exact_dedup#2",
                     "near_dedup#2"]
    by = {s.name: s for s in pipe.stats}
    assert (by["exact_dedup"].docs_in, by["exact_dedup"].docs_out) == (3, 2)
    assert (by["exact_dedup#2"].docs_in, by["exact_dedup#2"].docs_out) == (2, 2)
    assert by["exact_dedup"].dropped == {"dedup:exact": 1} and not by["exact_dedup#2"].dropped
    assert set(pipe.reports) == {"exact_dedup", "near_dedup", "exact_dedup#2", "near_dedup#2"}


def test_language_filter_skips_cleanly_without_an_identifier(monkeypatch) -> None:
    monkeypatch.delenv("LEANTRAIN_LID_MODEL", raising=False)
    plan = build_steps("code", language="en")
    assert "language" not in [s.name for s in plan.steps]
    assert any("language filter skipped" in n for n in plan.notes)


# ---- curated dataset: determinism and the card ------------------------------------------------

def _dataset_files(folder: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            rel = p.relative_to(folder).as_posix()
            if rel == "meta.json":
                meta = json.loads(data)
                meta["provenance"].pop("created")
                data = json.dumps(meta).encode()
            elif rel == "data_card.json":
                card = json.loads(data)
                card.pop("timing")
                data = json.dumps(card).encode()
            elif rel == "data_card.md":
                data = data.split(b"## Timing")[0]
            files[rel] = data
    return files


def test_curated_dataset_is_deterministic_and_has_a_card(tmp_path: Path) -> None:
    docs = _code_docs()
    plan = build_steps("code")
    meta, card = curate_dataset(lambda: iter(docs), tmp_path / "a", plan=plan, vocab_size=300)
    with LocalExecutor(2) as ex:
        curate_dataset(lambda: iter(docs), tmp_path / "b", plan=build_steps("code"), executor=ex, vocab_size=300)
    a, b = _dataset_files(tmp_path / "a"), _dataset_files(tmp_path / "b")
    assert set(a) >= {"meta.json", "tokenizer.json", "data_card.json", "data_card.md", "data_card.png",
                      "train/000000.bin"}
    assert a == b
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spill or temp folder left
    assert card["summary"]["docs_in"] == 7 and card["summary"]["docs_out"] == 4
    assert card["tokens"]["documents"] == 4 == meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert card["tokens"]["tokens_per_document"]["total"] + 4 == tokens  # + one end-of-text per document
    assert {r["reason"] for r in card["removals"]} == {"code:autogenerated", "dedup:exact", "dedup:near"}
    assert card["duplicates"]["near_dedup"]["n_clusters"] == 1
    assert sum(card["lengths"]["chars_in"]["counts"]) == 7 and sum(card["lengths"]["tokens_out"]["counts"]) == 4
    md = (tmp_path / "a" / "data_card.md").read_text()
    assert "code:autogenerated" in md and "gen.py" in md and "| near_dedup |" in md
    assert any("kept 57.1% of documents" in line for line in summary_lines(card))


def test_card_without_matplotlib_notes_the_missing_png(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    _, card = curate_dataset(lambda: iter(_code_docs()), tmp_path / "ds", plan=build_steps("none"), vocab_size=300)
    assert not (tmp_path / "ds" / "data_card.png").exists()
    assert any("matplotlib" in n for n in card["notes"])
    assert "matplotlib" in (tmp_path / "ds" / "data_card.md").read_text()


def test_cli_prepare_with_profile_on_bad_inputs(tmp_path: Path) -> None:
    d = _bad_inputs(tmp_path)
    (d / "mod.py").write_text(Path(__file__).read_text())
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "leantrain.cli", "data", "prepare", str(d), "--out", str(out),
                        "--profile", "code", "--executor", "serial", "--vocab-size", "300", "--exclude", "*.log",
                        "--set", "code.min_alnum_fraction=0.2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "near_dedup" in r.stdout and "kept" in r.stdout and "truncated" in r.stdout
    card = json.loads((out / "data_card.json").read_text())
    assert card["sources"]["read_stats"]["truncated"] == 2 and card["settings"]["code"]["min_alnum_fraction"] == 0.2
    bad = subprocess.run([sys.executable, "-m", "leantrain.cli", "data", "prepare", str(d), "--out", str(out),
                          "--set", "gopher_quality.nope=1", "--profile", "web"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown curation setting" in bad.stderr and "Traceback" not in bad.stderr
