"""Self-supervised objectives beyond next-token prediction, measured on the built-in corpus at a CPU budget.

Each part trains its models on the same token dataset in the same run and prints its table; `--part` picks
one (default: all). Parts:

fim  Two models of one shape, same seed, same tokens: plain next-token training (data.fim_rate = 0) and
     fill-in-the-middle (data.fim_rate = 0.5, half PSM, half SPM). Prints for each
     - next-token loss on the held-out val split (plain text, the same windows): the cost of FIM, as the ratio
       FIM / plain (Bavarian et al. 2022 found it ~1 at scale: "FIM for free");
     - exact match of single lines infilled in held-out functions (Python functions parsed with `ast` from
       the val split's documents; one non-blank body line hidden per function, greedy decoding, the first
       generated line compared after stripping whitespace): left to right from the prefix alone, and with the
       suffix too in the PSM and SPM layouts (FIM model only; the plain model cannot read a suffix);
     - the mean cross-entropy of those hidden lines' tokens under the same prompts (nats/token): how much the
       suffix helps, visible while exact match is still near 0;
     - training tokens/s (FIM costs a little host time per window).
     At a few minutes of CPU training the models are small and exact match is low for both; the table says
     what it measured, not what FIM does at scale.

    python bench/objectives.py                                   # ~6 min on 2 cores
    python bench/objectives.py --part fim --steps 100 --lines 40 # a quick look
"""

from __future__ import annotations

import argparse
import ast
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _data import cpu_name, report_ratio, run_overrides  # noqa: E402
from leantrain import api
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.tokenizer import load_tokenizer


def prepare(scratch: Path, docs: int, vocab: int) -> str:
    """A stdlib token dataset with a leantrain tokenizer (it reserves the FIM sentinels), 5% of files held out."""
    from leantrain.corpus.readers import read_builtin
    from leantrain.tokens.prepare import prepare_dataset

    out = scratch / "stdlib-objectives"
    prepare_dataset(lambda: itertools.islice(read_builtin("stdlib"), docs), out, vocab_size=vocab, val_fraction=0.05)
    return str(out)


def held_out_lines(data: str, seq_len: int, limit: int, reserve: int) -> list[tuple[str, str, str]]:
    """(prefix, line, suffix) triples: one non-blank body line of each function of the val documents whose whole
    text fits the context with `reserve` tokens to spare; the line to hide is drawn with a fixed seed."""
    ds = TokenDataset(data)
    tok = load_tokenizer(data)
    ids = np.concatenate([np.asarray(s) for s in ds.shards("val")])
    ends = np.flatnonzero(ids == ds.eot_id)
    rng = np.random.default_rng(0)
    items = []
    for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends, strict=True):
        text = tok.decode(ids[start:end].tolist())
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
                continue
            first = node.lineno - 1 - len(node.decorator_list)
            body = [i for i in range(node.body[0].lineno - 1, node.end_lineno)
                    if len(lines[i].strip()) >= 4 and not lines[i].strip().startswith("#")]
            func = "".join(lines[first:node.end_lineno])
            if not body or len(tok.encode(func).ids) + reserve > seq_len:
                continue
            i = body[int(rng.integers(len(body)))]
            items.append(("".join(lines[first:i]), lines[i], "".join(lines[i + 1:node.end_lineno])))
    picked = rng.permutation(len(items))[:limit]
    return [items[int(k)] for k in sorted(picked)]


def exact_match(model: api.LoadedModel, items: list[tuple[str, str, str]], mode: str | None, tokens: int) -> float:
    """Share of `items` whose hidden line the model writes exactly (whitespace-stripped first line, greedy);
    mode None: from the prefix alone, else fill in the middle in that layout."""
    hits = 0
    for prefix, line, suffix in items:
        if mode is None:
            out = api.generate(model, prefix, max_new_tokens=tokens, temperature=0) if prefix else ""
        else:
            out = api.generate(model, prefix, suffix=suffix, fim_mode=mode, max_new_tokens=tokens, temperature=0)
        hits += out.split("\n")[0].strip() == line.strip()
    return hits / len(items)


