"""The data card: what went in, what each step removed and why, what came out, in tokens too.

`data_card.json` is for programs, `data_card.md` for people, `data_card.png` (length histograms,
only when matplotlib is installed) for eyes. Everything except the `timing` section is a function
of the input and the config, so two runs over the same data give the same card.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from pathlib import Path
from typing import Any

from leantrain.files import write_durable

FORMAT = "leantrain-data-card/1"
MAX_CLUSTERS = 1000  # per dedup step in the json; the markdown shows fewer


MAX_BINS = 30


def length_edges(*groups: list[int]) -> list[int]:
    """Integer bin edges [e0, e1), [e1, e2), ... shared by `groups` (chars in and out share an axis).

    As many bins as the data supports (the fewer of Sturges' 1 + log2 n and sqrt n, never more than the
    integers in range, at most MAX_BINS), starting at the smallest length, so a handful of documents gives
    a handful of bars and no run of empty ones; widths are whole numbers, equal when the lengths span
    less than 100x, and growing geometrically beyond (lengths often span orders of magnitude)."""
    values = [v for g in groups for v in g]
    if not values:
        return [0, 1]
    lo, hi = min(values), max(values)
    n = max(len(g) for g in groups)  # documents per histogram, not summed over the groups
    bins = max(1, min(MAX_BINS, 1 + math.ceil(math.log2(n)), math.ceil(math.sqrt(n)), hi - lo + 1))
    base = max(lo, 1)
    if hi / base >= 100:
        ratio = ((hi + 1) / base) ** (1 / bins)
        edges = sorted({round(base * ratio ** i) for i in range(bins)} | {hi + 1})
        return [0, *edges] if lo == 0 else edges
    width = math.ceil((hi - lo + 1) / bins)
    return list(range(lo, hi + 1, width)) + [lo + width * math.ceil((hi - lo + 1) / width)]


def histogram(values: list[int], edges: list[int] | None = None) -> dict[str, list[int]]:
    """Counts of `values` in the half-open integer bins of `edges` (default: `length_edges(values)`)."""
    edges = edges or length_edges(values)
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[min(max(bisect.bisect_right(edges, v) - 1, 0), len(counts) - 1)] += 1
    return {"edges": edges, "counts": counts}


def bin_label(lo: int, hi: int) -> str:
    """The integers of bin [lo, hi): "7", or "8-15"."""
    return f"{lo:,}" if hi - lo == 1 else f"{lo:,}-{hi - 1:,}"


def _describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "total": sum(values), "mean": round(sum(values) / len(values), 1),
            "median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1], "min": ordered[0]}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def build_card(pipe: Any, plan: Any, meta: dict[str, Any], doc_tokens: list[int], *, read_stats: Any = None,
               executor: str = "") -> dict[str, Any]:
    """The card's content from a finished `Pipeline`, its `Plan` and the token dataset's meta."""
    steps = []
    timing = {}
    for s in pipe.stats:
        d = s.to_dict()
        timing[d["name"]] = d.pop("seconds")
        steps.append(d)
    first, last = pipe.stats[0], pipe.stats[-1]
    removals = []
    for d in steps:
        for reason, n in sorted(d["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
            removals.append({"step": d["name"], "reason": reason, "documents": n,
                             "examples": d["examples"].get(reason, [])})
    duplicates = {}
    for name, report in pipe.reports.items():
        if not report:  # a global step with nothing to add to its counts (synth's checks)
            continue
        clusters = report.get("clusters")
        if isinstance(clusters, list):
            report = {**report, "n_clusters": len(clusters), "docs_removed": sum(len(c.get("removed", []))
                                                                                 for c in clusters),
                      "clusters": clusters[:MAX_CLUSTERS], "clusters_truncated": len(clusters) > MAX_CLUSTERS}
        duplicates[name] = report
    for step in plan.steps:
        if step.name == "decontaminate":
            duplicates["decontaminate"] = {k: getattr(step, k) for k in ("n", "eval_docs", "short_eval_docs",
                                                                          "eval_ngrams") if hasattr(step, k)}
    splits = meta["splits"]
    tokens_total = splits["train"]["tokens"] + splits["val"]["tokens"]
    bytes_total = splits["train"]["bytes"] + splits["val"]["bytes"]
    docs_total = splits["train"]["documents"] + splits["val"]["documents"]
    prov = meta.get("provenance", {})
    chars = length_edges(pipe.lengths["in"], pipe.lengths["out"])  # one axis for characters in and out
    card = {
        "format": FORMAT,
        "profile": plan.profile,
        "summary": {"docs_in": first.docs_in, "docs_out": last.docs_out, "bytes_in": first.bytes_in,
                    "bytes_out": last.bytes_out,
                    "kept_docs_fraction": round(last.docs_out / first.docs_in, 4) if first.docs_in else 0.0,
                    "kept_bytes_fraction": round(last.bytes_out / first.bytes_in, 4) if first.bytes_in else 0.0},
        "sources": {"read_stats": read_stats.to_dict() if read_stats is not None else None},
        "steps": steps,
        "removals": removals,
        "duplicates": duplicates,
        "tokens": {
            "vocab_size": meta["vocab_size"], "tokenizer": prov.get("tokenizer"),
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "documents": docs_total, "bytes_per_token": round(bytes_total / tokens_total, 3) if tokens_total else 0,
            "tokens_per_document": _describe(doc_tokens),
            # eot ids are not counted here: these are the document's own tokens
        },
        "lengths": {"chars_in": histogram(pipe.lengths["in"], chars),
                    "chars_out": histogram(pipe.lengths["out"], chars), "tokens_out": histogram(doc_tokens)},
        **({"mix": meta["mix"]} if "mix" in meta else {}),  # data prepare --source: the weighted sources
        "settings": plan.settings,
        "notes": list(plan.notes),
        "timing": {"seconds_by_step": timing, "pipeline_seconds": round(pipe.seconds, 3), "executor": executor,
                   "note": "per-document steps: CPU seconds summed over workers; read and global steps: wall seconds"},
    }
    return _jsonable(card)


def summary_lines(card: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: docs and bytes in -> out per step, then the kept fraction."""
    lines = []
    for s in card["steps"]:
        dropped = sum(s["dropped"].values())
        extra = f", dropped {dropped:,}" if dropped else ""
        changed = sum(s["modified"].values())
        extra += f", changed {changed:,}" if changed else ""
        lines.append(f"  {s['name']:<18} {s['docs_in']:>9,} -> {s['docs_out']:>9,} docs  "
                     f"{s['bytes_in'] / 1e6:>9.2f} -> {s['bytes_out'] / 1e6:>9.2f} MB{extra}")
    sm = card["summary"]
    lines.append(f"  kept {sm['kept_docs_fraction']:.1%} of documents and {sm['kept_bytes_fraction']:.1%} of bytes "
                 f"(profile {card['profile']})")
    return lines


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())[:limit]
    return text.replace("|", "\\|").replace("`", "'")


