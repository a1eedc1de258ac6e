"""Writing files so that nothing the user had is lost and no reader sees half a file.

Every file is written to a temporary name in the same folder and renamed into place (`atomic_file`,
`atomic_write_text`); every folder is built under a temporary name and renamed whole (`atomic_dir`:
the one builder, for outputs, checkpoints and cache entries alike, with one rule for a folder
already there: refused, replaced, or, for a cache entry another process finished, kept). Before a
rename, what was written is flushed to the disk (fsync), and the folder after it. Files and folders
get the permissions the user's umask gives (0644 and 0755 under umask 022), not the private
0600/0700 of `tempfile`'s names.
A write that fails because the disk is full, a quota is used up or a file outgrew the file-size
limit is recognised by `disk_full_reason`, so that the message says so.

Temporary folders (`temp_dir`: the one place every atomic folder builder gets them) are named
`.NAME.PID@HOST.XXXX.tmp`: the process that made them and a hash of the machine's name. A process
killed mid-build (SIGKILL, power loss) cannot remove its own; the next `temp_dir` in the same folder
removes every such folder whose process, on this machine, no longer runs. `atomic_file`'s temporary
files are named the same way and removed by the same rule. Those of live processes, of other
machines (a shared file system) and names peftctl did not make are never touched.

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


def cache_root(cache_dir: str | None = None) -> Path:
    """Where peftctl keeps what it builds once and reuses (converted models under `models/`, tokenized
    data under `data/`): `cache_dir` if given, else $PEFTCTL_CACHE, else $XDG_CACHE_HOME/peftctl
    (~/.cache/peftctl)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("PEFTCTL_CACHE"):
        return Path(os.environ["PEFTCTL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftctl"


def _temp_file(folder: Path, name: str) -> tuple[int, str]:
    """mkstemp beside the final file, with the mode a plain open() would give it (mkstemp: 0600),
    named as `temp_dir` names folders (.NAME.PID@HOST.XXXXXXXX.tmp): one policy for leftovers, a
    dead process's file removed with its folders (`clean_stale_temporaries`)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}@{_HOST}.", suffix=".tmp")
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


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL or not os.path.isdir(path):  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it gets the user's umask, is flushed to the
    disk and renamed to `path` (the folder flushed too), as `atomic_dir` does for a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path.parent, path.name)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)  # the writer may have replaced the file with a private one of its own
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.PID@HOST.XXXXXXXX<suffix>, as temp_dir and _temp_file name them (mkdtemp's and mkstemp's
# part: letters, digits, "_").
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


def check_output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = False,
                      hint: str = "choose another path") -> Path:
    """Check, before any work, that `path` can be written as a file (with `atomic_file`): its folder
    can be an output folder (`check_output_dir`), it is not a folder, and it does not exist unless
    `overwrite` (nothing the user had is replaced unasked). An input error naming the path otherwise."""
    path = Path(path)
    check_output_dir(path.parent, f"{what} {path}: the folder")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(f"{what} {path} exists; {hint}")
    return path


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def refuse_nonempty(path: Path, what: str = "output folder", hint: str = "choose another or remove it") -> None:
    """Refuse to write into a folder that holds anything: nothing the user had is overwritten
    (and any path `check_output_dir` refuses)."""
    check_output_dir(path, what)
    if is_nonempty_dir(path):
        raise InputError(f"{what} {path} is not empty; {hint}")


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under `root` (and `root`) to the disk: a folder renamed into
    place after this holds, after a power loss, what it held when it was renamed."""
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                _fsync(p)
        _fsync(folder)


EXISTS = ("refuse", "replace", "keep")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, exists: str = "refuse", done: str | None = None,
               what: str = "output folder") -> Iterator[Path]:
    """Build a folder under a temporary name beside `path`, then rename it into place: the one way
    peftctl writes a folder. A reader never sees a half-built folder under `path`, and a build that
    fails or is killed leaves none (a killed one's temporary is removed by the next `temp_dir` in
    that folder). Before the rename, the folder gets the user's umask (`apply_umask`) and every file
    in it and the folder itself are flushed to the disk (`fsync_tree`); after it, the parent folder.

    `path` is checked before any work (`check_output_dir`; `what` names it in errors). A symbolic
    link to a folder is that folder: the folder is replaced, the link kept. When the build ends and
    `path` is a folder that holds anything, `exists` decides (an empty folder is simply replaced):

    - "refuse" (a user's output): an InputError; a non-empty `path` is refused before the build too.
    - "replace" (a checkpoint of a step written again): the old folder is swapped out and removed.
    - "keep" (a cache entry, whose name stands for its content): when it holds `done` (the file a
      finished build writes last), another process finished the same build first: that folder is
      kept and this one discarded; without it, it is an interrupted build's leftover and replaced.
    """
    if exists not in EXISTS:
        raise ValueError(f"exists must be one of {', '.join(EXISTS)}, got {exists!r}")
    if exists == "keep" and done is None:
        raise ValueError('exists="keep" needs `done`, the file a finished build holds')
    path = Path(path)
    if exists == "refuse":
        refuse_nonempty(path, what)
    else:
        check_output_dir(path, what)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, path.name)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        _rename_into_place(tmp, path, exists, done, what)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, path: Path, exists: str, done: str | None, what: str) -> None:
    try:
        os.replace(tmp, path)  # `path` absent or an empty folder: done
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
            raise
    if exists == "refuse":
        raise InputError(f"{what} {path} is not empty (something was written there meanwhile); "
                         "choose another or remove it")
    if exists == "keep" and (path / str(done)).exists():
        return  # the same content, finished by another process: ours is removed by the caller
    aside = temp_dir(path.parent, path.name, ".old")  # an empty folder, which the rename replaces
    os.replace(path, aside)
    os.replace(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary folder beside what is being written (`temp_dir`), removed when the block ends:
    for intermediate files too large for the system's temporary folder."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(parent, name, suffix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
