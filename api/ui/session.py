"""The console's sign-in: a bearer token once at /ui/login, then a signed session cookie that never holds it.

The cookie carries the token's *name* (the caller), signed with itsdangerous; the signing key is derived from the
server's FARM_API_TOKENS, so changing the tokens signs everyone out, and a token removed from them ends its
sessions at the next request. The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's
page sends it); every form that changes something also carries a CSRF token bound to the same caller.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from fastapi.responses import Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from farm.settings import FarmSettings

COOKIE = "farm_session"
MAX_AGE_S = 12 * 3600
_SESSION_SALT = "farm-console-session"
_CSRF_SALT = "farm-console-csrf"


class LoginRequired(Exception):
    """Raised by a console page when the request has no valid session: the app answers with the sign-in page."""

    def __init__(self, next_url: str):
        self.next_url = next_url


def _secret(settings: FarmSettings) -> bytes:
    """A key derived from every configured token (name and value): the cookie is as secret as the tokens."""
    material = "\0".join(f"{name}={secret.get_secret_value()}" for name, secret in sorted(settings.api_tokens.items()))
    return hmac.new(b"farm-console/1", material.encode(), hashlib.sha256).digest()


def _serializer(settings: FarmSettings, salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(_secret(settings), salt=salt)


def set_session(response: Response, request: Request, settings: FarmSettings, caller: str) -> None:
    """Sign `caller` into the session cookie of `response`."""
    value = _serializer(settings, _SESSION_SALT).dumps({"caller": caller})
    response.set_cookie(COOKIE, value, max_age=MAX_AGE_S, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")


def clear_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")


def session_caller(request: Request, settings: FarmSettings) -> str | None:
    """The caller the request's cookie was signed for, when the signature holds, it is fresh, and that token still
    exists; else None."""
    raw = request.cookies.get(COOKIE)
    if not raw or not settings.api_tokens:
        return None
    try:
        data = _serializer(settings, _SESSION_SALT).loads(raw, max_age=MAX_AGE_S)
    except BadSignature:  # also covers SignatureExpired
        return None
    caller = data.get("caller") if isinstance(data, dict) else None
    return caller if isinstance(caller, str) and caller in settings.api_tokens else None


def csrf_token(settings: FarmSettings, caller: str) -> str:
    """The token a form of this caller's pages carries."""
    return _serializer(settings, _CSRF_SALT).dumps(caller)


def check_csrf(settings: FarmSettings, caller: str, token: str | None) -> bool:
    """True when `token` was issued to `caller` within the session's lifetime."""
    if not token:
        return False
    try:
        return _serializer(settings, _CSRF_SALT).loads(token, max_age=MAX_AGE_S) == caller
    except BadSignature:
        return False
