"""`leantrain synth`: generate candidates, check them, curate them, write a synthetic corpus with its data card.

    model (run or HF folder) -> prompts (given, a prompts file, seed documents of the real corpus, templates)
      -> candidates (batched, KV cache, optionally constrained) -> checks -> curation (filters, exact and near
      dedup against themselves and the real corpus, decontamination) -> OUT/synthetic.jsonl + data card

OUT holds `synthetic.jsonl` (one {"id", "text", "meta"} record per accepted document: generator, prompt,
seed, sampling settings, checks passed; `data prepare OUT/synthetic.jsonl` reads its text like any jsonl),
`rejected.jsonl` (every other candidate, with the check that failed it and why, or "curation"),
`data_card.json` / `.md` (the curation card with a synthetic section: share, acceptance per check, rejected
examples) and `synth.json` (the settings and counts, and the marker that leantrain wrote the folder). The
folder is built under a hidden sibling name and renamed into place when whole; Ctrl-C or an error leaves
OUT as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError, DataError
from leantrain.files import fresh_sibling, remove_stale_temps, swap_in, write_durable
from leantrain.synth.checks import KINDS, checks_for

FORMAT = "leantrain-synth/1"
MARKER = "synth.json"
DEFAULT_PROFILE = {"python": "code", "json": "none", "text": "web"}
REJECTED_EXAMPLES = 3
Progress = Callable[[str, int, int | None], None]


@dataclass
class SynthResult:
    """What `synth` made: counts, the data card and the manifest (synth.json), and notes for people."""

    out: Path
    generated: int
    accepted: int
    card: dict[str, Any]
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def check_out(out: Path, overwrite: bool) -> None:
    """OUT may be new, empty, or an earlier synth output (replaced only with `overwrite`)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"--out {out} exists and is not a folder; pick another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / MARKER
    ours = False
    if marker.is_file() and not marker.is_symlink():
        try:
            ours = json.loads(marker.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
    if not ours:
        raise DataError(f"--out {out} holds files leantrain did not write (no {MARKER}); it is never replaced: "
                        "pick an empty or new folder")
    if not overwrite:
        raise DataError(f"--out {out} holds an earlier synth output; pass --overwrite to replace it, or pick "
                        "another --out")


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} {value!r} is not allowed; expected an integer >= 1")


def python_block_ended(text: str, header_lines: int) -> int | None:
    """Where the first top-level block of `text` ends (the offset of the next line starting at column 0),
    looking past the first `header_lines` lines (the prompt's own); None while the block goes on."""
    offset = 0
    for i, line in enumerate(text.splitlines(keepends=True)):
        if i >= max(1, header_lines) and line.strip() and not line[0].isspace():
            return offset
        offset += len(line)
    return None


def document_text(kind: str, prompt: str, continuation: str, constrained: bool) -> str:
    """The candidate document: the prompt and its continuation (what a Python or text prompt starts is part of
    the document), or the continuation alone (a JSON value, and any constrained output: the rule governs it)."""
    if constrained:
        return continuation  # exactly the rule's sentence: stripping could break it
    if kind == "json":
        return continuation.split("\n\n", 1)[0].strip()
    text = prompt + continuation
    if kind == "python":
        end = python_block_ended(text, prompt.count("\n"))
        text = text[:end] if end is not None else text
    if not text[len(prompt):].strip():
        return ""  # nothing beyond the prompt (a seed's docstring alone would parse): no new document
    return text.rstrip() + "\n" if kind == "python" else text.strip("\n")


def stop_rule(kind: str, prompt: str, constrained: bool) -> Callable[[str], bool] | None:
    """When a row may stop before end-of-text: a Python block that ended, a JSON value followed by a blank line."""
    if constrained:
        return None
    if kind == "python":
        lines = prompt.count("\n")
        return lambda cont: python_block_ended(prompt + cont, lines) is not None
    if kind == "json":
        return lambda cont: "\n\n" in cont
    return None


