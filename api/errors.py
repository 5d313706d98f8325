"""FarmError -> HTTP. The body is the error's own dict ({"code", "message", "field"}), so a remote CLI prints the
same message a local one does."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm.errors import (
    AuthError,
    BundleError,
    ChecksumMismatch,
    DatasetError,
    FarmError,
    InvalidState,
    ModelError,
    NotFound,
    ResourceError,
    SpecError,
    StaleAttempt,
    StoreError,
)
from farm.limits import bound_message

log = logging.getLogger("farm.api")


class PayloadTooLarge(FarmError):
    """A request body or an upload is larger than the API's configured limit (FARM_API_MAX_BODY_BYTES,
    FARM_API_MAX_UPLOAD_BYTES)."""

    code = "payload_too_large"


# Most specific first: the first class an error is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[FarmError], int], ...] = (
    (PayloadTooLarge, 413),
    (SpecError, 422),
    (DatasetError, 422),
    (ModelError, 422),
    (ResourceError, 422),
    (BundleError, 422),  # an uploaded bundle that does not verify
    (AuthError, 401),
    (NotFound, 404),
    (InvalidState, 409),
    (StaleAttempt, 409),
    (ChecksumMismatch, 502),
    (StoreError, 502),  # the object store behind the API failed
    (FarmError, 503),  # raised plainly when a service behind the API (the broker) cannot be reached
)

INVALID_REQUEST = "invalid_request"


class ErrorBody(BaseModel):
    """Every error the API returns."""

    code: str
    """Stable machine-readable name: invalid_spec, invalid_dataset, invalid_model, unschedulable, not_found,
    invalid_state, unauthorized, checksum_mismatch, store_error, invalid_request, ..."""
    message: str
    """What was wrong and what to do: the message the CLI prints."""
    field: str | None = None
    """The spec field (or file) at fault, when there is one."""


ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "Missing or unknown API token."},
    404: {"model": ErrorBody, "description": "No such job, adapter, version or file."},
    413: {"model": ErrorBody, "description": "The request body or upload is over the server's size limit."},
    422: {"model": ErrorBody, "description": "Invalid spec, dataset, model, resources or parameter."},
}


def status_for(exc: FarmError) -> int:
    """The HTTP status of a FarmError."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: FarmError) -> JSONResponse:
    """The JSON response for a FarmError (401s also say which scheme to use)."""
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = exc.to_dict()
    body["message"] = bound_message(body["message"])  # never more than a bounded excerpt of the input
    if body.get("field"):
        body["field"] = bound_message(body["field"], 200)
    return JSONResponse(body, status_code=status, headers=headers)


async def _farm_error(_request: Request, exc: FarmError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # Query and path parameters checked by FastAPI; the same body shape as every other error.
    lines, first_field = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "header", "body")]
        name = bound_message(".".join(loc), 200) or "(request)"
        first_field = first_field or (name if loc else None)
        lines.append(f"{name}: {bound_message(str(err.get('msg', 'invalid value')), 300)}")
    body = {"code": INVALID_REQUEST, "message": bound_message("\n".join(lines[:20])) or "invalid request"}
    if first_field:
        body["field"] = first_field
    return JSONResponse(body, status_code=422)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Routing errors (no such path, wrong method): the same body shape, so clients parse one format.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: "no such API route: see /docs for the routes this API serves"}.get(exc.status_code,
                                                                                        str(exc.detail))
    return JSONResponse({"code": code, "message": message}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log (uvicorn logs it again); the client gets no internals.
    log.error("unhandled error in the API: %s", type(exc).__name__)
    return JSONResponse({"code": "internal_error", "message": "internal error in the farm API; see its log"},
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn FarmErrors and bad parameters into {"code", "message", "field"} JSON,
    the request-size limit (413, before a route reads a byte) and the redaction of secrets from the log lines of
    uvicorn and the API."""
    from api.limits import BodySizeLimit, install_log_redaction

    app.add_middleware(BodySizeLimit)
    install_log_redaction()
    app.add_exception_handler(FarmError, _farm_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
