"""Logging setup shared by every entry point (the CLI, the demo): INFO on rank 0, warnings elsewhere."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging() -> None:
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