def length_tables(hists: dict[str, dict[str, list[int]]]) -> list[str]:
    """The length histograms as markdown tables: characters in and out share bins, tokens have their own."""
    out = []
    for title, keys in (("characters per document", ("chars_in", "chars_out")), ("tokens per document",
                                                                               ("tokens_out",))):
        edges = hists[keys[0]]["edges"]
        out += [f"| {title} | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                "| --- |" + " ---: |" * len(keys)]
        for i in range(len(edges) - 1):
            out.append(f"| {bin_label(edges[i], edges[i + 1])} | "
                       + " | ".join(f"{hists[k]['counts'][i]:,}" for k in keys) + " |")
        out.append("")
    return out


def synthetic_lines(syn: dict[str, Any]) -> list[str]:
    """The card's synthetic-data section: generator, acceptance per check, share, rejected examples."""
    g = syn["generator"]
    rule = syn.get("constraint")
    out = ["## Synthetic data", "",
           f"Generated {syn['generated']:,} {syn['kind']} candidates with {g.get('kind')} {g.get('path')} "
           f"(step {g.get('step')}), prompts from {syn['prompt_source']}, sampling {json.dumps(syn['sampling'])}"
           + (f", {'constrained by' if rule.get('applied') else 'checked against'} a {rule['kind']}" if rule else "")
           + f"; {syn['passed_checks']:,} passed the checks ({syn['acceptance']['checks']:.1%}), "
           f"{syn['accepted']:,} were kept after curation ({syn['acceptance']['overall']:.1%}).", "",
           "| check | candidates in | passed | acceptance |", "| --- | ---: | ---: | ---: |"]
    for c in syn["checks"]:
        rate = "-" if c["acceptance"] is None else f"{c['acceptance']:.1%}"
        out.append(f"| {c['check']} | {c['in']:,} | {c['passed']:,} | {rate} |")
    share = syn.get("share_with_reference")
    if share:
        out += ["", f"Synthetic share of real + synthetic: {share['documents']:.1%} of documents "
                f"({share['synthetic_documents']:,} synthetic, {share['real_documents']:,} real), "
                f"{share['characters']:.1%} of characters."]
    if syn["rejected"]:
        out += ["", "Rejected, with the reason (the first few of each):", ""]
        for r in syn["rejected"]:
            out.append(f"- **{r['reason']}** ({r['documents']:,})")
            for ex in r["examples"]:
                out.append(f"  - `{_md_escape(ex['id'], 40)}`: {_md_escape(ex['detail'])} — "
                           f"\"{_md_escape(ex['text'], 100)}\"")
    return out + [""]


def to_markdown(card: dict[str, Any]) -> str:
    sm = card["summary"]
    out = ["# Data card", "",
           f"Curation profile **{card['profile']}**: {sm['docs_in']:,} documents ({sm['bytes_in']:,} bytes) in, "
           f"{sm['docs_out']:,} documents ({sm['bytes_out']:,} bytes) out: kept {sm['kept_docs_fraction']:.1%} of "
           f"documents and {sm['kept_bytes_fraction']:.1%} of bytes.", ""]
    rs = card["sources"].get("read_stats")
    if rs:
        skipped = {k: v for k, v in rs.items() if v and k not in ("files", "documents", "bytes")}
        out += [f"Read {rs['files']:,} files -> {rs['documents']:,} documents"
                + (f"; skipped or repaired: {', '.join(f'{k} {v:,}' for k, v in skipped.items())}" if skipped else "")
                + ".", ""]
    if "synthetic" in card:  # `leantrain synth`: where the documents came from and what the checks let through
        out += synthetic_lines(card["synthetic"])
    out += ["## Steps", "", "| step | docs in | docs out | bytes in | bytes out | dropped | changed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in card["steps"]:
        changed = ", ".join(f"{k} {v:,}" for k, v in s["modified"].items())
        out.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['bytes_in']:,} | {s['bytes_out']:,} "
                   f"| {sum(s['dropped'].values()):,} | {changed} |")
    out += ["", "## Why documents were removed", ""]
    if not card["removals"]:
        out.append("Nothing was removed.")
    for r in card["removals"]:
        out.append(f"- **{r['reason']}** ({r['step']}): {r['documents']:,} documents")
        for ex in r["examples"]:
            out.append(f"  - `{_md_escape(ex['id'], 80)}`: {_md_escape(ex['detail'])} — "
                       f"\"{_md_escape(ex['text'], 100)}\"")
    out += ["", "## Duplicates and contamination", ""]
    if not card["duplicates"]:
        out.append("No dedup or decontamination step ran.")
    for name, rep in card["duplicates"].items():
        if "n_clusters" in rep:
            out.append(f"- **{name}**: {rep['n_clusters']:,} clusters, {rep['docs_removed']:,} documents removed")
            for c in rep["clusters"][:5]:
                removed = c.get("removed", [])
                more = f" (+{len(removed) - 3} more)" if len(removed) > 3 else ""
                out.append(f"  - kept `{c.get('kept')}`, removed {', '.join(f'`{x}`' for x in removed[:3])}{more}")
        else:
            plain = ", ".join(f"{k} {v}" for k, v in rep.items() if not isinstance(v, dict | list))
            out.append(f"- **{name}**: {plain}")
    t = card["tokens"]
    tpd = t["tokens_per_document"]
    out += ["", "## Tokens", "",
            f"Tokenizer: {t['tokenizer']}, vocabulary {t['vocab_size']:,}; {t['bytes_per_token']} bytes per token.",
            f"Train {t['train_tokens']:,} tokens, val {t['val_tokens']:,} tokens, {t['documents']:,} documents.",
            (f"Tokens per document: mean {tpd.get('mean')}, median {tpd.get('median')}, p90 {tpd.get('p90')}, "
             f"max {tpd.get('max')}." if tpd.get("count") else ""),
            "", "## Lengths", "", *length_tables(card["lengths"])]
    if "mix" in card:
        out += ["## Mixture", "", "Training draws each sequence's source with probability = weight; a run of T "
                "trained tokens sees a source weight x T / its train tokens times (its effective epochs, printed "
                "when training starts), so a small source repeats.", "",
                "| source | weight | train tokens | train docs | val tokens | share of train tokens | "
                "trained tokens per epoch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        train_total = sum(v["train_tokens"] for v in card["mix"]["sources"].values()) or 1
        for name, v in card["mix"]["sources"].items():
            per_epoch = f"{v['tokens_per_epoch']:,}" if v["tokens_per_epoch"] else "never drawn"
            out.append(f"| {_md_escape(name)} | {v['weight']:.3g} | {v['train_tokens']:,} | {v['train_documents']:,} "
                       f"| {v['val_tokens']:,} | {v['train_tokens'] / train_total:.1%} | {per_epoch} |")
        out.append("")
    if card["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    out += ["", "## Settings", "", "```json", json.dumps(card["settings"], indent=1, sort_keys=True), "```", ""]
    tm = card["timing"]
    out += ["## Timing (varies between runs)", "", f"Executor: {tm['executor']}; pipeline {tm['pipeline_seconds']} s.",
            ""] + [f"- {k}: {v} s" for k, v in tm["seconds_by_step"].items()] + [""]
    return "\n".join(out)


def plot_lengths(card: dict[str, Any], path: Path) -> bool:
    """Length histograms as a PNG; False (and nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    hists = card["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, keys, title in ((axes[0], ("chars_in", "chars_out"), "characters per document"),
                            (axes[1], ("tokens_out",), "tokens per document")):
        edges = hists[keys[0]]["edges"]
        n = len(edges) - 1
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):  # side by side, one bar per bin: every bar is a bin that has integers
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(n)], hists[key]["counts"], width=width,
                   label=key.replace("_", " "))
        ax.set_xticks(range(n), [bin_label(edges[i], edges[i + 1]) for i in range(n)], rotation=60, fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # documents are counted in whole numbers
        ax.set_title(title)
        ax.set_ylabel("documents")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def write_card(card: dict[str, Any], folder: Path, plot: bool = True) -> None:
    """data_card.json, data_card.md and (if matplotlib is there) data_card.png in `folder`."""
    folder = Path(folder)
    if plot and not plot_lengths(card, folder / "data_card.png"):
        card["notes"].append("length histogram PNG skipped: matplotlib is not installed "
                             "(pip install 'leantrain[data]')")
    write_durable(folder / "data_card.json", json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    write_durable(folder / "data_card.md", to_markdown(card))
