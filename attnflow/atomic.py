"""Write a set of output files so that none is ever seen half-written.

Each file is written under a temporary name beside it (``.NAME.tmp``) and renamed into place only when every
file of the set is complete; a failure (a full disk, Ctrl-C) removes the temporary files and leaves the previous
outputs as they were. The last file of ``writers`` is moved last: readers that look for it (a parquet table)
see a complete set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping


def write_atomically(writers: Mapping[Path, Callable[[Path], Any]]) -> None:
    """Call ``writer(temporary_path)`` for every ``final_path -> writer``, then rename each into place in order.

    Raises:
        Whatever a writer raises (after removing every temporary file).
    """
    temps = {final: final.with_name(f".{final.name}.tmp") for final in writers}
    try:
        for final, write in writers.items():
            write(temps[final])
    except BaseException:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        raise
    for final, temp in temps.items():
        os.replace(temp, final)
