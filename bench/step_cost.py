"""Step cost of every method: see :mod:`dropsplit.benchmark` (same as ``dropsplit bench``)."""

import sys

from dropsplit.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
