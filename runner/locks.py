"""File locks for a work folder on a shared file system (several jobs, several nodes).

``fcntl.flock`` locks on small files that name their holder (host, pid, start time). flock, not
POSIX ``lockf``: a POSIX lock is dropped when its process closes *any* descriptor of the file (reading
the holder's name would release it); Linux's NFS client carries flock to the server as a whole-file
POSIX lock, so it holds across nodes too. The kernel or the lock server drops a lock when its
process dies, so a lock file whose lock can be taken again is stale by construction: it is taken
over and the previous holder is reported. Two uses: ``exclusive`` waits its turn (preprocessing a
cache, writing the splits: the second job then finds the work done), ``hold`` refuses at once (a
fold already being trained elsewhere).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path


class Busy(RuntimeError):
    """The lock is held by a live process; the message names it."""


def holder(path: Path) -> str | None:
    """Who holds (or last held) the lock at ``path``, as written into it; None if nobody wrote."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def is_held(path: Path) -> bool:
    """Whether another process holds the lock right now (tried without waiting, released at once)."""
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _locked(path: Path, wait: bool, what: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            raise Busy(f"{what} is in use by {holder(path) or 'another process'} (lock {path})") from None
        previous = holder(path)
        if previous and not wait:
            print(f"segplan: {what}: took over a stale lock left by {previous} (that process is gone)")
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def exclusive(path: Path, what: str):
    """Hold the lock at ``path`` for a block, waiting while another process holds it."""
    return _locked(path, True, what)


def hold(path: Path, what: str):
    """Hold the lock at ``path`` for a block; raise Busy at once if a live process holds it."""
    return _locked(path, False, what)
