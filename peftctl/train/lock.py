"""One training process per run folder: an OS file lock, and a little disk space held in reserve.

`RUN_DIR/.peftctl-train.lock` is locked with `flock` for as long as a `peftctl train` uses the
folder; the kernel releases the lock when the process ends, however it ends (SIGKILL included), so
a lock is never stale. The folder itself is locked too (flock on its descriptor), so deleting the
lock file does not let a second process in. The file holds the holder's pid, for the message that refuses a second
process. While the lock is held the file also keeps `RESERVE_BYTES` of disk space: when the disk
fills up, the run gives them back just before writing its summary.json, so that the summary
saying what happened can still be written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from peftctl.errors import InputError

LOCK_NAME = ".peftctl-train.lock"
RESERVE_BYTES = 64 * 1024


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._head = b""

    @staticmethod
    def holder(run_dir: Path) -> str | None:
        """The pid of the process holding `run_dir`'s lock, or None when none does (nothing written)."""
        with contextlib.suppress(OSError):
            dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return _pid_in(Path(run_dir) / LOCK_NAME)
            finally:
                os.close(dir_fd)
        try:
            fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            return _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
        finally:
            os.close(fd)  # also releases the lock if this probe took it
        return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock the folder (which must exist), or raise an InputError naming the holder's pid."""
        if self._fd is not None:
            return
        dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(dir_fd)
            dir_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"output.dir {self.run_dir} is in use by another peftctl train (pid "
                                 f"{_pid_in(self.path)}); wait for it to end, or stop it, before starting "
                                 "another run there") from None
        self._dir_fd = dir_fd
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a file system without locks (some network mounts): run unlocked
                self._close_dir()
                return
            pid = _holder(fd)
            os.close(fd)
            self._close_dir()
            raise InputError(f"output.dir {self.run_dir} is in use by another peftctl train (pid {pid}); "
                             "wait for it to end, or stop it, before starting another run there") from None
        self._fd, self._head = fd, f"{os.getpid()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._head, 0)
        try:  # real blocks (written, not a sparse hole), so that giving them back frees space
            os.pwrite(fd, b"\n" * RESERVE_BYTES, len(self._head))
        except OSError:
            os.ftruncate(fd, len(self._head))  # the disk is already full: no reserve

    def free_reserve(self) -> None:
        """Give the reserved space back to the file system (the disk is full)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, len(self._head))

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the lock
        self._fd = None
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _holder(fd: int) -> str:
    """The pid the holder wrote (it may be a moment behind taking the lock)."""
    for _ in range(20):
        head = os.pread(fd, 32, 0).split(b"\n", 1)[0].strip()
        if head.isdigit():
            return head.decode()
        time.sleep(0.05)
    return "unknown"


def _pid_in(path: Path) -> str:
    """The pid a holder wrote in its lock file ("unknown" when the file is gone or not yet written)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "unknown"
    try:
        return _holder(fd)
    finally:
        os.close(fd)
