"""The farm's HTTP API as a FarmClient: what the CLI uses when FARM_API_URL is set.

Errors come back as the same FarmError subclasses, with the same messages, as a local run raises. Specs are
loaded and checked here first (farm.specs.load_spec), local datasets are checked here too and then uploaded
(POST /v1/datasets), and pulled adapters are verified by farm.store.transfer.download_tree, exactly as a local
pull is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from farm import __version__
from farm.datasets import validate_dataset
from farm.errors import DatasetError, FarmError, NotFound, StoreError
from farm.schemas import (
    AdapterFilePublic,
    AdapterPublic,
    DatasetPublic,
    JobEventPublic,
    JobPublic,
    PullResult,
    poll_until_finished,
)
from farm.settings import FarmSettings, get_settings
from farm.specs import TrainSpec, load_spec, spec_to_dict
from farm.store.base import CHUNK_SIZE, HashingWriter, ObjectInfo, Store
from farm.store.local import write_atomically

STORE_REF = "store:"


def _error_classes() -> dict[str, type[FarmError]]:
    """Every FarmError subclass by its code, so an API error is raised again as the class the server raised."""
    classes: dict[str, type[FarmError]] = {}
    pending = [FarmError]
    while pending:
        cls = pending.pop()
        classes.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return classes


def error_from_response(response: httpx.Response, where: str) -> FarmError:
    """The FarmError an error response stands for: {"code", "message", "field"} from the API, else a generic one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str):
        cls = _error_classes().get(body["code"], FarmError)
        error = cls(body["message"], field=body.get("field"))
        error.code = body["code"]  # keep codes this client does not know (invalid_request, internal_error)
        return error
    text = " ".join(response.text.split())[:300]
    return FarmError(f"{where} answered HTTP {response.status_code}: {text or response.reason_phrase}")


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) for each server-sent event in a stream of lines; comments (keepalives) are skipped."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


class HttpClient:
    """Talks to the farm API at settings.api_url with the bearer token settings.api_token."""

    def __init__(self, settings: FarmSettings | None = None, *, timeout: float = 60.0, poll_seconds: float = 1.0):
        self.settings = settings or get_settings()
        if not self.settings.api_url:
            raise FarmError("FARM_API_URL is not set: give the farm API's address, like http://farm.example:8000",
                            field="api_url")
        self.base_url = self.settings.api_url.rstrip("/")
        self.poll_seconds = poll_seconds
        headers = {"User-Agent": f"lora-farm/{__version__}"}
        token = self.settings.api_token
        if token is not None:
            secret = token.get_secret_value() if isinstance(token, SecretStr) else str(token)
            headers["Authorization"] = f"Bearer {secret}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        # Presigned store URLs carry their own signature: the API token must never be sent to the store.
        self._plain = httpx.Client(timeout=timeout, headers={"User-Agent": headers["User-Agent"]})

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise FarmError(f"cannot reach the farm API at {self.base_url} ({type(exc).__name__}: {exc}); check "
                            "FARM_API_URL and that the API runs there") from None
        if not response.is_success:
            raise error_from_response(response, f"the farm API at {self.base_url}")
        return response.json()

    # ------------------------------------------------------------ jobs

    def submit(self, spec_path: Path) -> JobPublic:
        """Load and check the spec here, upload its local datasets, then submit it (the server checks it again)."""
        spec = load_spec(spec_path)
        if isinstance(spec, TrainSpec):
            updates = {}
            for name in ("path", "eval_path"):
                ref = getattr(spec.dataset, name)
                if ref and not ref.startswith(STORE_REF) and "://" not in ref:
                    updates[name] = self.upload_dataset(ref, spec.dataset.format, field=f"dataset.{name}").uri
            if updates:
                spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update=updates)})
        return JobPublic.model_validate(self._call("POST", "/v1/jobs", json=spec_to_dict(spec)))

    def upload_dataset(self, path: str | Path, fmt: str, *, field: str = "dataset.path") -> DatasetPublic:
        """Check a local JSONL file line by line (the local submit's checks and messages), then upload it."""
        try:
            info = validate_dataset(path, fmt)
            with open(path, "rb") as fh:
                data = self._call(
                    "POST", "/v1/datasets",
                    params={"format": fmt, "filename": str(path)},
                    content=iter(lambda: fh.read(CHUNK_SIZE), b""),
                    headers={"Content-Type": "application/x-ndjson", "Content-Length": str(info.size)},
                )
            stored = DatasetPublic.model_validate(data)
            if stored.sha256 != info.sha256:
                raise DatasetError(f"{path}: file changed while it was being uploaded; submit again")
            return stored
        except DatasetError as exc:
            exc.field = field
            raise

    def get_job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}"))

    def list_jobs(self, *, state: str | None = None, kind: str | None = None, name: str | None = None,
                  limit: int = 50, offset: int = 0) -> list[JobPublic]:
        params = {k: v for k, v in {"state": state, "kind": kind, "name": name}.items() if v is not None}
        rows = self._call("GET", "/v1/jobs", params={**params, "limit": limit, "offset": offset})
        return [JobPublic.model_validate(r) for r in rows]

    def job_events(self, job_id: str, after: int = 0) -> list[JobEventPublic]:
        rows = self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}/events", params={"after": after})
        return [JobEventPublic.model_validate(r) for r in rows]

    def follow_events(self, job_id: str, after: int = 0) -> Iterator[JobEventPublic]:
        """The job's events after `after` as they happen (server-sent events), until the job ends."""
        path = f"/v1/jobs/{quote(job_id, safe='')}/events/stream"
        try:
            with self._http.stream("GET", path, params={"after": after},
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response, f"the farm API at {self.base_url}")
                for event, data in parse_sse(response.iter_lines()):
                    if event == "end":
                        return
                    yield JobEventPublic.model_validate_json(data)
        except httpx.TransportError as exc:
            raise FarmError(f"lost the event stream from {self.base_url} ({type(exc).__name__}); "
                            f"resume with after={after}") from None

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel"))

    def wait(self, job_id: str, on_update: Callable[[JobPublic], None] | None = None,
             timeout: float | None = None) -> JobPublic:
        """Poll until the job ends; `on_update` sees every poll (the same loop as the local client's wait)."""
        return poll_until_finished(self.get_job, job_id, on_update=on_update, poll_seconds=self.poll_seconds,
                                   timeout=timeout)

    # ------------------------------------------------------------ adapters

    def list_adapters(self, name: str | None = None) -> list[AdapterPublic]:
        rows = self._call("GET", "/v1/adapters", params={"name": name} if name else None)
        return [AdapterPublic.model_validate(r) for r in rows]

    def get_adapter(self, ref: str) -> AdapterPublic:
        """NAME or NAME:VERSION; the files carry download URLs when the farm's store is S3."""
        from farm.service import parse_adapter_ref

        name, version = parse_adapter_ref(ref)
        path = f"/v1/adapters/{quote(name, safe='')}" + (f"/{version}" if version is not None else "")
        return AdapterPublic.model_validate(self._call("GET", path))

    def pull(self, ref: str, dest: Path) -> PullResult:
        """Download every file, verify each sha256 against the catalog and checksums.json, then rename into
        `dest`; on any mismatch nothing appears at `dest`."""
        from farm.store.transfer import download_tree

        view = self.get_adapter(ref)
        files = ApiAdapterFiles(self, view)
        expected = {f.path: f.sha256 for f in view.files}
        download_tree(files, files.folder, Path(dest), expected=expected)
        return PullResult(name=view.name, version=view.version, dest=str(Path(dest).resolve()), files=view.files)

    def _download(self, url: str, path: Path, *, api: bool) -> HashingWriter:
        """Stream `url` into `path` atomically, hashing the bytes written."""
        client = self._http if api else self._plain
        try:
            with client.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    if api:
                        raise error_from_response(response, f"the farm API at {self.base_url}")
                    raise StoreError(f"downloading {path.name} from the store failed with HTTP "
                                     f"{response.status_code}; its URL may have expired: pull again")
                return write_atomically(path, _ChunkReader(response.iter_bytes(CHUNK_SIZE)))
        except httpx.TransportError as exc:
            raise StoreError(f"downloading {path.name} failed ({type(exc).__name__}: {exc}); pull again") from None


