"""Constrained decoding: every sampled output stays inside its regex, JSON schema or EBNF grammar.

An untrained model at temperature 1 writes near-uniform noise over the vocabulary, the hardest case for a
constraint: without it, no sample would match; with it, every one must.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from helpers import tiny_config
from leantrain.errors import ConfigError
from leantrain.model.constrained import compile_constraint
from leantrain.model.generate import generate
from leantrain.model.transformer import Transformer
from leantrain.tokens.tokenizer import EOT, load_tokenizer

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)"
# sums of small numbers: a grammar with alternation, repetition and a recursive rule
GRAMMAR = r'''root ::= expr
expr ::= term ("+" term){0,3}
term ::= [1-9] [0-9]? | "(" expr ")"
'''


@pytest.fixture(scope="module")
def setup(dataset):
    torch.manual_seed(0)
    cfg = tiny_config(dataset)
    model = Transformer(cfg.model).eval()
    tok = load_tokenizer(dataset)
    return model, tok, cfg.model.vocab_size


def samples(setup, kind: str, source: str, n: int = 12, max_new: int = 60) -> list[str]:
    model, tok, vocab_size = setup
    eot = tok.token_to_id(EOT)
    grammar = compile_constraint(kind, source, tok.get_vocab(), vocab_size, [eot])
    prompt = tok.encode("value = ").ids
    out = []
    for seed in range(n):
        constraint = grammar.matcher()
        ids = generate(model, prompt, max_new, temperature=1.0, top_k=None, seed=seed, eos_id=eot,
                       constraint=constraint)
        assert constraint.complete, (kind, seed, tok.decode(ids))
        assert ids[-1] == eot  # it ended by choosing the end-of-text token, allowed only once complete
        out.append(tok.decode(ids[:-1]))
    return out


def test_every_regex_sample_matches(setup) -> None:
    texts = samples(setup, "regex", REGEX)
    assert all(re.fullmatch(REGEX, t) for t in texts), texts
    assert len(set(texts)) > 1  # still sampling, not one forced string


def test_every_json_sample_parses_and_fits_the_schema(setup) -> None:
    for text in samples(setup, "json_schema", json.dumps(SCHEMA)):
        value = json.loads(text)
        assert set(value) == {"name", "age", "tags"}, text
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 99
        assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}


def test_every_grammar_sample_parses(setup) -> None:
    for text in samples(setup, "grammar", GRAMMAR):
        assert re.fullmatch(r"[0-9()+]+", text), text
        tree = ast.parse(text, mode="eval")  # a sum of integers in brackets is a Python expression too
        assert isinstance(eval(compile(tree, "<grammar>", "eval"), {"__builtins__": {}}), int)


def test_unconstrained_noise_does_not_match(setup) -> None:
    """The constraint is what makes the outputs valid: the same model and seeds without it match nothing."""
    model, tok, _ = setup
    prompt = tok.encode("value = ").ids
    texts = [tok.decode(generate(model, prompt, 20, temperature=1.0, top_k=None, seed=s)) for s in range(12)]
    assert not any(re.fullmatch(REGEX, t) for t in texts)


def test_greedy_constrained_is_deterministic_and_cache_agrees(setup) -> None:
    model, tok, vocab_size = setup
    eot = tok.token_to_id(EOT)
    grammar = compile_constraint("regex", REGEX, tok.get_vocab(), vocab_size, [eot])
    prompt = tok.encode("mail: ").ids
    runs = [generate(model, prompt, 40, temperature=0, eos_id=eot, constraint=grammar.matcher(), use_cache=c)
            for c in (True, True, False)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("kind,source,words", [
    ("regex", "[", "does not compile"),
    ("regex", r"[^\s\S]", "matches no text"),
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", '{"type": "objec"}', "objec"),
    ("grammar", "root ::= missing", "missing"),
])
def test_bad_rules_are_one_line_errors(setup, kind: str, source: str, words: str) -> None:
    _, tok, vocab_size = setup
    with pytest.raises(ConfigError) as e:
        compile_constraint(kind, source, tok.get_vocab(), vocab_size, [tok.token_to_id(EOT)])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_api_generate_takes_each_rule_and_warns_when_the_budget_runs_out(setup, dataset) -> None:
    import leantrain
    from leantrain.api import IncompleteOutputWarning, LoadedModel

    model, tok, _ = setup
    loaded = LoadedModel(model, tok, tiny_config(dataset), 0, dataset)
    mail = leantrain.generate(loaded, "mail: ", regex=REGEX, temperature=0)
    assert re.fullmatch(REGEX, mail)
    value = json.loads(leantrain.generate(loaded, "v = ", json_schema=SCHEMA, temperature=1.0, max_new_tokens=80))
    assert set(value) == {"name", "age", "tags"}
    with pytest.warns(IncompleteOutputWarning, match="raise --max-new-tokens"):
        cut = leantrain.generate(loaded, "v = ", grammar='root ::= "(" [a-c]{20} ")"', temperature=0,
                                 max_new_tokens=2)
    assert re.fullmatch(r"\([a-c]*", cut)
    with pytest.raises(ConfigError, match="at most one"):
        leantrain.generate(loaded, "x", regex="a", grammar=GRAMMAR)
