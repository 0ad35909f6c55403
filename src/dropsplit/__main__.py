"""``python -m dropsplit``."""

import sys

from dropsplit.cli import main

sys.exit(main())
