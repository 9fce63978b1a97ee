"""``python -m mtljax``: the runner (see ``python -m mtljax --help``)."""

import sys

from mtljax._src.runner import main

if __name__ == "__main__":
    sys.exit(main())
