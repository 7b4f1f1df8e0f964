"""``python -m landscape`` (and ``torchrun -m landscape``): the ``landscape`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
