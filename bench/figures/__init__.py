"""The figures of `make bench`. Each is one function taking the run context; it fills its rows and
may raise (the runner turns an exception into an error on the row). Every loop is bounded in count
and in time; everything talks to 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Callable

from bench.core import Ctx
from bench.figures.data import fig_delete, fig_import, fig_million, fig_start
from bench.figures.dispatch import fig_dispatch
from bench.figures.events import fig_watch, fig_webhooks
from bench.figures.lane_scale import fig_lanes
from bench.figures.lanes import fig_lease
from bench.figures.reads import fig_get, fig_list
from bench.figures.scale import fig_scale
from bench.figures.stop import fig_cancel, fig_pause
from bench.figures.takeover import fig_takeover

FIGURES: dict[str, Callable[[Ctx], None]] = {
    "import": fig_import,
    "start": fig_start,
    "delete": fig_delete,
    "dispatch": fig_dispatch,
    "get": fig_get,
    "list": fig_list,
    "cancel": fig_cancel,
    "pause": fig_pause,
    "lanes": fig_lanes,
    "million": fig_million,
    "lease": fig_lease,
    "webhooks": fig_webhooks,
    "watch": fig_watch,
    "scale": fig_scale,
    "takeover": fig_takeover,
}
