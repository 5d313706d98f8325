"""Route dependencies: the API's settings and the caller behind the bearer token.

    def route(settings: SettingsDep, caller: CallerDep): ...
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from farm.errors import AuthError
from farm.settings import FarmSettings

_bearer = HTTPBearer(auto_error=False, scheme_name="FarmToken",
                     description="An API token from the server's FARM_API_TOKENS (the CLI sends FARM_API_TOKEN).")


def get_app_settings(request: Request) -> FarmSettings:
    """The settings the app was created with."""
    return request.app.state.settings


SettingsDep = Annotated[FarmSettings, Depends(get_app_settings)]


def token_owner(token: str, tokens: dict[str, SecretStr]) -> str | None:
    """The name of the token equal to `token`, or None.

    Every configured token is compared, in constant time, so the response time tells nothing about which token
    came close or where it lies in the table.
    """
    given = token.encode()
    owner = None
    for name, secret in tokens.items():
        expected = secret.get_secret_value().encode()
        if expected and hmac.compare_digest(given, expected):
            owner = name
    return owner


def require_caller(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The name of the caller's token; AuthError (401) when it is missing or unknown."""
    if credentials is None:
        raise AuthError("missing API token: send the header `Authorization: Bearer <token>` "
                        "(the farm CLI sends FARM_API_TOKEN)")
    owner = token_owner(credentials.credentials, settings.api_tokens)
    if owner is None:
        raise AuthError("unknown API token: check FARM_API_TOKEN against the tokens the server was given "
                        "in FARM_API_TOKENS")
    return owner


CallerDep = Annotated[str, Depends(require_caller)]