class _ChunkReader:
    """read() over an iterator of byte chunks (what write_atomically consumes)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = iter(chunks)

    def read(self, _size: int = -1) -> bytes:
        for chunk in self._chunks:
            if chunk:
                return chunk
        return b""


class ApiAdapterFiles(Store):
    """One adapter version's files as the API serves them, seen as a read-only Store.

    Keys are ``<name>/<version>/files/<path>`` under ``<api>/v1/adapters/``, so each key's URI is its download
    route. A file is fetched from its presigned URL when the API gave one (S3), else from that route.
    """

    def __init__(self, client: HttpClient, view: AdapterPublic):
        self.client = client
        self.folder = f"{view.name}/{view.version}/files"
        self.files: dict[str, AdapterFilePublic] = {f"{self.folder}/{f.path}": f for f in view.files}

    def uri(self, key: str) -> str:
        return f"{self.client.base_url}/v1/adapters/{quote(key)}"

    def uri_root(self) -> str:
        return f"{self.client.base_url}/v1/adapters/"

    def _entry(self, key: str) -> AdapterFilePublic:
        entry = self.files.get(key)
        if entry is None:
            raise NotFound(f"no file {key!r} in this adapter version")
        return entry

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        entry = self._entry(key)
        url = entry.url or self.uri(key)
        writer = self.client._download(url, Path(path), api=entry.url is None)
        return ObjectInfo(key=key, size=writer.bytes_written, sha256=writer.hexdigest(), etag=None)

    def get_bytes(self, key: str) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.get_file(key, Path(tmp) / "file")
            return (Path(tmp) / "file").read_bytes()

    def exists(self, key: str) -> bool:
        return key in self.files

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.files if k.startswith(prefix))

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return self._entry(key).url

    def _read_only(self, *_args, **_kwargs):
        raise StoreError("an adapter seen through the farm API is read-only")

    put_file = put_bytes = delete = delete_prefix = _read_only
