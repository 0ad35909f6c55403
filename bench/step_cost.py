"""Step cost of every method: see :mod:`dropsplit.experiments.benchmark` (``dropsplit bench``)."""

import sys

from dropsplit.experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
