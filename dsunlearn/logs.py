"""Logging setup shared by every entry point (the CLI, the demo): INFO on rank 0, warnings elsewhere."""
from __future__ import annotations

import contextlib
import logging
import os
import sys


def setup_logging() -> None:
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # peft imports torchao, which warns about every CUDA-only kernel library a CPU machine cannot load.
    logging.getLogger("torchao").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_torchao():
    """torchao (imported by peft, and by the quantization audit) logs a warning for every CUDA-only kernel library a
    CPU machine cannot load: noise, raised to ERROR while importing, for callers without ``setup_logging``."""
    # torch's pytree registry also warns once per enum torchao registers: the same noise.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
