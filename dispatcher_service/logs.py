"""One line per event, greppable by campaign and chip id."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )


def lane_ctx(campaign_id: str, chip_id: str, epoch: int | None = None) -> str:
    """The prefix every lane log line carries."""
    e = "" if epoch is None else f" epoch={epoch}"
    return f"campaign={campaign_id} chip={chip_id}{e}"
