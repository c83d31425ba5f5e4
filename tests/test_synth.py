"""`leantrain synth`: candidates from a real tiny run, symbolic checks, curation, provenance and the data card.

The checkers are tested on hand-written good and bad inputs; the command end to end on a run trained here for
a few dozen steps (its Python is mostly broken, which is what the checks are for), constrained (every JSON
candidate fits the schema) and unconstrained (the same schema check rejects what the model writes freely).
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading

import pytest

from helpers import tiny_config
from leantrain.cli import main
from leantrain.synth.checks import (
    CheckStep,
    GrammarCheck,
    JsonParse,
    JsonSchemaCheck,
    PythonSyntax,
    RegexCheck,
    RuffCheck,
    checks_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    from leantrain.train.trainer import Trainer

    run = tmp_path_factory.mktemp("synth") / "run"
    Trainer(tiny_config(dataset, train__steps=40, train__eval_every=40, checkpoint__every=40), run).fit()
    return run


def records(out, name="synthetic.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


# ---- the checkers on hand-written inputs ---------------------------------------------------------------------

def test_python_syntax_parses_and_compiles():
    check = PythonSyntax()
    assert check.verdict("def f(x):\n    return x + 1\n") is None
    assert "line 1" in check.verdict("def f(x)\n    return x\n")
    assert check.verdict("return 1\n") is not None  # ast.parse takes it; compile() does not
    assert check.verdict("x = 1\0\n") is not None


def test_ruff_rejects_lint_errors_only():
    verdicts = RuffCheck().verdicts(["def f(x):\n    return x\n", "def f():\n    return undefined_name\n",
                                     "import os\n"])
    assert verdicts[0] is None
    assert "F821" in verdicts[1] and "F401" in verdicts[2]


def test_json_schema_regex_and_grammar_checks():
    assert JsonParse().verdict('{"a": [1, 2]}') is None and JsonParse().verdict("{'a': 1}") is not None
    schema = JsonSchemaCheck(json.dumps(SCHEMA))
    assert schema.verdict('{"name": "ada", "age": 36}') is None
    assert "age" in schema.verdict('{"name": "ada"}')
    assert schema.verdict('{"name": "ada", "age": 360}') is not None
    assert schema.verdict("not json") == "not JSON"
    regex = RegexCheck(r"[a-z]+@[a-z]+\.org")
    assert regex.verdict("ada@lovelace.org") is None and regex.verdict("ada@lovelace.org!") is not None
    grammar = GrammarCheck('root ::= num ("+" num)*\nnum ::= [0-9]+')
    assert grammar.verdict("1+22+3") is None
    assert grammar.verdict("1+") == "an unfinished sentence of the grammar"
    assert grammar.verdict("a") is not None


def test_check_step_counts_and_explains_drops():
    from leantrain.corpus.pipeline import Pipeline
    from leantrain.corpus.readers import Document

    docs = [Document(str(i), t, "synthetic") for i, t in enumerate(["x = 1\n", "x = (\n", "", "y = 2\n"])]
    pipe = Pipeline(lambda: iter(docs), [CheckStep(c) for c in checks_for("python")])
    assert [d.id for d in pipe.run()] == ["0", "3"]
    stats = {s.name: s for s in pipe.stats}
    assert stats["check:non_empty"].dropped == {"check:non_empty": 1}
    assert stats["check:python_syntax"].dropped == {"check:python_syntax": 1}
    assert stats["check:python_syntax"].examples["check:python_syntax"][0]["id"] == "1"


def test_exec_check_runs_programs_isolated():
    from leantrain.synth.sandbox import run_isolated

    pytest.importorskip("resource")
    try:
        checks_for("python", exec_check=True)
    except Exception as e:  # noqa: BLE001 - no user namespaces here: the check refuses, it never runs unisolated
        pytest.skip(str(e))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    threading.Thread(target=lambda: listener.accept(), daemon=True).start()
    try:
        assert run_isolated("print(sum(range(10)))\n") is None
        assert run_isolated("raise SystemExit(3)\n") is not None
        assert "ValueError: boom" in run_isolated("raise ValueError('boom')\n")
        assert "over 1 s" in run_isolated("while True:\n    pass\n", timeout=1)
        assert "MemoryError" in run_isolated("x = bytearray(2 << 30)\n", memory_mb=256)
        # this process listens on 127.0.0.1; the sandbox has its own network namespace, so it cannot reach it
        assert run_isolated(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n") \
            is not None
    finally:
        listener.close()


# ---- the command on a trained run ----------------------------------------------------------------------------

def test_synth_python_writes_checked_curated_corpus_with_card(run, tmp_path, capsys):
    out = tmp_path / "py"
    assert main(["synth", str(run), "--kind", "python", "--count", "24", "--max-new-tokens", "48", "--ruff",
                 "--out", str(out)]) == 0
    assert "candidates kept" in capsys.readouterr().out
    recs = records(out)
    card = json.loads((out / "data_card.json").read_text())
    syn = card["synthetic"]
    assert syn["generated"] == 24 and syn["accepted"] == len(recs)
    rejected = sum(r["documents"] for r in syn["rejected"])
    assert len(recs) + rejected == 24
    dropped = records(out, "rejected.jsonl")
    assert len(dropped) == rejected and {r["id"] for r in dropped}.isdisjoint(r["id"] for r in recs)
    for r in dropped:
        if r["meta"]["rejected"]["reason"] == "check:python_syntax":
            with pytest.raises(SyntaxError):
                compile(r["text"], "<t>", "exec")
    assert any(r["reason"] == "check:python_syntax" for r in syn["rejected"])  # a 40-step model writes broken code
    for r in recs:
        compile(ast.parse(r["text"]), "<t>", "exec")
        m = r["meta"]
        assert m["generator"]["kind"] == "run" and m["generator"]["step"] == 40
        assert m["prompt"] and r["text"].startswith(m["prompt"].rstrip("\n").split("\n")[0])
        assert m["prompt_source"] == "seed"  # function signatures cut from the run's own dataset
        assert m["sampling"]["temperature"] == 0.8 and isinstance(m["seed"], int)
        assert m["checks"] == ["check:non_empty", "check:python_syntax", "check:ruff"]
    assert len({r["meta"]["seed"] for r in recs}) == len(recs)
    names = [c["check"] for c in syn["checks"]]
    assert names == ["non_empty", "python_syntax", "ruff"]
    assert syn["share_with_reference"]["real_documents"] > 0
    assert {"exact_dedup", "near_dedup"} <= {s["name"] for s in card["steps"]}
    md = (out / "data_card.md").read_text()
    assert "## Synthetic data" in md and "python_syntax" in md
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["format"] == "leantrain-synth/1" and manifest["generation"]["new_tokens"] > 0
    # an earlier output is replaced only with --overwrite; a second run with the same seed gives the same corpus
    assert main(["synth", str(run), "--kind", "python", "--count", "24", "--max-new-tokens", "48", "--ruff",
                 "--out", str(out), "--overwrite"]) == 0
    assert records(out) == recs


def test_constrained_duplicates_are_removed_also_against_the_real_corpus(run, tmp_path):
    import leantrain

    corpus = tmp_path / "real"
    corpus.mkdir()
    (corpus / "one.py").write_text("def f():\n    return 1\n")
    result = leantrain.synth(run, tmp_path / "out", kind="python", count=16, regex=r"def f\(\):\n    return [1-3]\n",
                             corpus=[corpus], seed_docs=False, prompts=["# a function\n"], temperature=1.0,
                             top_k=0)
    syn = result.card["synthetic"]
    assert syn["acceptance"]["checks"] == 1.0  # constrained: every candidate is valid Python
    texts = [r["text"] for r in records(tmp_path / "out")]
    assert len(texts) == len(set(texts)) and set(texts) <= {"def f():\n    return 2\n", "def f():\n    return 3\n"}
    reasons = {r["reason"]: r["documents"] for r in syn["rejected"]}
    assert reasons.get("dedup:exact_of_real", 0) >= 1  # the copy of the real corpus's function went
    assert sum(reasons.values()) == 16 - len(texts)


def test_json_schema_constrained_is_all_valid_unconstrained_is_not(run, tmp_path):
    import leantrain

    kw = dict(kind="json", count=12, json_schema=SCHEMA, max_new_tokens=48, temperature=1.0)
    on = leantrain.synth(run, tmp_path / "on", **kw)
    assert on.card["synthetic"]["acceptance"]["checks"] == 1.0 and on.generated == 12
    for r in records(tmp_path / "on"):
        value = json.loads(r["text"])
        assert set(value) == {"name", "age"} and 0 <= value["age"] <= 99
        assert r["meta"]["sampling"]["constraint"]["kind"] == "json_schema"
    off = leantrain.synth(run, tmp_path / "off", constrain=False, **kw)
    assert off.card["synthetic"]["acceptance"]["checks"] < 1.0
    assert {r["reason"] for r in off.card["synthetic"]["rejected"]} & {"check:json_parse", "check:json_schema"}
    assert all(re.fullmatch(r"\{.*\}", r["text"], re.S) for r in records(tmp_path / "off"))


def test_from_an_hf_export_and_ctrl_c_leaves_nothing(run, tmp_path):
    import leantrain

    hf = tmp_path / "hf"
    leantrain.export(run, hf)
    r = leantrain.synth(hf, tmp_path / "out", kind="text", count=4, max_new_tokens=16, prompts=["def "],
                        profile="none")
    assert r.manifest["generator"]["kind"] == "hf" and r.manifest["generator"]["step"] == 40
    assert all(rec["meta"]["generator"]["kind"] == "hf" for rec in records(tmp_path / "out"))

    def interrupt(stage, done, total):
        if stage == "generate" and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        leantrain.synth(run, tmp_path / "stopped", kind="python", count=8, max_new_tokens=8, batch_size=2,
                        progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no output, no hidden staging folder
