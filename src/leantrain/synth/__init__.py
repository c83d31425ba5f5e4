"""Synthetic data with symbolic checks: `leantrain synth` (docs/synthetic-data.md).

`generate` samples candidates from a run or an HF export (batched, KV cache, optionally constrained),
`sources` finds prompts and the real corpus, `checks` holds the per-kind symbolic checks (and `sandbox` the
isolated runner of the opt-in execution check), `curate` runs dedup against the real corpus, and `run` ties
them to the curation pipeline and writes the corpus and its data card. The entry is `leantrain.api.synth`.
"""
