"""One compact log line per event; level from WHAGO_LOG_LEVEL."""

from __future__ import annotations

import logging
import sys


def setup(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
