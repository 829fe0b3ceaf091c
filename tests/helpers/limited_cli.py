"""Run ``attnflow`` commands in a process whose address space is limited (``RLIMIT_AS``), so that a regression that
allocates without bound (an image resized to gigapixels, a billion plot ticks) ends in a MemoryError here instead
of taking the machine down.

``limited_cli.py LIMIT_GIB CASES.json`` runs each argument list of the JSON file with ``attnflow.cli.main`` and
prints one JSON list: per case ``{"code": exit code or null, "error": exception name or null, "stdout", "stderr"}``.
"""

import contextlib
import io
import json
import resource
import sys
from pathlib import Path


def main(limit_gib: float, cases: Path) -> None:
    limit = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from attnflow.cli import main as cli

    results = []
    for argv in json.loads(cases.read_text()):
        out, err = io.StringIO(), io.StringIO()
        code, error = None, None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli(argv)
            except SystemExit as exit_:
                code = exit_.code
            except BaseException as exc:  # noqa: BLE001  (MemoryError above all: reported, not raised)
                error = type(exc).__name__
        results.append({"code": code, "error": error, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps(results))


if __name__ == "__main__":
    main(float(sys.argv[1]), Path(sys.argv[2]))
