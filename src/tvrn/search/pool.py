"""The model pool of the search server: at most `workers` model calls at a time and `queue` waiting, run in
worker processes that each open the index (`tvrn serve`), or in threads of the server's process.

    pool = ModelPool(service, workers=2, queue=8, index_source=index.source)   # processes
    hits = await pool.run("search", "a red cat", "10", "100")                 # service.search(...) in a worker
"""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .index import SearchIndex
from .service import ExplainService, Limits, ServiceError


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux schedules threads, so only the model thread yields the CPU)."""
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:
            pass


_WORKER: dict = {}  # in a model worker process: its own SearchService


def _exit_with(parent: int) -> None:
    """End this worker when the server that spawned it is gone (killed, or exited without shutting the pool
    down): an orphaned worker would otherwise wait on its task queue forever, holding the model in RAM."""
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _worker_init(source: dict, limits: "Limits", threads: int, nice: int, parent: int) -> None:
    """A model worker process: follow the server's lifetime, lower its priority, set its torch threads, open the
    index itself (the server checked the files' sha256 already)."""
    import torch

    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="tvrn-parent-watch").start()

    if nice and hasattr(os, "nice"):
        os.nice(nice)
    torch.set_num_threads(max(1, threads))
    index = SearchIndex.load(source["path"], verify=False, nprobe=source.get("nprobe"))
    _WORKER["service"] = ExplainService(index, limits)


def _worker_call(method: str, args: tuple):
    return getattr(_WORKER["service"], method)(*args)


def _worker_ping() -> int:
    return os.getpid()


class ModelPool:
    """At most `workers` model calls at a time and `queue` waiting; beyond that ServiceError(503) at once.

    `run(method, *args)` answers `getattr(service, method)(*args)`. Two kinds of workers:
    - processes (`index_source` given, `tvrn serve`'s default): `workers` spawned processes, each opening the
      index itself (`SearchIndex.load(**index_source)`) with `threads` torch threads. Model work then never holds
      the server's GIL, so the event loop answers the page, info, image files and 503s while searches run. A
      worker that dies (killed, out of memory) is replaced, and its request gets 503 with Retry-After;
    - threads (`index_source` None): calls on `service` in this process (tests, notebooks, indexes built in memory).
    Either runs `nice` steps below the server's priority."""

    def __init__(self, service=None, workers: int = 1, queue: int = 8, nice: int = 0,
                 index_source: Optional[dict] = None, limits: Optional["Limits"] = None, threads: int = 1):
        self.service, self.workers, self.nice = service, workers, nice
        self.index_source, self.limits, self.threads = index_source, limits or Limits(), threads
        self.capacity, self.pending = workers + queue, 0
        self.executor = self._make()

    @property
    def processes(self) -> bool:
        return self.index_source is not None

    def _make(self):
        if not self.processes:
            return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tvrn-model",
                                      initializer=_lower_priority, initargs=(self.nice,))
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the server has threads (event loop, torch) that a forked child would inherit broken
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init,
                                   initargs=(self.index_source, self.limits, self.threads, self.nice, os.getpid()))

    async def start(self) -> list[int]:
        """Start every worker process now (each loads the index), not on the first search -> their pids."""
        if not self.processes:
            return []
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*[loop.run_in_executor(self.executor, _worker_ping)
                                           for _ in range(self.workers)]))

    def reserve(self) -> None:
        """Take a place in the pool now, or raise ServiceError(503) when it is full; `run(..., reserved=True)`
        then uses it (an upload reserves before reading its body), `release()` gives it back unused."""
        if self.pending >= self.capacity:
            raise ServiceError(503, f"busy: {self.pending} searches running or waiting; try again shortly",
                               retry_after=1)
        self.pending += 1  # only the event loop thread changes it

    def release(self) -> None:
        self.pending -= 1

    async def run(self, method: str, *args, reserved: bool = False) -> dict:
        from concurrent.futures.process import BrokenProcessPool

        if not reserved:
            self.reserve()
        loop = asyncio.get_running_loop()
        try:
            if not self.processes:
                return await loop.run_in_executor(self.executor, lambda: getattr(self.service, method)(*args))
            executor = self.executor
            try:
                return await loop.run_in_executor(executor, _worker_call, method, args)
            except BrokenProcessPool:
                if executor is self.executor:  # the first request to see it replaces the pool
                    executor.shutdown(wait=False, cancel_futures=True)
                    self.executor = self._make()
                raise ServiceError(503, "a model worker process died; it is being restarted, try again shortly",
                                   retry_after=1) from None
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        """Cancel what waits; worker processes finish their current call and exit (waited for, so none is left
        behind when the server exits)."""
        self.executor.shutdown(wait=self.processes, cancel_futures=True)


__all__ = ["ModelPool"]
