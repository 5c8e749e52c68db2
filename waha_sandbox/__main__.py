"""``python -m waha_sandbox``: run the sandbox (or regenerate its bundled spec subset)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from waha_sandbox.app import make_app
from waha_sandbox.spec import SCHEMAS_PATH, WAHA_VERSION, write_subset
from waha_sandbox.validator import Json

log = logging.getLogger("waha.sandbox")


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop unless WHAGO_EVENT_LOOP=asyncio: the sandbox sits on both sides of every dispatch
    figure, so its per-request CPU should be as low as the worker's."""
    if os.environ.get("WHAGO_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"WAHA sandbox (answers like WAHA {WAHA_VERSION})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--api-key", default=os.environ.get("WAHA_API_KEY"),
                        help="required X-Api-Key value (default $WAHA_API_KEY; none = no auth)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every API request")
    parser.add_argument("--timeout-seconds", type=float, default=30.0, help="how long injected timeouts hang")
    parser.add_argument("--webhook-url", default=os.environ.get("WHATSAPP_HOOK_URL"),
                        help="post receipts and inbound messages here (default $WHATSAPP_HOOK_URL)")
    parser.add_argument("--webhook-hmac-key", default=os.environ.get("WHATSAPP_HOOK_HMAC_KEY"),
                        help="sign them (X-Webhook-Hmac, SHA-512; default $WHATSAPP_HOOK_HMAC_KEY)")
    parser.add_argument("--write-schemas", metavar="OPENAPI_JSON",
                        help="regenerate schemas.json from WAHA's openapi.json and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.write_schemas:
        write_subset(Path(args.write_schemas))
        print(f"wrote {SCHEMAS_PATH}")
        return
    hooks: list[Json] = []
    if args.webhook_url:
        hooks.append({"url": args.webhook_url, "events": ["message.ack", "message"]})
        if args.webhook_hmac_key:
            hooks[0]["hmac"] = {"key": args.webhook_hmac_key}
    app = make_app(args.api_key, args.latency_ms, args.timeout_seconds, hooks)
    # Fewer cyclic-GC passes: requests allocate many short-lived objects, almost none in cycles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    log.info("event=listening url=http://%s:%d auth=%s", args.host, args.port,
             "on" if args.api_key else "off")
    # run_app stops gracefully on SIGINT/SIGTERM; requests hanging on an injected timeout are
    # cancelled after shutdown_timeout so a stop never waits for them.
    web.run_app(app, host=args.host, port=args.port, shutdown_timeout=2.0, backlog=4096,
                access_log=None, print=None, handle_signals=True, loop=new_loop())
    log.info("event=stopped")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
