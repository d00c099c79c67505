"""``python -m lightning_moe.checkpoint consolidate CHECKPOINT OUT_FILE [--trust-meta]``."""

import sys

from lightning_moe.checkpoint.consolidate import consolidate_main

if __name__ == "__main__":
    sys.exit(consolidate_main())
