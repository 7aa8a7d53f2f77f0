"""Atomic writes of a file, or of several files of a folder at once: readers see the old version or the new one.

After an exception, a full disk or a kill at any moment, the files hold either the complete previous version or
the complete new one. A single file (:func:`atomic_file`) is written beside its target, fsynced and renamed over it.

Files of a folder and its subfolders (:func:`transaction`, behind :func:`fastlora.save_adapter`) change in place, as
a database commits, so that the folder itself (a mount point, a process's working directory) stays, with its owner
and mode:

1. each new file is written to a hidden temporary name beside its target (``.fastlora-<pid>-<hex>.tmp``), fsynced;
2. a manifest listing the renames (temporary name -> target) and the files to delete is written and fsynced, then
   renamed to ``.fastlora-manifest`` in the folder: that rename is the commit point;
3. the renames and deletions are applied, and the manifest is removed.

Whoever opens the folder next through this module (:func:`reading` or :func:`transaction`: every fastlora load and
save, also of a subfolder) first finishes a commit that a kill interrupted there (a temporary file that is gone was
renamed already), then removes the temporary files of saves that never committed once their process is gone. A
save holds an exclusive ``flock`` on the folder's ``.fastlora-lock`` file and a load a shared one, so two saves of
a folder run one after the other and a load never sees half a commit (where the file system has no locks, they run
unlocked).

A reader that knows nothing of the manifest (peft) sees the previous files until the commit point and the new ones
once the commit is applied; in between (a few renames; after a kill there, until the next fastlora load or save of
the folder) it may see some files of each version, e.g. new weights beside the previous config.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, saves are not serialised
    fcntl = None

MANIFEST = ".fastlora-manifest"
LOCK = ".fastlora-lock"
_PREFIX = ".fastlora-"
_TEMP = re.compile(r"\.fastlora-(\d+)-[0-9a-f]{8}\.tmp")
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EINVAL, errno.ENOSYS}
_WRITING: set[Path] = set()  # the temporary files of this process's transactions in progress
_HELD: set[int] = set()  # this process's open lock files


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say): close the copies of the parent's lock files, which would
    otherwise hold its locks until the child exits."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


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


class Transaction:
    """New contents for files of a folder (``name`` or ``subfolder/name``) and files to delete there, made current
    together by :meth:`commit`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.renames: list[tuple[Path, Path]] = []  # (temporary file, target)
        self.deletes: list[Path] = []
        self.temps: list[Path] = []  # every temporary file written, the manifest's too: an abort removes them

    def write(self, name: str) -> Path:
        """A temporary path to write the new ``folder/name`` to (a missing subfolder is created)."""
        target = _inside(self.folder, name)
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(f"{target} is a folder")
        target.parent.mkdir(exist_ok=True)
        temp = self._temp(target.parent)
        self.renames.append((temp, target))
        return temp

    def delete(self, name: str) -> None:
        """Delete file ``folder/name`` in the commit."""
        target = _inside(self.folder, name)
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(f"{target} is a folder")
        self.deletes.append(target)

    def commit(self) -> None:
        """Make the written files durable, commit (the manifest's rename) and apply."""
        for temp, target in self.renames:
            if target.exists():
                os.chmod(temp, stat.S_IMODE(target.stat().st_mode))  # the file keeps its mode, as when overwritten
            fsync_file(temp)
        for folder in dict.fromkeys([self.folder, *(temp.parent for temp, _ in self.renames)]):
            fsync_dir(folder)
        manifest = {"renames": [[self._relative(t), self._relative(f)] for t, f in self.renames],
                    "deletes": [self._relative(path) for path in self.deletes]}
        temp = self._temp(self.folder)
        temp.write_text(json.dumps(manifest, indent=1) + "\n")
        fsync_file(temp)
        os.replace(temp, self.folder / MANIFEST)  # the commit point
        fsync_dir(self.folder)
        _apply(self.folder, self.renames, self.deletes)

    def abort(self) -> None:
        """Remove what was written, unless the commit point has passed (then the next load or save finishes it)."""
        if (self.folder / MANIFEST).exists():  # ours: recover() removed any other before this transaction began
            return
        for temp in self.temps:
            with contextlib.suppress(OSError):
                temp.unlink()

    def _temp(self, folder: Path) -> Path:
        temp = folder / f"{_PREFIX}{_token()}.tmp"
        self.temps.append(temp)
        _WRITING.add(temp)
        return temp

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()


@contextlib.contextmanager
def transaction(folder: str | Path) -> Iterator[Transaction]:
    """A :class:`Transaction` on ``folder`` (created if missing) that commits when the block ends without error;
    on error what it wrote is removed. Other saves of the folder wait until it is done."""
    folder = Path(os.path.realpath(folder))
    if not folder.is_dir():
        if os.path.lexists(folder):
            raise NotADirectoryError(f"{folder} exists and is not a folder")
        folder.mkdir(parents=True)
        fsync_dir(folder.parent)
    with _opened(folder, exclusive=True):
        changes = Transaction(folder)
        try:
            yield changes
            changes.commit()
        except BaseException:
            changes.abort()
            raise
        finally:
            _WRITING.difference_update(changes.temps)


