"""The one atomic write helper: files are never seen half-written.

Each file is written under a temporary name beside it (:func:`temporary_path`), flushed to disk, and renamed into
place only when every file of the set is complete; a failure (a full disk, Ctrl-C, a rename refused) removes the
temporary files and leaves the previous outputs as they were, as a set. The last file of ``writers`` is moved last: readers
that look for it (a parquet table) see a complete set. Result tables, run states, probe checkpoints, token-cache
manifests and the run cache all write through :func:`write_atomically`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import AttnflowError


class OutputBusyError(AttnflowError):
    """Another process is writing the same output."""


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place: ``.NAME.tmp`` beside it."""
    return final.with_name(f".{final.name}.tmp")


def write_atomically(writers: Mapping[Path, Callable[[Path], Any]]) -> None:
    """Call ``writer(temporary_path)`` for every ``final_path -> writer``, flush each file to disk, then rename each
    into place in order (folders are created). If a rename fails, the files already renamed are rolled back to
    their previous contents (or removed when there were none): the set is replaced whole or not at all.

    Raises:
        Whatever a writer or a rename raises (after removing every temporary file).
    """
    temps = {final: temporary_path(final) for final in writers}
    try:
        for final, write in writers.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            write(temps[final])
            with open(temps[final], "rb") as f:  # on disk before the rename: a crash leaves old or new, never half
                os.fsync(f.fileno())
        _replace_all(temps)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _replace_all(temps: Mapping[Path, Path]) -> None:
    """Rename every temporary file over its final path, keeping the previous files (hard links, no moment without
    a file) until all are in place; restore them if a rename fails."""
    placed: list[tuple[Path, Path | None]] = []  # renamed into place, with the previous file's copy
    backups: list[Path] = []
    try:
        for final, temp in temps.items():
            backup = final.with_name(f".{final.name}.previous") if final.exists() else None
            if backup is not None:
                backup.unlink(missing_ok=True)
                try:
                    os.link(final, backup)
                except OSError:  # a file system without hard links
                    shutil.copy2(final, backup)
                backups.append(backup)
            os.replace(temp, final)
            placed.append((final, backup))
    except BaseException:
        for final, backup in reversed(placed):
            if backup is not None:
                os.replace(backup, final)
            else:
                final.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups:  # (a file not renamed over still is its backup's link)
            backup.unlink(missing_ok=True)


def lock_path(output: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside a file, ``.attnflow.lock`` inside a folder."""
    return output / ".attnflow.lock" if output.is_dir() else output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (a file or a folder) inside the block, so two runs never write (or
    resume, or remove the state of) the same output at once. The lock is the operating system's (``flock``):
    it is released when the block ends or the process dies, whatever the way; the small lock file stays.

    Raises:
        OutputBusyError: another process holds the lock (one line, with its process id).
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputBusyError(f"{output} is being written by another run ({holder}): wait for it to end, or "
                                  "write elsewhere") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
