"""``python -m dgemma`` and the ``dgemma`` console script: see ``dgemma.cli``."""

import sys

from dgemma.cli import main

if __name__ == "__main__":
    sys.exit(main())