def synthesize(model: str | Path, out: str | Path, *, kind: str, count: int, load_model: Callable[..., Any],
               prompts: Sequence[str] = (), prompts_file: str | Path | None = None, seed_docs: bool = True,
               corpus: Sequence[str | Path] = (), eval_paths: Sequence[str | Path] = (), profile: str | None = None,
               json_schema: str | None = None, regex: str | None = None, grammar: str | None = None,
               constrain: bool = True, ruff: bool = False, exec_check: bool = False, max_new_tokens: int = 200,
               temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, batch_size: int = 16,
               checkpoint: str | Path | None = None, overwrite: bool = False, dedup: bool = True,
               progress: Progress | None = None) -> SynthResult:
    """See `leantrain.api.synth` (the documented entry); `load_model` is `api.load_model`, handed in."""
    from leantrain.corpus.pipeline import load_curation, plan_for
    from leantrain.model.generate import check_sampling

    t0 = time.perf_counter()
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r} is not allowed; choose one of {', '.join(KINDS)}")
    _positive_int(count, "--count")
    _positive_int(batch_size, "--batch-size")
    check_sampling(max_new_tokens, temperature, top_k)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"--seed {seed!r} is not allowed; expected an integer")
    rules = [(k, v) for k, v in (("regex", regex), ("json_schema", json_schema), ("grammar", grammar)) if v is not None]
    if len(rules) > 1:
        raise ConfigError("pass at most one of --regex, --json-schema and --grammar")
    checks = checks_for(kind, json_schema=json_schema, regex=regex, grammar=grammar, ruff=ruff, exec_check=exec_check)
    prompts = list(prompts)
    if any(not p for p in prompts):
        raise ConfigError("a --prompt is empty; pass some text (or leave --prompt out to use seed documents)")
    if prompts_file is not None:
        from leantrain.synth.sources import read_prompts_file

        prompts += read_prompts_file(prompts_file)
    curation = load_curation(None, [f"profile={json.dumps(profile or DEFAULT_PROFILE[kind])}",
                                    *([] if dedup else ["dedup=false"])])
    plan = plan_for(curation, eval_paths)
    out = Path(out)
    check_out(out, overwrite)
    for p in corpus:
        if not Path(p).exists():
            raise DataError(f"--corpus {p} does not exist; pass the files or folders of the real corpus")

    from leantrain.synth.generate import load_generator

    gen = load_generator(model, checkpoint=checkpoint, load_model=load_model)
    warnings = [f"{w}; used an older checkpoint" for w in gen.warnings]
    grammar_obj = None
    if rules and constrain:
        from leantrain.model.constrained import compile_constraint

        if gen.eos_id is None:
            raise ConfigError(f"--{rules[0][0].replace('_', '-')} needs an end-of-text token in the model's "
                              "tokenizer to end each output")
        grammar_obj = compile_constraint(rules[0][0], rules[0][1], gen.tokenizer.get_vocab(with_added_tokens=True),
                                         gen.vocab_size, [gen.eos_id])

    from leantrain.synth.sources import TEMPLATES, reference_documents, seed_prompts

    reference, reference_from, cut = reference_documents(list(corpus), gen.dataset) if (dedup or seed_docs) \
        else ([], "", False)
    notes = []
    if cut:
        notes.append(f"the reference corpus ({reference_from}) was cut to its first {len(reference):,} documents")
    if not reference:
        notes.append("no real corpus to dedup against or seed prompts from (pass --corpus PATH)")
    prompt_source = "given"
    if not prompts and seed_docs and reference and kind != "json":  # a JSON value continues no corpus line
        prompts = seed_prompts(kind, reference, count, seed)
        prompt_source = "seed"
    if not prompts:
        prompts = list(TEMPLATES[kind])
        prompt_source = "template"

    candidates, metas, gen_seconds, new_tokens = _generate(gen, kind, prompts, prompt_source, count, grammar_obj,
                                                           rules, max_new_tokens, temperature, top_k, seed,
                                                           batch_size, progress)
    docs, card = _curate(candidates, metas, checks, plan, reference if dedup else [], gen.tokenizer, progress)
    rejected = [d for d in candidates if "rejected" in metas[d.id]]
    accepted = len(docs)
    manifest = {
        "format": FORMAT, "kind": kind, "generator": gen.source, "count": count, "accepted": accepted,
        "prompt_source": prompt_source, "prompts": len(prompts),
        "sampling": {"temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
                     "batch_size": batch_size},
        "constraint": {"kind": rules[0][0], "source": rules[0][1], "applied": grammar_obj is not None}
        if rules else None,
        "checks": [c.describe() for c in checks], "profile": plan.profile, "reference": reference_from or None,
        "eval_paths": [str(p) for p in eval_paths],
        "generation": {"seconds": round(gen_seconds, 3), "new_tokens": new_tokens,
                       "tokens_per_s": round(new_tokens / gen_seconds, 1) if gen_seconds > 0 else None},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    card["notes"] += notes
    card["synthetic"] = _synthetic_section(card, manifest, reference)
    _write(out, docs, rejected, metas, card, manifest)
    return SynthResult(out, len(candidates), accepted, card, manifest, warnings)


def _generate(gen: Any, kind: str, prompts: list[str], prompt_source: str, count: int, grammar: Any,
              rules: list[tuple[str, str]], max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
              batch_size: int, progress: Progress | None) -> tuple[list[Any], dict[str, dict], float, int]:
    """`count` candidates: candidate i continues prompt i mod len(prompts) with seed `seed + i`; candidates of
    one prompt are decoded together, `batch_size` at a time."""
    from leantrain.corpus.readers import Document
    from leantrain.synth.generate import sample_batch

    rule = {"kind": rules[0][0], "sha256": hashlib.sha256(rules[0][1].encode()).hexdigest()[:16]} \
        if grammar is not None else None
    by_prompt: dict[int, list[int]] = {}
    for i in range(count):
        by_prompt.setdefault(i % len(prompts), []).append(i)
    texts: dict[int, tuple[str, dict]] = {}
    t0, new_tokens, done = time.perf_counter(), 0, 0
    if progress:
        progress("generate", 0, count)
    for p_index, members in by_prompt.items():
        prompt = prompts[p_index]
        ids = gen.tokenizer.encode(prompt).ids
        if not ids:
            raise ConfigError(f"the prompt {prompt!r} encodes to no tokens; give prompts with some text")
        rule_fn = stop_rule(kind, prompt, grammar is not None)
        for start in range(0, len(members), batch_size):
            part = members[start:start + batch_size]
            sampled = sample_batch(gen, ids, [seed + i for i in part], max_new_tokens, temperature=temperature,
                                   top_k=top_k or None, grammar=grammar, stop_rule=rule_fn)
            for i, s in zip(part, sampled, strict=True):
                cont = gen.tokenizer.decode(s.ids)
                new_tokens += len(s.ids)
                meta = {"generator": gen.source, "prompt": prompt, "prompt_source": prompt_source, "seed": seed + i,
                        "sampling": {"temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens,
                                     "constraint": rule},
                        "finish": s.finish, "new_tokens": len(s.ids)}
                texts[i] = (document_text(kind, prompt, cont, grammar is not None), meta)
            done += len(part)
            if progress:
                progress("generate", done, count)
    seconds = time.perf_counter() - t0
    candidates, metas = [], {}
    for i in range(count):
        doc_id = f"synth-{i:06d}"
        candidates.append(Document(doc_id, texts[i][0], "synthetic"))
        metas[doc_id] = texts[i][1]
    return candidates, metas, seconds, new_tokens


def _curate(candidates: list[Any], metas: dict[str, dict], checks: list[Any], plan: Any, reference: list[Any],
            tokenizer: Any, progress: Progress | None) -> tuple[list[Any], dict[str, Any]]:
    """Checks, then the curation plan (dedup against `reference` too); the kept documents and the card."""
    from leantrain.corpus.card import build_card
    from leantrain.corpus.dedup import ExactDedup, NearDedup
    from leantrain.corpus.pipeline import Pipeline
    from leantrain.synth.checks import CheckStep
    from leantrain.synth.curate import AgainstReference

    steps: list[Any] = [CheckStep(c) for c in checks]
    for step in plan.steps:
        steps.append(AgainstReference(step, reference) if reference and isinstance(step, ExactDedup | NearDedup)
                     else step)
    pipe = Pipeline(lambda: iter(candidates), steps)
    if progress:
        progress("check and curate", 0, len(candidates))
    kept = list(pipe.run())
    if progress:
        progress("check and curate", len(candidates), len(candidates))
    passed_checks = [f"check:{c.name}" for c in checks]
    for doc in kept:
        metas[doc.id]["checks"] = passed_checks
    kept_ids = {d.id for d in kept}
    for doc in candidates:  # OUT/rejected.jsonl: every candidate that did not make it, and at which stage
        if doc.id in kept_ids:
            continue
        why = next(((s.name, s.failed[doc.id]) for s in steps[:len(checks)] if doc.id in s.failed), None)
        metas[doc.id]["rejected"] = {"stage": "checks", "reason": why[0], "detail": why[1]} if why \
            else {"stage": "curation"}
    doc_tokens = [len(e.ids) for e in tokenizer.encode_batch([d.text for d in kept])] if kept else []
    meta = {"splits": {"train": {"tokens": sum(doc_tokens), "documents": len(kept),
                                 "bytes": sum(len(d.text.encode("utf-8", "surrogatepass")) for d in kept)},
                       "val": {"tokens": 0, "bytes": 0, "documents": 0}},  # not split: `data prepare` splits it
            "vocab_size": tokenizer.get_vocab_size(), "provenance": {"tokenizer": "the generator's tokenizer.json"}}
    card = build_card(pipe, plan, meta, doc_tokens, executor="serial")
    card["summary"]["chars_out"] = sum(len(d.text) for d in kept)
    return kept, card


def _synthetic_section(card: dict[str, Any], manifest: dict[str, Any], reference: list[Any]) -> dict[str, Any]:
    """Synthetic share of the real + synthetic corpus, acceptance per check, a few rejected examples."""
    steps = card["steps"]
    checks = []
    for s in steps:
        if s["name"].startswith("check:"):
            rate = s["docs_out"] / s["docs_in"] if s["docs_in"] else None
            checks.append({"check": s["name"].removeprefix("check:"), "in": s["docs_in"], "passed": s["docs_out"],
                           "acceptance": round(rate, 4) if rate is not None else None})
    rejected = [{"step": r["step"], "reason": r["reason"], "documents": r["documents"],
                 "examples": r["examples"][:REJECTED_EXAMPLES]} for r in card["removals"]]
    real_docs = len(reference)
    real_chars = sum(len(d.text) for d in reference)
    synth_docs, synth_chars = manifest["accepted"], card["summary"].get("chars_out", 0)
    share = {"real_documents": real_docs, "synthetic_documents": synth_docs,
             "documents": round(synth_docs / (real_docs + synth_docs), 4) if real_docs + synth_docs else 0.0,
             "characters": round(synth_chars / (real_chars + synth_chars), 4) if real_chars + synth_chars else 0.0}
    first, last = steps[0], steps[-1]
    checked = [s for s in steps if s["name"].startswith("check:")]
    passed_all = checked[-1]["docs_out"] if checked else first["docs_out"]
    return {"kind": manifest["kind"], "generator": manifest["generator"], "prompt_source": manifest["prompt_source"],
            "sampling": manifest["sampling"], "constraint": manifest["constraint"],
            "generated": first["docs_in"], "passed_checks": passed_all, "accepted": last["docs_out"],
            "acceptance": {"checks": round(passed_all / first["docs_in"], 4) if first["docs_in"] else 0.0,
                           "overall": round(last["docs_out"] / first["docs_in"], 4) if first["docs_in"] else 0.0},
            "checks": checks, "share_with_reference": share if reference else None, "rejected": rejected,
            "generation": manifest["generation"]}


def _write(out: Path, docs: list[Any], rejected: list[Any], metas: dict[str, dict], card: dict[str, Any],
           manifest: dict[str, Any]) -> None:
    """OUT built under a hidden sibling and swapped in whole; the sibling goes on every way out."""
    from leantrain.corpus.card import write_card

    if out.parent.is_dir():
        remove_stale_temps(out.parent, out.name)
    tmp = fresh_sibling(out, "tmp")
    try:
        lines = (json.dumps({"id": d.id, "text": d.text, "meta": metas[d.id]}, ensure_ascii=False) + "\n"
                 for d in docs)
        write_durable(tmp / "synthetic.jsonl", [line.encode("utf-8", "surrogatepass") for line in lines],
                      sync_dir=False)
        lines = (json.dumps({"id": d.id, "text": d.text, "meta": metas[d.id]}, ensure_ascii=False) + "\n"
                 for d in rejected)
        write_durable(tmp / "rejected.jsonl", [line.encode("utf-8", "surrogatepass") for line in lines],
                      sync_dir=False)
        write_card(card, tmp, plot=False)
        write_durable(tmp / MARKER, json.dumps(_finite(manifest), indent=1) + "\n")
        if out.exists() and not any(out.iterdir()):
            out.rmdir()  # an empty folder the user made for us
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
