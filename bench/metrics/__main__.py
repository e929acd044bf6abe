"""``python -m bench.metrics <command> ...`` (see bench.metrics.cli)."""

import sys

from bench.metrics.cli import main

sys.exit(main())
