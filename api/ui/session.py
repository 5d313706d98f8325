"""The console's sign-in: a bearer token once at /ui/login, then a signed session cookie that never holds it.

The cookie carries the token's *name* (the caller), signed with itsdangerous; the signing key is derived from the
server's FARM_API_TOKENS, so changing the tokens signs everyone out, and a token removed from them ends its
sessions at the next request. The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's
page sends it); every form that changes something also carries a CSRF token bound to the same caller.

The sign-in form has its own CSRF token (double-submit): GET /ui/login sets a random nonce in an HttpOnly,
SameSite=Strict cookie scoped to /ui/login and puts the nonce, signed, in the form; POST /ui/login is refused
unless the form's token is the signature of the cookie's nonce. Another site's page cannot read the form nor make
the browser send the cookie, so it cannot sign a visitor into an account of its choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from farm.settings import FarmSettings

COOKIE = "farm_session"
MAX_AGE_S = 12 * 3600
_SESSION_SALT = "farm-console-session"
_CSRF_SALT = "farm-console-csrf"
LOGIN_COOKIE = "farm_login_csrf"
LOGIN_MAX_AGE_S = 3600
_LOGIN_SALT = "farm-console-login"


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


def login_csrf(request: Request, settings: FarmSettings) -> tuple[str, str | None]:
    """(token for the sign-in form, new nonce to set as the LOGIN_COOKIE or None when the request's is kept)."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    fresh = None
    if not nonce or not 32 <= len(nonce) <= 64:
        nonce = fresh = secrets.token_urlsafe(32)
    return _serializer(settings, _LOGIN_SALT).dumps(nonce), fresh


def set_login_cookie(response: Response, request: Request, nonce: str) -> None:
    """The sign-in form's double-submit cookie: HttpOnly, SameSite=Strict, sent only to /ui/login."""
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=LOGIN_MAX_AGE_S, httponly=True, samesite="strict",
                        path="/ui/login", secure=request.url.scheme == "https")


def check_login_csrf(request: Request, settings: FarmSettings, token: str | None) -> bool:
    """True when the form's `token` signs the nonce of the request's sign-in cookie, within the hour."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not token or not nonce:
        return False
    try:
        signed = _serializer(settings, _LOGIN_SALT).loads(token, max_age=LOGIN_MAX_AGE_S)
    except BadSignature:
        return False
    return isinstance(signed, str) and hmac.compare_digest(signed, nonce)