def line_loss(model: api.LoadedModel, items: list[tuple[str, str, str]], mode: str | None) -> float:
    """Mean cross-entropy (nats/token) of the hidden lines' tokens given the prefix alone (mode None) or the
    FIM prompt in that layout: finer than exact match while both models still miss most lines."""
    import torch

    from leantrain.tokens.fim import find_fim_tokens, infill_prompt

    tok = model.tokenizer
    sentinels = find_fim_tokens(tok)
    total, count = 0.0, 0
    for prefix, line, suffix in items:
        prompt = tok.encode(prefix).ids if mode is None else infill_prompt(tok, prefix, suffix, sentinels, mode)
        target = tok.encode(line).ids
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model.model(ids)[0, len(prompt) - 1:-1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
        count += len(target)
    return total / count


def fim_part(args: argparse.Namespace, data: str, scratch: Path) -> None:
    model = {"n_layers": args.layers, "dim": args.dim, "n_heads": 4, "n_kv_heads": 4, "seq_len": args.seq,
             "vocab_size": TokenDataset(data).vocab_size}
    items = held_out_lines(data, args.seq, args.lines, reserve=args.tokens + 4)
    print(f"held-out functions: {len(items)} single lines to fill in, from the val split", flush=True)
    rows = {}
    for name, rate in (("plain", 0.0), ("FIM 0.5", 0.5)):
        overrides = run_overrides(data, args.steps, args.seq, args.batch, args.lr, model=model,
                                  train={"eval_steps": args.val_batches})
        overrides["data"].update(fim_rate=rate, fim_spm_rate=0.5)
        cfg = api.load_config(overrides=overrides)
        t0 = time.perf_counter()
        result = api.train(cfg, scratch / name.replace(" ", "-"))
        train_s = time.perf_counter() - t0
        loaded = api.load_model(result.run_dir)
        t0 = time.perf_counter()
        row = {"val_loss": api.evaluate(loaded, batches=args.val_batches),
               "tokens_per_s": result.metrics.get("tokens_per_s") or result.tokens / train_s, "train_s": train_s,
               "l2r": exact_match(loaded, items, None, args.tokens), "l2r_loss": line_loss(loaded, items, None)}
        if rate:
            for mode in ("psm", "spm"):
                row[mode] = exact_match(loaded, items, mode, args.tokens)
                row[f"{mode}_loss"] = line_loss(loaded, items, mode)
        row["eval_s"] = time.perf_counter() - t0
        rows[name] = row
        print(f"  {name}: trained {result.tokens:,} tokens in {train_s:.0f} s, evaluated in {row['eval_s']:.0f} s",
              flush=True)
    plain, fim = rows["plain"], rows["FIM 0.5"]
    print(f"\nFill in the middle: {args.layers} layers, dim {args.dim}, seq {args.seq}, {args.steps} steps x "
          f"{args.batch} sequences ({args.steps * args.batch * args.seq:,} tokens) each; {cpu_name()}, "
          f"{os.cpu_count()} cores")
    print("| model | val loss (next token) | hidden line: exact match / loss, prefix only | infill PSM | "
          "infill SPM | train tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        cells = [f"{r[k]:.1%} / {r[f'{k}_loss']:.3f}" if k in r else "-" for k in ("l2r", "psm", "spm")]
        print(f"| {name} | {r['val_loss']:.4f} | {' | '.join(cells)} | {r['tokens_per_s']:,.0f} |")
    ratio = fim["val_loss"] / plain["val_loss"]
    print(f"\nnext-token loss FIM / plain: {ratio:.4f} (cost of FIM {100 * (ratio - 1):+.2f}%); hidden-line loss "
          f"FIM infill PSM / plain prefix only: {fim['psm_loss'] / plain['l2r_loss']:.3f}; exact match on {len(items)} "
          f"lines: FIM infill PSM {fim['psm']:.1%} vs plain prefix only {plain['l2r']:.1%}; tokens/s FIM / plain: "
          f"{fim['tokens_per_s'] / plain['tokens_per_s']:.3f}")
    report_ratio("fim_next_token_loss", ratio, "plain next-token training, same tokens", better="lower",
                 em_fim_psm=fim["psm"], em_plain_prefix_only=plain["l2r"], line_loss_fim_psm=fim["psm_loss"],
                 line_loss_plain_prefix_only=plain["l2r_loss"], tokens_per_s=fim["tokens_per_s"])


PARTS = {"fim": fim_part}  # further objectives add their part here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--data", help="a token dataset prepared by this leantrain (default: 400 stdlib files)")
    ap.add_argument("--docs", type=int, default=400, help="stdlib files to prepare when --data is not given")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--lines", type=int, default=100, help="held-out lines to fill in")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generated line")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        t0 = time.perf_counter()
        data = args.data or prepare(scratch, args.docs, args.vocab)
        print(f"dataset {data} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name, part in PARTS.items():
            if args.part in (name, "all"):
                part(args, data, scratch)


if __name__ == "__main__":
    main()
