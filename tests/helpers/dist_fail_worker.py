"""Worker for tests/test_distributed.py, launched by torchrun: ``attnflow ARGS`` where reading any image raises
a RuntimeError on rank 1 only (a failing disk or file system on one node, not a corrupt file)."""

import os
import sys

import attnflow.data.images as images
from attnflow.cli import main

_read_sample = images.read_sample


def failing_read_sample(path, *args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError(f"simulated read failure of {path}")
    return _read_sample(path, *args, **kwargs)


if __name__ == "__main__":
    images.read_sample = failing_read_sample
    sys.exit(main(sys.argv[1:]))
