"""`leantrain serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.

loader (what to serve) -> engine (the batching thread) -> app (FastAPI routes, limits, metrics, page.html).
Importing this package imports neither torch nor FastAPI; `leantrain.api.serve` is the entry point.
"""
