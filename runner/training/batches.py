"""Training batches made ahead of the training step, by worker processes (or one thread).

Augmenting a 160x160x80 batch costs about a second of CPU, a GPU step of the paper's network a
fraction of that, so ``training.workers`` processes make batches in parallel, ``LOOKAHEAD`` per
worker ahead of the step. Each batch is a pure function of (seed, fold, epoch, index)
(segplan.runner.training.data.augmented_batch), so the batches, and the training, are the same whatever the
number of workers. Workers are spawned (forking a process that has loaded a deep-learning
framework is unsafe) and build their own sampler over the memory-mapped cases once. A worker that
raises or dies stops training with its error; nothing waits forever.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator

from segplan.planner.labels import label_model
from segplan.planner.plan import Plan, supervised_levels
from segplan.runner.training.data import (
    PatchSampler, augmented_batch, build_augmentation, outside_class, to_keras)

LOOKAHEAD = 2  # batches queued per worker

# the sampler and transform of a worker process, built once by _start_worker (a spawned process
# shares nothing with its parent; this dict lives only inside the worker)
_WORKER: dict = {}


def _make_source(folder: str, case_ids: list[str], plan: Plan, previous: str | None = None) -> dict:
    tr = plan.training
    outside = outside_class(plan)
    return {"sampler": PatchSampler(Path(folder), case_ids, tr.patch_size, tr.sampling.foreground_oversampling,
                                    previous=Path(previous) if previous is not None else None, outside=outside,
                                    slice_axis=plan.slice_axis),
            "augment": build_augmentation(tr.augmentation, tr.patch_size, outside), "plan": plan}


def _start_worker(folder: str, case_ids: list[str], plan: Plan, previous: str | None = None) -> None:
    _WORKER.update(_make_source(folder, case_ids, plan, previous))


def _worker_batch(fold: int, epoch: int, index: int) -> dict:
    return augmented_batch(_WORKER["sampler"], _WORKER["augment"], _WORKER["plan"], fold, epoch, index)


def _keras_batch(plan: Plan, raw: dict) -> tuple:
    """A made batch in the Keras layout (one-hot targets, one per supervised level)."""
    return to_keras(raw, label_model(plan), supervised_levels(plan.network))


def _ordered(pool: Executor, make: Callable, finish: Callable, fold: int, epoch: int, n: int, depth: int,
             pending: dict) -> Iterator:
    """The epoch's n batches in order, ``depth`` submitted ahead, running on into the next epoch's
    first batches (so they are made during validation and checkpoints), each passed through
    ``finish`` as it is taken; ``pending`` maps (epoch, index) to submitted batches across calls.
    A dead worker becomes an error."""
    def submit(position: int) -> None:  # batches in one sequence over this epoch and the next
        key = divmod(position, n)
        if key[0] <= epoch + 1 and key not in pending:
            pending[key] = pool.submit(make, fold, *key)
    for stale in [key for key in pending if key[0] != epoch]:  # a different epoch than prefetched
        pending.pop(stale).cancel()
    start = epoch * n
    for p in range(start, start + depth):
        submit(p)
    for i in range(n):
        try:
            raw = pending.pop((epoch, i)).result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"a batch worker died while making batch {i} of epoch {epoch} (fold {fold}); "
                               "its error, if it printed one, is above; training stops here") from e
        submit(start + i + depth)
        yield finish(raw)


@contextlib.contextmanager
def batch_stream(folder: Path, case_ids: list[str], plan: Plan, fold: int, workers: int,
                 previous: Path | None = None) -> Iterator[Callable]:
    """Yields ``epoch_batches(epoch, n)``: an iterator over that epoch's n (x, y) Keras batches.

    ``workers`` 0: one background thread of this process (one thread keeps batchgenerators' global
    random state race-free), which also one-hot encodes the targets, off the training step's
    thread; >= 1: that many spawned processes, which send the compact labels and leave the one-hot
    to this process. ``previous``: a cascade's previous-stage maps (runner/cascade.py)."""
    previous = str(previous) if previous is not None else None
    if workers <= 0:
        source = _make_source(str(folder), list(case_ids), plan, previous)

        def make(f, e, i):
            return _keras_batch(plan, augmented_batch(source["sampler"], source["augment"], plan, f, e, i))
        finish: Callable = lambda batch: batch  # noqa: E731 (made whole in the thread)
        pool: Executor = ThreadPoolExecutor(max_workers=1)
        depth = LOOKAHEAD + 1
    else:
        make, finish = _worker_batch, lambda raw: _keras_batch(plan, raw)
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                   initargs=(str(folder), list(case_ids), plan, previous))
        depth = LOOKAHEAD * workers + 1
    try:
        pending: dict = {}
        yield lambda epoch, n: _ordered(pool, make, finish, fold, epoch, n, depth, pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
