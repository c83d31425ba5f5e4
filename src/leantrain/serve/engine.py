"""Continuous batching: one thread decodes every active request together, one token per step.

Requests wait in a queue; between decode steps the engine admits as many as there are free slots. A new
request's prompt is run through the model's own cached forward (`Transformer(ids, cache=...)`, the very
call `leantrain generate` makes; prompts admitted together that have one length go as one batch), and its
keys and values are copied into the request's slot of one padded cache per layer, [slots, kv_heads,
seq_len, head_dim]. A decode step then feeds the last token of
every active request at once: the projections, feed-forwards and output head run as one batch, each token
is rotated by its own position, written at that position of its slot, and attends over its slot's first
`position + 1` keys (a boolean mask hides the rest of the padding). A request that finishes or is cancelled
(its client went away) leaves before the next step and the slots behind it move up, so the active
requests always hold slots 0..n-1 and attention reads one slice of the cache.

At temperature 0 the tokens equal `leantrain generate`'s: same prompt pass, same per-token arithmetic, a
batch of rows instead of one. Sampling (temperature, top-k, then top-p) draws from a per-request
generator seeded like `generate`'s, so a seeded request with top_p 1 also draws the same tokens.

A request may carry an output constraint (`model.constrained.Constraint`, one matcher per sequence): before
sampling, its row's logits get -inf for every token that would break the rule, its sampled token is fed to
its matcher, and the request ends (finish reason "stop") once the matcher takes the end-of-text token. Rows
without one are untouched, so constrained and free requests share a batch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from leantrain.model.transformer import apply_rope

if TYPE_CHECKING:
    from leantrain.model.constrained import Constraint

# finish reasons, as OpenAI names them; "cancelled" (the client left) and "error" never reach a client
LENGTH, STOP, CANCELLED, ERROR = "length", "stop", "cancelled", "error"


class QueueFull(Exception):
    """Every slot is busy and the queue is full: the server answers 429."""


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings of one request (the HTTP layer checks ranges before building one)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: whole vocabulary
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()


# token id (None when the request ended without a new token), finish reason (None while it goes on)
Sink = Callable[[int | None, str | None], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. `cancel()` is safe from any thread; the engine drops it next step."""

    prompt: list[int]
    sampling: Sampling
    sink: Sink
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish: str | None = None
    position: int = 0  # where the next fed token goes (= tokens in the cache)
    gen: torch.Generator | None = None
    constraint: Constraint | None = None  # this sequence's own matcher, when the request has a rule

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Owns the model: `submit` from any thread, `start` once, `close` to drain and stop."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 16, max_queue: int = 64) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.max_batch, self.max_queue = max_batch, max_queue
        self._pending: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._k: list[Tensor] = []
        self._v: list[Tensor] = []
        self.steps = 0          # decode steps run
        self.batched_tokens = 0  # tokens those steps produced (mean batch = batched_tokens / steps)
        self.errors = 0
        self.cancelled = 0       # requests dropped because their client left (or timed out)
        self.last_error: str | None = None

    # ---- the public side -------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, prompt: list[int], sampling: Sampling, sink: Sink, constraint: Constraint | None = None
               ) -> Sequence:
        """Queue a request; raises QueueFull when max_batch are running and max_queue wait already.
        `constraint` (a fresh matcher, not shared with another sequence) keeps its output inside a rule."""
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if len(prompt) + sampling.max_tokens > self.cfg.seq_len:
            raise ValueError(f"{len(prompt)} prompt + {sampling.max_tokens} new tokens exceed seq_len "
                             f"{self.cfg.seq_len}")
        seq = Sequence(list(prompt), sampling, sink, constraint=constraint)
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(self._active) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} waiting")
            self._pending.append(seq)
            self._cond.notify()
        return seq

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leantrain-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish what is running and queued (new submits are refused), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending and not self._active:
                    return
                admit = []
                while self._pending and len(self._active) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
            try:
                for seq in admit:
                    if seq.cancelled:
                        self._end(seq, CANCELLED)
                self._prefill([seq for seq in admit if not seq.cancelled])
                self._compact()
                if self._active:
                    self._decode()
                    self._compact()
            except Exception as e:  # noqa: BLE001 - a bug must fail its requests, not hang every client
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                for seq in [*admit, *self._active]:
                    if seq.finish is None:
                        self._end(seq, ERROR)
                self._active = []

    def _end(self, seq: Sequence, reason: str) -> None:
        self.cancelled += reason == CANCELLED
        seq.finish = reason
        seq.sink(None, reason)

    def _emit(self, seq: Sequence, token: int) -> None:
        """Record a sampled token and tell the client; decides whether the request is done."""
        seq.generated.append(token)
        reason = None
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if token in seq.sampling.stop_ids or (seq.constraint is not None and seq.constraint.terminated):
            reason = STOP
        elif len(seq.generated) >= seq.sampling.max_tokens:
            reason = LENGTH
        seq.finish = reason
        seq.sink(token, reason)

    def _slots(self, dtype: torch.dtype, device: torch.device, kv_heads: int, head_dim: int) -> None:
        if self._k and self._k[0].dtype == dtype:
            return
        shape = (self.max_batch, kv_heads, self.cfg.seq_len, head_dim)
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.cfg.n_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.cfg.n_layers)]

    def _prefill(self, admitted: list[Sequence]) -> None:
        """Prompts through the model's cached forward, those of one length together as one batch (a burst of
        requests costs one forward, not one each), then each prompt's keys/values into the next free slot."""
        device = next(self.model.parameters()).device
        for seq in admitted:
            seq.gen = torch.Generator(device=device)
            if seq.sampling.seed is None:
                seq.gen.seed()
            else:
                seq.gen.manual_seed(seq.sampling.seed)
        by_length: dict[int, list[Sequence]] = {}
        for seq in admitted:
            by_length.setdefault(len(seq.prompt), []).append(seq)
        for n, group in by_length.items():
            ids = torch.tensor([seq.prompt for seq in group], dtype=torch.long, device=device)
            cache = self.model.new_cache(n)  # the prompt's positions only: the slots hold the rest
            with torch.compiler.set_stance("force_eager"):
                logits = self.model(ids, cache=cache)[:, -1].float()
            first = cache.layers[0].k
            self._slots(first.dtype, first.device, first.size(1), first.size(3))
            slot = len(self._active)
            for layer, k, v in zip(cache.layers, self._k, self._v, strict=True):
                k[slot:slot + len(group), :, :n] = layer.k[:, :, :n]
                v[slot:slot + len(group), :, :n] = layer.v[:, :, :n]
            for seq in group:
                seq.position = n
            self._active.extend(group)
            for seq, token in zip(group, self._sample(logits, group), strict=True):
                self._emit(seq, token)

    def _compact(self) -> None:
        """Drop finished and cancelled requests; move the rest up so they hold slots 0..n-1 in order."""
        keep = []
        for i, seq in enumerate(self._active):
            if seq.finish is None and seq.cancelled:
                self._end(seq, CANCELLED)
            if seq.finish is not None:
                continue
            j = len(keep)
            if j != i:
                for k, v in zip(self._k, self._v, strict=True):
                    k[j, :, :seq.position] = k[i, :, :seq.position]
                    v[j, :, :seq.position] = v[i, :, :seq.position]
            keep.append(seq)
        self._active = keep

    def _decode(self) -> None:
        """One token for every active request, in one batched forward (see the module docstring)."""
        model, cfg, active = self.model, self.cfg, self._active
        n = len(active)
        device = self._k[0].device
        tokens = torch.tensor([s.generated[-1] for s in active], dtype=torch.long, device=device)
        pos = torch.tensor([s.position for s in active], dtype=torch.long, device=device)
        length = max(s.position for s in active) + 1
        keys = torch.arange(length, device=device)
        visible = keys[None, :] <= pos[:, None]
        window = cfg.sliding_window if 0 < cfg.sliding_window < cfg.seq_len else 0
        if window:
            visible &= keys[None, :] > pos[:, None] - window
        mask = visible[:, None, None, :]  # [n, 1 head, 1 query, length]
        rows = torch.arange(n, device=device)
        x = model.tok_embeddings(tokens[:, None])  # [n, 1, dim]
        if cfg.arch == "gpt2":
            x = x + model.pos_embeddings.weight[pos][:, None]
        rope = None if model.rope is None else model.rope[:, pos]  # [2, n, head_dim / 2]: one position per row
        for layer, k_cache, v_cache in zip(model.layers, self._k, self._v, strict=True):
            attn = layer.attention
            h = layer.attention_norm(x)
            # rows are laid out as one sequence of n positions [1, n, heads, head_dim] for apply_rope
            q = attn.wq(h).view(1, n, attn.n_heads, attn.head_dim)
            k = attn.wk(h).view(1, n, attn.n_kv_heads, attn.head_dim)
            if attn.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            v = attn.wv(h).view(n, attn.n_kv_heads, attn.head_dim)
            k_cache[rows, :, pos] = k[0].to(k_cache.dtype)
            v_cache[rows, :, pos] = v.to(v_cache.dtype)
            y = F.scaled_dot_product_attention(q[0].unsqueeze(2), k_cache[:n, :, :length], v_cache[:n, :, :length],
                                               attn_mask=mask, enable_gqa=attn.n_kv_heads != attn.n_heads)
            x = x + attn.wo(y.reshape(n, 1, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        logits = model.output(model.norm(x))[:, 0].float()
        self.steps += 1
        self.batched_tokens += n
        for seq in active:
            seq.position += 1
        for seq, token in zip(active, self._sample(logits, active), strict=True):
            self._emit(seq, token)

    @staticmethod
    def _sample(logits: Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy rows in one argmax; sampled rows as `generate` samples (temperature, top-k), plus top-p.
        Constrained rows are masked first, in place, each by its own matcher."""
        for i, seq in enumerate(seqs):
            if seq.constraint is not None:
                seq.constraint.mask_(logits[i])
        out = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            s = seq.sampling
            if s.temperature == 0:
                continue
            row = logits[i] / s.temperature
            if s.top_k and s.top_k < row.numel():
                kth = torch.topk(row, s.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = row.softmax(-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest set of tokens whose mass reaches top_p (the first token always stays)
                drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
                probs = probs.index_fill(0, order[drop], 0.0)
            out[i] = int(torch.multinomial(probs, 1, generator=seq.gen)[0])
        return out
