"""The one atomic write helper: files are never seen half-written.

Each file is written under a temporary name beside it (:func:`temporary_path`), flushed to disk, and renamed into
place only when every file of the set is complete; a failure (a full disk, Ctrl-C, a killed process) removes the
temporary files and leaves the previous outputs as they were. The last file of ``writers`` is moved last: readers
that look for it (a parquet table) see a complete set. Result tables, run states, probe checkpoints, token-cache
manifests and the run cache all write through :func:`write_atomically`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place: ``.NAME.tmp`` beside it."""
    return final.with_name(f".{final.name}.tmp")


def write_atomically(writers: Mapping[Path, Callable[[Path], Any]]) -> None:
    """Call ``writer(temporary_path)`` for every ``final_path -> writer``, flush each file to disk, then rename each
    into place in order (folders are created).

    Raises:
        Whatever a writer raises (after removing every temporary file).
    """
    temps = {final: temporary_path(final) for final in writers}
    try:
        for final, write in writers.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            write(temps[final])
            with open(temps[final], "rb") as f:  # on disk before the rename: a crash leaves old or new, never half
                os.fsync(f.fileno())
    except BaseException:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        raise
    for final, temp in temps.items():
        os.replace(temp, final)
