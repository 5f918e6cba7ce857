"""Dynamic batching: concurrent requests become shared model batches on one worker thread.

Request handlers `submit` a job (one modality, a tensor of prepared inputs)
to a bounded queue and await its future (`asyncio.wrap_future`); the event loop never runs the
model. The worker takes the oldest job, keeps collecting jobs of the same
modality until `max_batch_size` items or `max_wait_ms` have passed, runs one
forward pass over all of them and hands each job its rows. A job larger
than `max_batch_size` runs alone (the encoder splits it into passes).

The worker only waits while more work is on its way: handlers hold
`incoming()` while they tokenize or decode, so a lone request runs at once
instead of paying `max_wait_ms`.

Coalescing cannot change results because routing is dropless at inference.
A full queue raises `QueueFull` at once instead of growing without bound.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("limoe.serve")

Encoder = Callable[[torch.Tensor], np.ndarray]  # [N, ...] prepared inputs -> [N, D] embeddings
BatchObserver = Callable[[str, int, float, list], None]  # (kind, inputs, forward seconds, queue wait per job)
QueueFull = queue.Full
POLL_S = 0.001  # while waiting for company, re-check every millisecond whether any is coming


@dataclass
class Job:
    kind: str
    inputs: torch.Tensor
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.inputs)


class DynamicBatcher:
    def __init__(self, encoders: dict[str, Encoder], max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 queue_size: int = 256, forward_passes: Callable[[], int] | None = None,
                 torch_threads: int | None = None, on_batch: BatchObserver | None = None):
        if max_batch_size < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1 and max_wait_ms >= 0")
        self.encoders = encoders
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._forward_passes = forward_passes
        self.torch_threads = torch_threads
        self.on_batch = on_batch  # called after each successful batch (metrics.ServiceMetrics.observe_batch)
        self._carry: Job | None = None  # a job of the other modality that ended the last batch
        self._incoming = 0  # requests being prepared that will submit soon
        self._incoming_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.counts = {"requests": 0, "items": 0, "batches": 0, "rejected": 0, "failed": 0, "largest_batch": 0}
        self.seconds = {"model": 0.0, "queue_wait": 0.0}  # sums: forward passes; submit -> batch start per job
        self.counts_by_kind = {kind: {"requests": 0, "items": 0, "batches": 0} for kind in encoders}

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="limoe-embed-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, then fail whatever is still queued."""
        self._stopping.set()
        try:
            self.queue.put_nowait(None)  # wakes a worker blocked on an empty queue
        except queue.Full:
            pass  # the worker is busy and will see the flag
        if self._thread is not None:
            self._thread.join(timeout)
        for job in self._drain():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    # -- submitting -------------------------------------------------------------

    def submit(self, kind: str, inputs: torch.Tensor) -> Future:
        """Queue a job and return its future; raises QueueFull when the queue is full."""
        if kind not in self.encoders:
            raise ValueError(f"unknown kind {kind!r}")
        if self._stopping.is_set():
            raise RuntimeError("the server is shutting down")
        job = Job(kind, inputs)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise
        return job.future

    @contextmanager
    def incoming(self):
        """Hold while preparing inputs you are about to submit: the worker waits for them."""
        with self._incoming_lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._incoming_lock:
                self._incoming -= 1

    def stats(self) -> dict:
        out = dict(self.counts)
        out.update({f"{name}_seconds": round(value, 6) for name, value in self.seconds.items()})
        out["queued"] = self.queue.qsize()
        out["by_kind"] = {k: dict(v) for k, v in self.counts_by_kind.items()}
        out["max_batch_size"] = self.max_batch_size
        out["max_wait_ms"] = self.max_wait * 1000
        out["queue_size"] = self.queue.maxsize
        if self._forward_passes is not None:
            out["forward_passes"] = self._forward_passes()
        return out

    # -- the worker -------------------------------------------------------------

    def _drain(self) -> list[Job]:
        jobs = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _next_job(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> list[Job]:
        """Block for a first job, then gather same-modality jobs until full or the wait is over."""
        first = self._next_job(timeout=None)
        if first is None:
            return []
        batch, size = [first], len(first)
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch_size and not self._stopping.is_set():
            job = self._next_job(timeout=0)  # whatever is already queued joins without waiting
            if job is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._incoming == 0:
                    break  # the wait is over, or nobody is on the way
                job = self._next_job(timeout=min(remaining, POLL_S))
                if job is None:
                    continue
            if job.kind != first.kind or size + len(job) > self.max_batch_size:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            size += len(job)
        return batch

    def _work(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # set from the thread that runs the forward passes
        while not self._stopping.is_set():
            batch = [job for job in self._collect() if job.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        start = time.perf_counter()
        try:
            inputs = batch[0].inputs if len(batch) == 1 else torch.cat([job.inputs for job in batch])
            embeddings = self.encoders[kind](inputs)
        except Exception as e:  # a model failure is the server's, not the client's: each job gets a 500
            log.exception("embedding a %s batch of %d failed", kind, sum(len(j) for j in batch))
            self.counts["failed"] += len(batch)  # before answering, as below
            for job in batch:
                job.future.set_exception(e)
            return
        # Count before answering, so a client that reads /health after its reply sees its batch.
        n = len(embeddings)
        model_seconds, waits = time.perf_counter() - start, [start - job.submitted for job in batch]
        self.seconds["model"] += model_seconds
        self.seconds["queue_wait"] += sum(waits)
        self.counts["requests"] += len(batch)
        self.counts["items"] += n
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], n)
        by_kind = self.counts_by_kind[kind]
        by_kind["requests"] += len(batch)
        by_kind["items"] += n
        by_kind["batches"] += 1
        if self.on_batch is not None:
            try:
                self.on_batch(kind, n, model_seconds, waits)
            except Exception:  # a metrics bug must not leave the jobs unanswered
                log.exception("the batch observer failed")
        row = 0
        for job in batch:
            job.future.set_result(embeddings[row:row + len(job)])
            row += len(job)
