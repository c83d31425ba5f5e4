"""Compression: turn a trained run into a smaller model (quantization, pruning, distillation).

Each method produces a run-like folder that generate, evaluate, report and export accept, with a
compression.json recording what was done and what it measured, so the cost in quality is never a guess.
"""
