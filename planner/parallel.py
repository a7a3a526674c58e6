"""Ordered parallel map over cases with a progress bar; one place for the pool logic."""
from __future__ import annotations

import multiprocessing as mp
import sys
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 1, desc: str = "",
                 progress: bool = True) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes, in order, with a tqdm bar.

    Each worker holds one item at a time, so peak memory is about ``workers`` x the largest item.
    Processes are forked unless a deep-learning framework is already loaded (forking its threads is
    unsafe), then spawned.
    """
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="case", dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        method = "spawn" if {"tensorflow", "torch", "jax"} & set(sys.modules) else "fork"
        with mp.get_context(method).Pool(min(workers, len(items)), maxtasksperchild=8) as pool:
            out = []
            for r in pool.imap(fn, items, chunksize=1):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()
