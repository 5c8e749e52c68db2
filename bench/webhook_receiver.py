"""The local webhook receiver of the `webhooks` figure: answers 204 at once and notes when each
webhook-id first arrived (wall clock, the same clock the figure stamps commits with).

    python -m bench.webhook_receiver --port P       GET /arrivals -> {"evt_1": 1733290000.123, ...}
"""

from __future__ import annotations

import argparse
import time

from aiohttp import web


def app() -> web.Application:
    arrivals: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        arrivals.setdefault(request.headers.get("webhook-id", ""), time.time())
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        return web.Response(status=204)

    a = web.Application()
    a.router.add_post("/hooks", hook)
    a.router.add_get("/arrivals", stats)
    a.router.add_post("/reset", reset)
    return a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    web.run_app(app(), host="127.0.0.1", port=ap.parse_args().port, print=None, access_log=None)


if __name__ == "__main__":
    main()