@contextlib.contextmanager
def reading(folder: str | Path) -> Iterator[None]:
    """Hold ``folder`` steady for the block: an interrupted commit there is finished first (see :func:`recover`),
    and no save of the folder starts until the block ends."""
    with _opened(Path(os.path.realpath(folder)), exclusive=False):
        yield


def recover(folder: str | Path) -> None:
    """Finish a commit that a kill interrupted in ``folder``, or in its parent folder (whose commits write into
    its subfolders), and remove the temporary files that saves of ``folder`` which never committed left there and
    in its subfolders, once their process is gone."""
    folder = Path(os.path.realpath(folder))
    for where in dict.fromkeys([folder.parent, folder]):
        try:
            text = (where / MANIFEST).read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
        renames, deletes = _parse(where, text)
        _apply(where, renames, deletes)
    with contextlib.suppress(OSError):  # nothing to clean in a folder that cannot be listed
        subfolders = [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        for where in (folder, *subfolders):
            for entry in os.scandir(where):
                match = _TEMP.fullmatch(entry.name)
                if match and _abandoned(Path(entry.path), int(match[1])):
                    with contextlib.suppress(OSError):  # cleaning up is best effort (a read-only folder)
                        os.unlink(entry.path)


def _apply(folder: Path, renames: list[tuple[Path, Path]], deletes: list[Path]) -> None:
    """Carry out a committed manifest of ``folder`` and remove it; running it again, or in two processes at once,
    does no harm: a temporary file that is gone was renamed already."""
    for temp, target in renames:
        with contextlib.suppress(FileNotFoundError):
            os.replace(temp, target)
    for path in deletes:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for parent in dict.fromkeys(path.parent for path in [*(target for _, target in renames), *deletes]):
        if parent.is_dir():
            fsync_dir(parent)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / MANIFEST)
    fsync_dir(folder)


def _parse(folder: Path, text: str) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """A manifest's renames and deletions, each inside ``folder`` (a manifest is read from disk: it may come from
    anywhere, so what it names is checked)."""
    try:
        manifest = json.loads(text)
        renames = [(_inside(folder, temp, temporary=True), _inside(folder, target)) for temp, target in
                   manifest["renames"]]
        deletes = [_inside(folder, path) for path in manifest["deletes"]]
        if any(temp.parent != target.parent for temp, target in renames):
            raise ValueError("a temporary file is not beside its target")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder / MANIFEST} is not a manifest of a fastlora save: {error}") from None
    return renames, deletes


def _inside(folder: Path, name: str, temporary: bool = False) -> Path:
    """``folder/name`` for ``name`` a file name or ``subfolder/file name``, the subfolder not a link (so that the path
    stays inside ``folder``); a temporary name of this module's if ``temporary``, else a name not of its files."""
    parts = name.split("/") if isinstance(name, str) else []
    valid = 1 <= len(parts) <= 2 and all(p not in ("", ".", "..") and os.sep not in p for p in parts)
    if valid:
        valid = bool(_TEMP.fullmatch(parts[-1])) if temporary else not parts[-1].startswith(_PREFIX)
    if not valid:
        raise ValueError(f"{name!r} is not a {'temporary ' if temporary else ''}file name of {folder} or of a "
                         "subfolder of it")
    if len(parts) == 2 and (folder / parts[0]).is_symlink():
        raise ValueError(f"{folder / parts[0]} is a link: fastlora writes only into the folder's own subfolders")
    return folder.joinpath(*parts)


@contextlib.contextmanager
def _opened(folder: Path, exclusive: bool) -> Iterator[None]:
    """Lock ``folder`` and, shared, its parent (a save of the parent writes into the folder's subfolders) for the
    block, and :func:`recover` the folder first."""
    with contextlib.ExitStack() as locks:
        if folder.parent != folder:
            locks.enter_context(_locked(folder.parent, exclusive=False))
        locks.enter_context(_locked(folder, exclusive))
        recover(folder)
        yield


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block: exclusive (a save, which creates the lock file) or shared. Shared
    without a lock file (a folder no fastlora save wrote, a missing one), or where the file system has no locks,
    the block runs unlocked."""
    fd = _open_lock(folder / LOCK, exclusive)
    if fd is not None:
        _HELD.add(fd)
    try:
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as error:
                if error.errno not in _NO_LOCKS:
                    raise
        yield
    finally:
        if fd in _HELD:  # else a forked child's copy, closed already
            _HELD.discard(fd)
            os.close(fd)  # releases the lock


def _open_lock(path: Path, exclusive: bool) -> int | None:
    """The lock file open: created for a save; None for a load where there is none it can open."""
    if not exclusive:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not path.exists():
            raise
        return os.open(path, os.O_RDONLY)  # another user's lock file: flock needs no write access (but on NFS)


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _abandoned(temp: Path, pid: int) -> bool:
    """Whether the transaction that wrote ``temp`` in process ``pid`` has ended without committing it."""
    if pid == os.getpid():
        return temp not in _WRITING
    if os.name == "nt":  # os.kill would end the process there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False
