"""``python -m landscape.cli``: the ``landscape`` command line (as ``python -m landscape``)."""

import sys

from .entry import main

if __name__ == "__main__":
    sys.exit(main())
