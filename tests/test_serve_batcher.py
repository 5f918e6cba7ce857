"""DynamicBatcher on its own: how jobs become model batches, and what happens when things go wrong."""
import threading

import numpy as np
import pytest
import torch

from limoe.serve.batcher import DynamicBatcher, QueueFull


class RecordingEncoder:
    """Embeds row i of the input as [value, value] and remembers each batch it saw."""

    def __init__(self):
        self.batches = []
        self.threads = []

    def __call__(self, inputs: torch.Tensor) -> np.ndarray:
        self.batches.append(inputs[:, 0].tolist())
        self.threads.append(torch.get_num_threads())
        return np.repeat(inputs[:, :1].numpy(), 2, axis=1)


def job(*values):
    return torch.tensor([[float(v)] for v in values])


def run_jobs(batcher, jobs):
    """Queue every job before the worker starts, so batching is deterministic."""
    futures = [batcher.submit(kind, inputs) for kind, inputs in jobs]
    batcher.start()
    try:
        return [f.result(timeout=30) for f in futures]
    finally:
        batcher.stop()


def test_queued_jobs_are_coalesced_up_to_the_batch_size_and_each_gets_its_rows():
    encoder = RecordingEncoder()
    batcher = DynamicBatcher({"text": encoder}, max_batch_size=4, max_wait_ms=0)
    results = run_jobs(batcher, [("text", job(i)) for i in range(10)])
    assert encoder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for i, rows in enumerate(results):
        np.testing.assert_array_equal(rows, [[i, i]])
    stats = batcher.stats()
    assert (stats["requests"], stats["items"], stats["batches"], stats["largest_batch"]) == (10, 10, 3, 4)


def test_modalities_never_share_a_batch():
    text, image = RecordingEncoder(), RecordingEncoder()
    batcher = DynamicBatcher({"text": text, "image": image}, max_batch_size=8, max_wait_ms=0)
    run_jobs(batcher, [("text", job(0)), ("text", job(1)), ("image", job(2)), ("text", job(3)), ("image", job(4))])
    assert text.batches == [[0, 1], [3]] and image.batches == [[2], [4]]


def test_a_job_is_never_split_and_a_big_one_runs_alone():
    encoder = RecordingEncoder()
    batcher = DynamicBatcher({"text": encoder}, max_batch_size=4, max_wait_ms=0)
    results = run_jobs(batcher, [("text", job(0, 1, 2)), ("text", job(3, 4)), ("text", job(*range(5, 11)))])
    assert encoder.batches == [[0, 1, 2], [3, 4], list(range(5, 11))]
    assert [len(r) for r in results] == [3, 2, 6]


def test_a_full_queue_refuses_at_once():
    batcher = DynamicBatcher({"text": RecordingEncoder()}, queue_size=2)
    batcher.submit("text", job(0))
    batcher.submit("text", job(1))
    with pytest.raises(QueueFull):
        batcher.submit("text", job(2))
    assert batcher.stats()["rejected"] == 1 and batcher.stats()["queued"] == 2


def test_an_encoder_failure_fails_that_batch_only():
    calls = []

    def flaky(inputs):
        calls.append(inputs[:, 0].tolist())
        if len(calls) == 1:
            raise RuntimeError("boom")
        return inputs.numpy()

    batcher = DynamicBatcher({"text": flaky, "image": flaky}, max_batch_size=4, max_wait_ms=0)
    first, second = batcher.submit("text", job(0)), batcher.submit("image", job(1))
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            first.result(timeout=30)
        np.testing.assert_array_equal(second.result(timeout=30), [[1.0]])
    finally:
        batcher.stop()
    assert batcher.stats()["failed"] == 1


def test_cancelled_jobs_are_skipped():
    encoder = RecordingEncoder()
    batcher = DynamicBatcher({"text": encoder}, max_batch_size=4, max_wait_ms=0)
    cancelled = batcher.submit("text", job(0))
    kept = batcher.submit("text", job(1))
    assert cancelled.cancel()
    batcher.start()
    try:
        np.testing.assert_array_equal(kept.result(timeout=30), [[1, 1]])
    finally:
        batcher.stop()
    assert encoder.batches == [[1]]


def test_stopping_fails_the_jobs_still_queued():
    release = threading.Event()

    def blocked(inputs):
        release.wait(30)
        return inputs.numpy()

    batcher = DynamicBatcher({"text": blocked}, max_batch_size=1, max_wait_ms=0)
    running = batcher.submit("text", job(0))
    batcher.start()
    while batcher.queue.qsize():  # the worker took the first job
        threading.Event().wait(0.01)
    waiting = batcher.submit("text", job(1))
    threading.Timer(0.2, release.set).start()
    batcher.stop()
    np.testing.assert_array_equal(running.result(timeout=30), [[0.0]])  # in-flight work finishes
    with pytest.raises(RuntimeError, match="shutting down"):
        waiting.result(timeout=30)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit("text", job(2))


def test_torch_threads_are_set_in_the_worker_thread():
    encoder = RecordingEncoder()
    main_threads = torch.get_num_threads()
    run_jobs(DynamicBatcher({"text": encoder}, torch_threads=1), [("text", job(0))])
    assert encoder.threads == [1]
    assert torch.get_num_threads() == main_threads


def test_settings_are_validated():
    with pytest.raises(ValueError):
        DynamicBatcher({"text": RecordingEncoder()}, max_batch_size=0)
