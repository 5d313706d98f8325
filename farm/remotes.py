"""Other farms: `farm remote add/list` and `farm import REMOTE/NAME[:V]`.

A remote is a name and the URL of another farm's API. Its token is never stored in the catalog: the catalog keeps
the name of the environment variable that holds it (default FARM_REMOTE_<NAME>_TOKEN); a token typed at the prompt
goes to <FARM_HOME>/remotes/<name>.token, readable by its owner only. Importing from a remote downloads the
adapter's bundle (GET /v1/adapters/{name}/{version}/bundle) into a scratch file and imports it exactly as a bundle
file is imported (farm.bundles): every byte verified before anything is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, SecretStr
from sqlalchemy import select

from farm.bundles import ImportResult, import_bundle
from farm.catalog.models import Remote
from farm.catalog.session import session_scope
from farm.errors import AuthError, BundleError, FarmError, NotFound, SpecError
from farm.names import parse_adapter_ref
from farm.settings import FarmSettings, get_settings

REMOTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class RemotePublic(BaseModel):
    """A remote farm as listed (never its token)."""

    name: str
    url: str
    token_env: str | None = None
    """The environment variable the token is read from."""
    token_available: bool = False
    """Whether a token is available now (in that variable or the token file)."""


def default_token_env(name: str) -> str:
    return "FARM_REMOTE_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_TOKEN"


def token_file(settings: FarmSettings, name: str) -> Path:
    return Path(settings.home) / "remotes" / f"{name}.token"


def save_token_file(settings: FarmSettings, name: str, token: str) -> Path:
    """Keep a typed token outside the catalog, in a file only its owner can read (0600)."""
    path = token_file(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token.strip() + "\n")
    os.chmod(path, 0o600)
    return path


def _token(settings: FarmSettings, remote: Remote) -> str | None:
    if remote.token_env and os.environ.get(remote.token_env):
        return os.environ[remote.token_env]
    path = token_file(settings, remote.name)
    return path.read_text().strip() or None if path.is_file() else None


def _view(settings: FarmSettings, remote: Remote) -> RemotePublic:
    return RemotePublic(name=remote.name, url=remote.url, token_env=remote.token_env,
                        token_available=_token(settings, remote) is not None)


def add_remote(name: str, url: str, *, token_env: str | None = None,
               settings: FarmSettings | None = None) -> RemotePublic:
    """Record another farm's API under `name`. Its token is read from `token_env` (default
    FARM_REMOTE_<NAME>_TOKEN) or the token file when used; only the variable's name is stored."""
    settings = settings or get_settings()
    if not REMOTE_NAME.match(name or ""):
        raise SpecError(f"remote name {name[:70]!r}: use lowercase letters, digits, '-' and '_'", field="name")
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SpecError(f"remote URL {url[:100]!r}: give the farm API's address, like https://farm.example:8000",
                        field="url")
    if parts.username or parts.password:
        raise SpecError("remote URL: do not put credentials in the URL; the token comes from the environment",
                        field="url")
    token_env = token_env or default_token_env(name)
    if not ENV_NAME.match(token_env):
        raise SpecError(f"--token-env {token_env[:70]!r} is not an environment variable name", field="token_env")
    with session_scope(settings.database_url) as session:
        if session.scalar(select(Remote).where(Remote.name == name)) is not None:
            raise SpecError(f"a remote called {name!r} exists already: `farm remote list`", field="name")
        remote = Remote(name=name, url=url.rstrip("/"), token_env=token_env)
        session.add(remote)
        session.flush()
        return _view(settings, remote)


def list_remotes(*, settings: FarmSettings | None = None) -> list[RemotePublic]:
    """Every remote farm, by name."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        return [_view(settings, r) for r in session.scalars(select(Remote).order_by(Remote.name))]


def get_remote(name: str, settings: FarmSettings) -> Remote:
    with session_scope(settings.database_url) as session:
        remote = session.scalar(select(Remote).where(Remote.name == name))
        if remote is None:
            known = ", ".join(session.scalars(select(Remote.name).order_by(Remote.name))) or "none"
            raise NotFound(f"no remote called {name!r} (known: {known}); add it with `farm remote add NAME URL`")
        session.expunge(remote)
        return remote


def parse_remote_ref(ref: str) -> tuple[str, str, int | None]:
    """REMOTE/NAME[:V] -> (remote, name, version)."""
    remote, _, rest = ref.partition("/")
    if not remote or not rest or "/" in rest:
        raise SpecError(f"{ref!r}: name a remote adapter as REMOTE/NAME or REMOTE/NAME:VERSION", field="source")
    name, version = parse_adapter_ref(rest)
    return remote, name, version


def import_from_remote(ref: str, *, as_name: str | None = None, settings: FarmSettings | None = None,
                       importer: Callable[[Path, str], ImportResult] | None = None) -> ImportResult:
    """Fetch REMOTE/NAME[:V] from another farm's API as a bundle and import it (verified like a bundle file).

    A refused token (401), an unknown adapter (404), a cut-off download or a bundle that does not verify raise a
    FarmError naming the remote; nothing is written then. `importer(bundle, source)` imports the downloaded
    bundle (default: into this catalog; the CLI with FARM_API_URL uploads it to that farm instead).
    """
    import httpx

    from farm.client_http import HttpClient, error_from_response

    settings = settings or get_settings()
    remote_name, name, version = parse_remote_ref(ref)
    remote = get_remote(remote_name, settings)
    token = _token(settings, remote)
    if token is None:
        raise AuthError(f"no token for remote {remote.name!r}: set {remote.token_env} (or run "
                        f"`farm remote add` again to type it)")
    client_settings = settings.model_copy(update={"api_url": remote.url, "api_token": SecretStr(token)})
    where = f"remote {remote.name!r} ({remote.url})"
    with HttpClient(client_settings, timeout=120) as client:
        try:
            view = client.get_adapter(f"{name}:{version}" if version else name)
        except AuthError:
            raise AuthError(f"{where} refused the token (401): check {remote.token_env} against the tokens that "
                            "farm's API was given. Nothing was imported.") from None
        path = f"/v1/adapters/{quote(view.name, safe='')}/{view.version}/bundle"
        with tempfile.TemporaryDirectory(prefix="farm-remote-") as tmp:
            bundle = Path(tmp) / "bundle.tar"
            try:
                with client._http.stream("GET", path) as response:
                    if not response.is_success:
                        response.read()
                        raise error_from_response(response, where)
                    expected = response.headers.get("content-length")
                    with open(bundle, "wb") as fh:
                        for chunk in response.iter_bytes(1024 * 1024):
                            fh.write(chunk)
                    if expected is not None and bundle.stat().st_size != int(expected):
                        raise BundleError(f"the bundle from {where} was cut off ({bundle.stat().st_size} of "
                                          f"{expected} bytes); import again. Nothing was imported.")
            except httpx.TransportError as exc:
                raise BundleError(f"downloading {view.name}:{view.version} from {where} failed "
                                  f"({type(exc).__name__}: {exc}); import again. Nothing was imported.") from None
            except FarmError as exc:
                if exc.code == "unauthorized":
                    raise AuthError(f"{where} refused the token (401). Nothing was imported.") from None
                raise
            source = f"{remote.name}/{view.name}:{view.version} ({remote.url})"
            if importer is not None:
                return importer(bundle, source)
            return import_bundle(bundle, as_name=as_name, settings=settings, source=source)
