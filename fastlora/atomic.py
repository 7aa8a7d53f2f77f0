"""Atomic writes of files and folders: after an exception, a full disk or a kill at any moment, readers see
either the complete previous version or the complete new one.

A file is written beside its target, fsynced and renamed over it. A folder is built beside its target (entries
of the old folder that the new one does not write are carried over as hard links), fsynced, and swapped in with
one ``renameat2(RENAME_EXCHANGE)`` on Linux. Where that call is missing (other systems, some network file
systems) the old folder is renamed aside and the new one renamed in; a kill between those two renames leaves
the target missing with both versions beside it, and :func:`recover_dir` (called by ``load_adapter``) renames
the new one in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

_NEW, _OLD = "new", "old"
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (creations, renames) durable."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: folders cannot be opened, renames are durable on return
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Make the contents of file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` atomically and durably,
    on error it is removed and ``path`` is untouched."""
    path = Path(path)
    temp = path.with_name(f".{_digest(path.name)}.{_token()}.tmp")
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically and durably."""
    with atomic_file(path) as temp, open(temp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep_existing: bool = True) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` to fill; on success its files are fsynced and it replaces folder
    ``path`` as a unit.

    With ``keep_existing``, entries of the old folder that the new one lacks (recursively) are kept (hard
    links, or copies where links fail). On error the new folder is removed and ``path`` is untouched.
    """
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    token = _token()
    new = _aside(target, _NEW, token)
    try:
        os.mkdir(new)
        yield new
        if target.is_dir():
            os.chmod(new, stat.S_IMODE(target.stat().st_mode))
            if keep_existing:
                _carry_over(target, new)
        _fsync_tree(new)
        _swap(new, target, token)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def recover_dir(path: str | Path) -> None:
    """Finish a folder swap that a kill interrupted between its two renames (``path`` or a parent missing),
    and remove what interrupted swaps of ``path`` left beside it in processes that no longer run."""
    target = Path(os.path.realpath(path))
    missing = []
    for folder in (target, *target.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):  # outermost first: the others' asides are inside it
        _restore(folder)
    _remove_stale(target)


def _restore(target: Path) -> None:
    """Put back a missing folder from beside it: the new version if the swap got that far, else the old one."""
    for token in _asides(target, _OLD):
        new, old = _aside(target, _NEW, token), _aside(target, _OLD, token)
        # The old folder goes aside only once the new one is complete, so a new folder beside it is whole.
        with contextlib.suppress(OSError):  # another process got there first
            os.rename(new if new.is_dir() else old, target)
            fsync_dir(target.parent)
        return


def _remove_stale(target: Path) -> None:
    if not target.parent.is_dir():
        return
    for kind in (_NEW, _OLD):
        for token in _asides(target, kind):
            pid = int(token.split("-")[0])
            if target.exists() and not _alive(pid) and (kind == _OLD or not _aside(target, _OLD, token).exists()):
                shutil.rmtree(_aside(target, kind, token), ignore_errors=True)


def _swap(new: Path, target: Path, token: str) -> None:
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_dir(target.parent)
        return
    try:
        _exchange(new, target)
        old = new  # the exchange put the old folder where the new one was
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
        old = _aside(target, _OLD, token)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:  # e.g. KeyboardInterrupt just after the rename: only a missing target goes back
            if os.path.lexists(target):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, target)  # should this fail too, recover_dir puts the old folder back
            raise
    try:
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    function = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # Windows
        return None


def _carry_over(old: Path, new: Path) -> None:
    for entry in os.scandir(old):
        source, destination = Path(entry.path), new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(destination):
                os.mkdir(destination)
                os.chmod(destination, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                _carry_over(source, destination)
            elif destination.is_dir() and not destination.is_symlink():
                _carry_over(source, destination)
        elif not os.path.lexists(destination):
            if entry.is_symlink():
                os.symlink(os.readlink(source), destination)
            elif entry.is_file(follow_symlinks=False):
                try:
                    os.link(source, destination, follow_symlinks=False)
                except OSError as error:
                    if error.errno not in _NO_LINKS:
                        raise
                    shutil.copy2(source, destination)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _aside(target: Path, kind: str, token: str) -> Path:
    """A sibling of ``target`` named for it (a digest, so any name fits) with a fixed-length suffix."""
    return target.parent / f".fastlora-{_digest(target.name)}-{kind}-{token}"


def _asides(target: Path, kind: str) -> list[str]:
    prefix = f".fastlora-{_digest(target.name)}-{kind}-"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [name[len(prefix):] for name in names if name.startswith(prefix)]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True
