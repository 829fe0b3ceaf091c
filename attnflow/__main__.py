"""``python -m attnflow`` (also under ``torchrun -m attnflow``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
