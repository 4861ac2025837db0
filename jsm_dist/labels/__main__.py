"""``python -m jsm_dist.labels``: the jsm-labels CLI."""

import sys

from jsm_dist.labels.cli import main

if __name__ == "__main__":
    sys.exit(main())
