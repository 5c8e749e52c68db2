"""WAHA-shaped responses: the bodies and status codes real WAHA sends for errors and results."""

from __future__ import annotations

from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from waha_sandbox.spec import WAHA_VERSION
from waha_sandbox.state import Fault, Session


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# WAHA-shaped responses
# ---------------------------------------------------------------------------------------------

def json_response(status: int, body: Any) -> web.Response:
    # orjson: encoding the WAMessage was a tenth of the sandbox's CPU per send with the stdlib json.
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def http_error(status: int, message: Any) -> web.Response:
    """NestJS HttpException body, which is what WAHA sends for 4xx."""
    return json_response(status, {"statusCode": status, "message": message, "error": _reason(status)})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def server_error(request: web.Request, body: Any, message: str, **exception: Any) -> web.Response:
    """WAHA's AllExceptionsFilter body for a non-HTTP exception (HTTP 500)."""
    return json_response(500, {
        "statusCode": 500,
        "timestamp": _now_iso(),
        "exception": {"message": message, **exception, "name": "Error",
                      "stack": f"Error: {message}\n    at WAHASandbox ({request.path})"},
        "request": {"path": request.path_qs, "method": request.method, "body": body,
                    "query": dict(request.query)},
        "version": {"version": WAHA_VERSION, "engine": "GOWS", "tier": "CORE"},
    })


def restricted_error(request: web.Request, body: Any) -> web.Response:
    """What WAHA returns when WhatsApp refuses a send from a restricted number (error 463)."""
    return server_error(request, body, "2 UNKNOWN: server returned error 463",
                        code=2, details="server returned error 463", metadata={})


def session_status_error(sess: Session, status: str | None = None) -> web.Response:
    """WAHA's 422 for a session that is not WORKING."""
    return json_response(422, {
        "error": "Session status is not as expected. Try again later or restart the session",
        "session": sess.name, "status": status or sess.status, "expected": ["WORKING"],
    })


def session_not_found(name: str) -> web.Response:
    return http_error(404, f"We didn't find a session with name '{name}'.\n"
                           f"Please start it first by using POST /api/sessions/{name}/start request")


def fault_response(request: web.Request, body: Any, sess: Session | None, fault: Fault) -> web.Response:
    if fault.body is not None:
        return json_response(fault.status, fault.body)
    if fault.error == 463:
        return restricted_error(request, body)
    if fault.status == 422 and sess is not None:
        return session_status_error(sess, "STARTING" if sess.status == "WORKING" else None)
    if fault.status == 500:
        return server_error(request, body, "sandbox: injected failure")
    return http_error(fault.status, "sandbox: injected failure")
