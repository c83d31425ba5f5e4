"""The server's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Hand-written rather than prometheus_client: a dozen series, one process, no registry to share.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

# seconds; fit a CPU-served small model (ms per token) up to long answers (a minute)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    """Thread-safe: handlers record on the event loop, gauges are read from the engine when scraped."""

    def __init__(self, gauges: dict[str, tuple[str, str, Callable[[], float]]]) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = Histogram()
        self.first_token = Histogram()
        self.gauges = gauges  # name -> (gauge or counter, help, read): values the engine keeps

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, prompt_tokens: int, generated: int, seconds: float, first_token_s: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            self.latency.observe(seconds)
            if first_token_s is not None:
                self.first_token.observe(first_token_s)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP leantrain_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE leantrain_requests_total counter"]
            lines += [f'leantrain_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP leantrain_prompt_tokens_total Prompt tokens of finished generations.",
                      "# TYPE leantrain_prompt_tokens_total counter",
                      f"leantrain_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP leantrain_generation_tokens_total Tokens generated.",
                      "# TYPE leantrain_generation_tokens_total counter",
                      f"leantrain_generation_tokens_total {self.generation_tokens}",
                      "# HELP leantrain_request_latency_seconds Time from request to last token.",
                      "# TYPE leantrain_request_latency_seconds histogram",
                      *self.latency.lines("leantrain_request_latency_seconds"),
                      "# HELP leantrain_time_to_first_token_seconds Time from request to first token.",
                      "# TYPE leantrain_time_to_first_token_seconds histogram",
                      *self.first_token.lines("leantrain_time_to_first_token_seconds")]
        for name, (kind, help_, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {read()}"]
        return "\n".join(lines) + "\n"
