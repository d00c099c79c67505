"""``python -m lightning_moe.checkpoint consolidate CHECKPOINT OUT_FILE [--trust-meta]`` or
``python -m lightning_moe.checkpoint average CHECKPOINT... --output FILE [--last N]``."""

import sys

from lightning_moe.checkpoint.average import average_main
from lightning_moe.checkpoint.consolidate import consolidate_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["average"]:
        sys.exit(average_main(sys.argv[2:]))
    sys.exit(consolidate_main())
