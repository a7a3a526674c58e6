"""Training batches made ahead of the training step, by worker processes (or one thread).

Augmenting a 160x160x80 batch costs about a second of CPU, a GPU step of the paper's network a
fraction of that, so ``training.workers`` processes make batches in parallel, ``LOOKAHEAD`` per
worker ahead of the step. Each batch is a pure function of (seed, fold, epoch, index)
(runner.data.augmented_batch), so the batches, and the training, are the same whatever the
number of workers. Workers are spawned (forking a process that has loaded a deep-learning
framework is unsafe) and build their own sampler over the memory-mapped cases once. A worker that
raises or dies stops training with its error; nothing waits forever.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator

from planner.plan import Plan, supervised_levels
from runner.data import PatchSampler, augmented_batch, build_augmentation, to_keras

LOOKAHEAD = 2  # batches queued per worker

# the sampler and transform of a worker process, built once by _start_worker (a spawned process
# shares nothing with its parent; this dict lives only inside the worker)
_WORKER: dict = {}


def _make_source(folder: str, case_ids: list[str], plan: Plan) -> dict:
    tr = plan.training
    return {"sampler": PatchSampler(Path(folder), case_ids, tr.patch_size, tr.sampling.foreground_oversampling,
                                    plan.slice_axis),
            "augment": build_augmentation(tr.augmentation, tr.patch_size), "plan": plan}


def _start_worker(folder: str, case_ids: list[str], plan: Plan) -> None:
    _WORKER.update(_make_source(folder, case_ids, plan))


def _worker_batch(fold: int, epoch: int, index: int) -> dict:
    return augmented_batch(_WORKER["sampler"], _WORKER["augment"], _WORKER["plan"], fold, epoch, index)


def _ordered(pool: Executor, make: Callable, plan: Plan, fold: int, epoch: int, n: int, depth: int) -> Iterator:
    """The epoch's n batches in order, ``depth`` submitted ahead; a dead worker becomes an error."""
    levels = supervised_levels(plan.network)
    pending = deque(pool.submit(make, fold, epoch, i) for i in range(min(depth, n)))
    for i in range(n):
        try:
            raw = pending.popleft().result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"a batch worker died while making batch {i} of epoch {epoch} (fold {fold}); "
                               "its error, if it printed one, is above; training stops here") from e
        if i + depth < n:
            pending.append(pool.submit(make, fold, epoch, i + depth))
        yield to_keras(raw, len(plan.dataset.labels), levels)


@contextlib.contextmanager
def batch_stream(folder: Path, case_ids: list[str], plan: Plan, fold: int, workers: int) -> Iterator[Callable]:
    """Yields ``epoch_batches(epoch, n)``: an iterator over that epoch's n (x, y) Keras batches.

    ``workers`` 0: one background thread of this process (one thread keeps batchgenerators' global
    random state race-free); >= 1: that many spawned processes."""
    if workers <= 0:
        source = _make_source(str(folder), list(case_ids), plan)

        def make(f, e, i):
            return augmented_batch(source["sampler"], source["augment"], plan, f, e, i)
        pool: Executor = ThreadPoolExecutor(max_workers=1)
        depth = LOOKAHEAD + 1
    else:
        make = _worker_batch
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                   initargs=(str(folder), list(case_ids), plan))
        depth = LOOKAHEAD * workers + 1
    try:
        yield lambda epoch, n: _ordered(pool, make, plan, fold, epoch, n, depth)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
