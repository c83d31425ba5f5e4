"""Executors: run a picklable function over items on several workers, results in input order.

The pipeline cuts the document stream into batches and maps its fused per-document steps over
them with one of these; global steps (dedup) get the same executor for their heavy work. Output
order never depends on which worker finished first, so curation is deterministic whatever the
executor and the number of workers.

- `SerialExecutor`: in this process; the reference, and what tests compare the others against.
- `LocalExecutor`: a process pool on this machine (all cores by default), at most a few batches
  in flight per worker so memory stays bounded on any corpus size.
- `RayExecutor`: Ray tasks, for a corpus that outgrows one machine. Connects to the cluster in
  `address` (or `RAY_ADDRESS`), or starts a local Ray; if Ray is already initialized (a test, a
  notebook) it uses that.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from leantrain.errors import DataError

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray", "serial")


def default_workers() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class SerialExecutor:
    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        for item in items:
            yield fn(item)

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return "serial (1 process)"


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent: it stops the run and cleans up, and no worker prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block and raise it right after.

    `ProcessPoolExecutor.submit` starts workers on demand; a KeyboardInterrupt raised in the middle of a
    start leaves a child the pool does not know of, which then fails to unpickle its queues once the parent
    has cleaned them up, printing a traceback. Python runs signal handlers in the main thread only, so
    swapping the handler there is enough. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(*held[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _start_forkserver_ignoring_ctrl_c() -> None:
    """Start the forkserver with SIGINT ignored, so every worker it forks ignores Ctrl-C from birth.

    The initializer alone leaves a window: a worker forked but not yet initialized has Python's default
    handler back (the forkserver restores its own start-up handler in each child) and prints a
    KeyboardInterrupt traceback when a terminal's Ctrl-C reaches the whole process group. An ignored
    signal survives exec, so the forkserver's start-up handler becomes SIG_IGN. Only the exec itself runs
    with SIGINT ignored; a Ctrl-C in that instant is lost, not half-handled. No-op off the main thread or
    when the forkserver already runs."""
    import multiprocessing.forkserver as forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalExecutor:
    """A process pool; `inflight` batches per worker are queued ahead of the one being consumed."""

    def __init__(self, workers: int | None = None, inflight: int = 3) -> None:
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise DataError(f"--workers {workers} is not allowed; expected an integer >= 1")
        self.inflight = max(1, inflight)
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver/spawn, never fork: the parent may hold threads (tokenizers, Ray) that fork would copy mid-lock.
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            if method == "forkserver":
                _start_forkserver_ignoring_ctrl_c()
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                             initializer=_worker_init)
        return self._pool

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self.workers == 1:
            yield from map(fn, items)
            return
        pool = self._get_pool()
        pending: deque[Future] = deque()
        try:
            for item in items:
                with ctrl_c_deferred():  # a worker start is never cut in half
                    pending.append(pool.submit(fn, item))
                while len(pending) >= self.workers * self.inflight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return f"local process pool ({self.workers} workers)"


def _ray_call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor:
    """Ray tasks with a bounded number in flight; `workers` defaults to the cluster's CPUs."""

    def __init__(self, workers: int | None = None, address: str | None = None, inflight: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise DataError("--executor ray needs Ray; install it with: pip install 'leantrain[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers or default_workers(), **kwargs)
            self._started = True
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.inflight = max(1, inflight)
        self._remote = ray.remote(num_cpus=1)(_ray_call)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        ray = self._ray
        fn_ref = ray.put(fn)
        pending: deque[Any] = deque()
        try:
            for item in items:
                pending.append(self._remote.remote(fn_ref, item))
                while len(pending) >= self.workers * self.inflight:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return f"ray ({self.workers} workers)"


def make_executor(kind: str = "local", workers: int | None = None) -> SerialExecutor | LocalExecutor | RayExecutor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers)
    raise DataError(f"--executor {kind!r} is not allowed; choose one of {', '.join(EXECUTORS)}")
