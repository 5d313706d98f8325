"""Request-size limits (413) and secret redaction in log lines.

`BodySizeLimit` refuses a body larger than FARM_API_MAX_BODY_BYTES (FARM_API_MAX_UPLOAD_BYTES for dataset
uploads) before a route reads it: at once when Content-Length says so, else as soon as the streamed bytes pass the
limit. `install_log_redaction` keeps query strings (a token pasted into a URL) and `Authorization` values out of
uvicorn's and the API's log lines.
"""

from __future__ import annotations

import json
import logging
import re

from farm.settings import FarmSettings, get_settings

UPLOAD_ROUTES = ("/v1/datasets", "/v1/bundles")  # bundle imports
"""POSTs to these paths carry a dataset file or a bundle: they get the upload limit, every other request the body limit."""


def _limit_for(scope, settings: FarmSettings) -> int:
    path = scope.get("path", "")
    if scope.get("method") == "POST" and any(path == p or path == p + "/" for p in UPLOAD_ROUTES):
        return settings.api_max_upload_bytes
    return settings.api_max_body_bytes


def too_large_message(limit: int, what: str) -> str:
    setting = "FARM_API_MAX_UPLOAD_BYTES" if what == "upload" else "FARM_API_MAX_BODY_BYTES"
    return (f"the {what} is larger than this server's limit of {limit} bytes ({setting}); send less, or ask the "
            "operator to raise it")


class BodySizeLimit:
    """ASGI middleware: 413 payload_too_large for a request body over the limit (see module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None) or get_settings()
        limit = _limit_for(scope, settings)
        what = "upload" if limit == settings.api_max_upload_bytes and limit != settings.api_max_body_bytes \
            else "request body"
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                return await _send_413(send, too_large_message(limit, what))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    from api.errors import PayloadTooLarge

                    raise PayloadTooLarge(too_large_message(limit, what))
            return message

        return await self.app(scope, limited_receive, send)


async def _send_413(send, message: str) -> None:
    body = json.dumps({"code": "payload_too_large", "message": message}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- log redaction

_SECRETS = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s\"',;]+|"
                      r"(bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "<redacted>"


def redact_text(text: str) -> str:
    """`text` with Authorization values and bearer tokens replaced by <redacted>."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(3) or "") + (m.group(2) or "") + REDACTED, text)


def redact_path(full_path: str) -> str:
    """A request path with its query string (which may hold a token pasted into a URL) replaced by <redacted>."""
    path, sep, _query = full_path.partition("?")
    return f"{path}?{REDACTED}" if sep else path


class RedactingFilter(logging.Filter):
    """Rewrites uvicorn access records (query strings) and any record's text (Authorization, bearer tokens)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, full_path, version, status = args
            record.args = (client, method, redact_path(str(full_path)), version, status)
            return True
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        clean = redact_text(text)
        if "?" in clean and ("token" in clean.lower() or "key" in clean.lower()):
            clean = re.sub(r"(/[^\s?\"']*)\?[^\s\"']*", lambda m: redact_path(m.group(0)), clean)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


_FILTER = RedactingFilter()
LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "farm.api", "farm")


def install_log_redaction() -> None:
    """Put the redacting filter on uvicorn's and the farm's loggers (and their handlers); idempotent."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
