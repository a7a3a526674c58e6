"""File locks for a work folder on a shared file system (several jobs, several nodes).

Linux open-file-description locks (``F_OFD_SETLK``, Linux 3.15+) on small files that name their
holder (host, pid, start time), over the whole file. Like ``flock`` and unlike POSIX ``lockf``, such
a lock belongs to the open file, not the process: closing another descriptor of the file (reading
the holder's name) does not drop it. Unlike ``flock``, it can be *tested* without being taken:
``F_OFD_GETLK`` asks the kernel (on NFS, the lock server, which arbitrates these byte-range locks for
every node) whether a lock conflicts, on a descriptor opened read-only. So ``segplan status`` and
``submit --dry-run`` read a read-only work folder (a colleague's results, a mounted archive), and a
fold job that starts while they look is never refused because of them. (Testing a ``flock`` means
taking it for a moment, which refuses such a job and needs write access on NFS; /proc/locks sees
this node's and this pid namespace's locks only.)

Where the platform has no open-file-description locks (macOS, the BSDs: no ``F_OFD_*`` in
``fcntl``), ``flock`` takes their place: it too belongs to the open file and goes with its process.
There a lock can only be tested by taking it: ``is_held`` takes a shared lock for an instant and
gives it back, so a fold job that starts in that instant is told the fold is busy (it starts on the
next try; a waiting ``exclusive`` merely waits that instant).

The kernel or the lock server drops a lock when its process dies, so a lock file whose lock can be
taken again is stale by construction: it is taken over and the previous holder is reported. Two
uses: ``exclusive`` waits its turn (preprocessing a cache, writing the splits: the second job then
finds the work done), ``hold`` refuses at once (a fold already being trained elsewhere).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import time
from pathlib import Path

_FLOCK = "hhqqi"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (64-bit offsets, Linux)


class Busy(RuntimeError):
    """The lock is held by a live process; the message names it."""


def _whole_file(kind: int) -> bytes:
    """A struct flock for the whole file (start 0, length 0: to its end, however long it grows)."""
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


def _has_ofd() -> bool:
    """Whether this platform has open-file-description locks (Linux 3.15+); asked at each call."""
    return all(hasattr(fcntl, n) for n in ("F_OFD_SETLK", "F_OFD_SETLKW", "F_OFD_GETLK"))


def _take(f, wait: bool) -> None:
    """Lock the whole of the open file ``f`` for writing (waiting, or raising OSError if held)."""
    if _has_ofd():
        fcntl.fcntl(f, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _whole_file(fcntl.F_WRLCK))
    else:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def _release(f) -> None:
    if _has_ofd():
        fcntl.fcntl(f, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_UNLCK))
    else:
        fcntl.flock(f, fcntl.LOCK_UN)


def holder(path: Path) -> str | None:
    """Who holds (or last held) the lock at ``path``, as written into it; None if nobody wrote."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def is_held(path: Path) -> bool:
    """Whether a process holds the lock right now, on a read-only descriptor (no write access
    needed). With open-file-description locks it is tested, never taken, so a process taking the
    lock meanwhile gets it; with the flock fallback it is taken (shared) for an instant."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if _has_ofd():
            found = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _whole_file(fcntl.F_WRLCK))
            return struct.unpack(_FLOCK, found)[0] != fcntl.F_UNLCK
        try:  # flock: tested by taking a shared lock for an instant (see the module's docstring)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, wait: bool, what: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            _take(f, wait)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                raise
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
            _release(f)
    finally:
        f.close()


def exclusive(path: Path, what: str):
    """Hold the lock at ``path`` for a block, waiting while another process holds it."""
    return _locked(path, True, what)


def hold(path: Path, what: str):
    """Hold the lock at ``path`` for a block; raise Busy at once if a live process holds it."""
    return _locked(path, False, what)
