"""Writing files so that nothing the user had is lost and no reader sees half a file.

Every file is written to a temporary name in the same folder and renamed into place; folders are
built under a temporary name and renamed whole. Files and folders get the permissions the user's
umask gives (0644 and 0755 under umask 022), not the private 0600/0700 of `tempfile`'s names.
A write that fails because the disk is full, a quota is used up or a file outgrew the file-size
limit is recognised by `disk_full_reason`, so that the message says so.

Temporary folders (`temp_dir`: the one place every atomic folder builder gets them) are named
`.NAME.PID@HOST.XXXX.tmp`: the process that made them and a hash of the machine's name. A process
killed mid-build (SIGKILL, power loss) cannot remove its own; the next `temp_dir` in the same folder
removes every such folder whose process, on this machine, no longer runs. Folders of live processes,
of other machines (a shared file system) and names peftctl did not make are never touched.

Output paths are checked before any work (`check_output_dir`): a path below a regular file or a
dangling symbolic link is an input error naming it; a symbolic link to an empty folder is that folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import resource
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftctl.errors import InputError


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: a race with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(folder: Path, name: str) -> tuple[int, str]:
    """mkstemp beside the final file, with the mode a plain open() would give it (mkstemp: 0600)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file, or a folder and everything in it, the mode the user's umask gives new files and
    folders: some writers make theirs private (safetensors writes 0600 files, by a temporary file of
    its own). Only for what peftctl has just written."""
    path = Path(path)
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def disk_full_reason(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` or an exception behind it says the disk is full (ENOSPC), a
    quota is used up (EDQUOT) or a file outgrew the size limit (EFBIG); else None. Recognises
    OSError, and the "(os error N)" that Rust writers (safetensors, tokenizers) put in their
    messages; torch.save reports "unexpected pos" with the OSError as its context when it writes to
    a Python file object."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else None
        if code == errno.ENOSPC:
            return "no space left on the device"
        if code == errno.EDQUOT:
            return "the disk quota is used up"
        if code == errno.EFBIG:
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY:
                return f"a file outgrew the file-size limit (ulimit -f: {limit} bytes)"
            return "a file outgrew the largest file the file system allows"
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, path.name)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)  # the writer may have replaced the file with a private one of its own
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.PID@HOST.XXXXXXXX<suffix>, as temp_dir names them (mkdtemp's part: letters, digits, "_").
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[0-9a-f]{8})\.[a-z0-9_]+\.[a-z]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temporaries(parent: str | os.PathLike) -> list[str]:
    """Remove the temporary folders (and files) `temp_dir` made in `parent` for processes of this
    machine that no longer run. Returns their names."""
    parent = Path(parent)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry.name)
    return removed


def temp_dir(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """A new hidden folder `.NAME.PID@HOST.XXXX<suffix>` in `parent`, with the mode a plain mkdir
    would give it, to be renamed into place as NAME; the stale ones of dead processes in `parent` are removed first. `suffix` is a dot and
    lowercase letters."""
    parent = Path(parent)
    clean_stale_temporaries(parent)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.{os.getpid()}@{_HOST}.", suffix=suffix))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; a plain mkdir gives the umask's mode
    return tmp


def _link_target(path: Path) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(path)
    return "?"


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check, before any work, that `path` can be an output folder: it is a folder or does not exist,
    no folder above it is a regular file, and neither it nor a folder above it is a symbolic link to
    nothing. An input error naming the path and the culprit otherwise. A link to a folder is fine."""
    path = Path(path)
    for p in (path, *path.absolute().parents):
        if p.is_symlink() and not p.exists():
            which = "" if p == path else f": {p}"
            raise InputError(f"{what} {path}{which} is a symbolic link to {_link_target(p)}, which does not exist; "
                             "create that folder or give another path")
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{what} {path} exists and is not a folder" if p == path else
                                 f"{what} {path}: {p} is a file, not a folder")
            break
    return path


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def refuse_nonempty(path: Path, what: str = "output folder", hint: str = "choose another or remove it") -> None:
    """Refuse to write into a folder that holds anything: nothing the user had is overwritten
    (and any path `check_output_dir` refuses)."""
    check_output_dir(path, what)
    if is_nonempty_dir(path):
        raise InputError(f"{what} {path} is not empty; {hint}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name beside `path`, then rename it into place.

    `path` must not exist or be an empty folder (checked before and again at the rename). A
    symbolic link to an empty folder is that folder: the folder is replaced, the link kept.
    """
    path = Path(path)
    refuse_nonempty(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, path.name)
    try:
        yield tmp
        apply_umask(tmp)
        if path.is_dir():
            path.rmdir()  # empty (checked above); fails loudly if something appeared meanwhile
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
