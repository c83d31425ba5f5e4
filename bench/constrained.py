"""Constrained decoding: validity with and without the constraint, and what the mask costs in tokens/s.

Uses a trained run when given (`--run runs/tiny-...`), else the tiny recipe's model with random weights
(speed does not depend on the weights; validity without a constraint is then ~0, the floor). For a JSON
schema, a regex and an EBNF grammar: N samples at temperature 1 with the constraint and N without, each
up to --tokens new tokens; prints the share of outputs that are valid, and generation tokens/s
constrained / unconstrained (medians over the samples; grammar compile time listed apart).

    python bench/constrained.py                         # random tiny model, 16 samples per rule
    python bench/constrained.py --run runs/tiny-XXXX    # a trained run: unconstrained validity is real
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _data import cpu_name, dataset  # noqa: E402
from leantrain.model.constrained import compile_constraint
from leantrain.model.generate import generate
from leantrain.tokens.tokenizer import EOT, load_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
REGEX = r"def [a-z_]{1,12}\([a-z, ]{0,20}\):"
GRAMMAR = 'root ::= expr\nexpr ::= term ("+" term){0,4}\nterm ::= [1-9] [0-9]? | "(" expr ")"\n'


def valid_json(text: str) -> bool:
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(v, dict) and set(v) == {"name", "age"} and isinstance(v["age"], int)


RULES = {
    "json_schema": (json.dumps(SCHEMA), valid_json),
    "regex": (REGEX, lambda t: re.fullmatch(REGEX, t) is not None),
    "grammar": (GRAMMAR, lambda t: re.fullmatch(r"[0-9()+]+", t) is not None and t.count("(") == t.count(")")),
}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run directory (default: the tiny recipe with random weights)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:  # the small dataset made when data/stdlib is not prepared
        run(args, Path(scratch))


def run(args: argparse.Namespace, scratch: Path) -> None:
    if args.run:
        import leantrain

        loaded = leantrain.load_model(args.run)
        model, tok, vocab_size = loaded.model, loaded.tokenizer, loaded.config.model.vocab_size
    else:
        from leantrain.config import load_config
        from leantrain.model import Transformer

        data = dataset(None, scratch)
        tok = load_tokenizer(data)
        cfg = load_config(recipe="tiny", overrides={"data": {"path": data}}).model
        torch.manual_seed(0)
        model, vocab_size = Transformer(cfg).eval(), cfg.vocab_size
    eot = tok.token_to_id(EOT)
    prompt = tok.encode("value = ").ids
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; {args.samples} samples x "
          f"{args.tokens} tokens at temperature 1; model {'trained: ' + args.run if args.run else 'random tiny'}")
    print(f"{'rule':<12} {'compile s':>9} {'valid free':>10} {'valid constr':>12} {'tok/s free':>10} "
          f"{'tok/s constr':>12} {'ratio':>6}")
    for kind, (source, ok) in RULES.items():
        t0 = time.perf_counter()
        grammar = compile_constraint(kind, source, tok.get_vocab(), vocab_size, [eot])
        compile_s = time.perf_counter() - t0
        rates: dict[bool, list[float]] = {False: [], True: []}
        valid = {False: 0, True: 0}
        for seed in range(args.samples):
            for constrained in (False, True):
                constraint = grammar.matcher() if constrained else None
                t0 = time.perf_counter()
                ids = generate(model, prompt, args.tokens, temperature=1.0, top_k=None, seed=seed, eos_id=eot,
                               constraint=constraint)
                rates[constrained].append(len(ids) / (time.perf_counter() - t0))
                text = tok.decode([i for i in ids if i != eot])
                valid[constrained] += ok(text)
        free, con = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{kind:<12} {compile_s:>9.2f} {valid[False] / args.samples:>10.0%} "
              f"{valid[True] / args.samples:>12.0%} {free:>10.0f} {con:>12.0f} {con / free:>6.2f}")


if __name__ == "__main__":
    main()
