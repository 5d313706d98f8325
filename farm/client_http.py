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
from farm.errors import DatasetError, FarmError, NotFound, StoreError, error_class
from farm.names import STORE_REF, is_store_ref, parse_adapter_ref  # noqa: F401 (STORE_REF kept importable here)
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


def error_from_response(response: httpx.Response, where: str) -> FarmError:
    """The FarmError an error response stands for: {"code", "message", "field"} from the API, else a generic one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str):
        cls = error_class(body["code"]) or FarmError  # raised again as the class the server raised
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

    # one network blip (a refused connection, a proxy's 502/503/504) must not abort a long
    # `farm submit --wait`. Idempotent calls are tried again with exponential backoff; a POST is sent once.
    retries = 4
    backoff_s = 0.25
    backoff_max_s = 4.0
    RETRY_STATUSES = frozenset({502, 503, 504})
    IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send a request; an idempotent one is retried on connection errors and 502/503/504 with backoff."""
        import random
        import time

        tries = 1 + (self.retries if method.upper() in self.IDEMPOTENT else 0)
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise FarmError(f"cannot reach the farm API at {self.base_url} ({type(exc).__name__}: {exc}); "
                                    "check FARM_API_URL and that the API runs there") from None
            else:
                if last or response.status_code not in self.RETRY_STATUSES:
                    return response
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
            time.sleep(delay * (0.5 + random.random() / 2))  # jitter: many clients do not retry in step
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self._request(method, path, **kwargs)
        if not response.is_success:
            raise error_from_response(response, f"the farm API at {self.base_url}")
        return response.json()

    transfer_progress = None
    """A factory (label, total bytes) -> context manager with advance(n): a bar for uploads and pulls."""

    def _transfer(self, label: str, total: int | None):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if self.transfer_progress is None:
                yield lambda n: None
                return
            with self.transfer_progress(label, total) as progress:
                yield progress.advance

        return bar()

    def served_queues(self) -> set[str]:
        """The queues some live worker consumes (GET /v1/workers)."""
        return {q for w in self._call("GET", "/v1/workers") for q in w.get("queues", [])}

    def job_log(self, job_id: str, attempt: int | None = None) -> tuple[int, str]:
        """(attempt, text) of the runner's log of an attempt (the latest by default)."""
        params = {"attempt": attempt} if attempt is not None else None
        response = self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/logs", params=params)
        if not response.is_success:
            raise error_from_response(response, f"the farm API at {self.base_url}")
        return int(response.headers.get("x-farm-attempt", attempt or 0)), response.text

    # ------------------------------------------------------------ jobs

    def submit(self, spec_path: Path, force: bool = False) -> JobPublic:
        """Load and check the spec here, upload its local datasets, then submit it (the server checks it again)."""
        spec = load_spec(spec_path)
        for field in ("base_model", "finetuned_model"):  # the server reads no path of ours; say it here
            ref = getattr(spec, field, None)
            if ref and ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
                from farm.errors import ModelError

                raise ModelError(f"{field}: {ref}: no such model directory", field=field)
        if isinstance(spec, TrainSpec):
            updates = {}
            for name in ("path", "eval_path"):
                ref = getattr(spec.dataset, name)
                if ref and not is_store_ref(ref) and "://" not in ref:
                    updates[name] = self.upload_dataset(ref, spec.dataset.format, field=f"dataset.{name}").uri
            if updates:
                spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update=updates)})
        params = {"force": "true"} if force else None  # skip dedupe
        return JobPublic.model_validate(self._call("POST", "/v1/jobs", json=spec_to_dict(spec), params=params))

    def upload_dataset(self, path: str | Path, fmt: str, *, field: str = "dataset.path") -> DatasetPublic:
        """Check a local JSONL file line by line (the local submit's checks and messages), then upload it."""
        try:
            info = validate_dataset(path, fmt)
            with open(path, "rb") as fh, self._transfer(f"upload {Path(path).name}", info.size) as advance:
                data = self._call(
                    "POST", "/v1/datasets",
                    params={"format": fmt, "filename": str(path)},
                    content=_counted(iter(lambda: fh.read(CHUNK_SIZE), b""), advance),
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
        """The job's events after `after` as they happen (server-sent events), until the job ends.

        A dropped stream (or a 502/503/504 from a proxy) is reopened after the last event received, with backoff,
        up to `retries` times in a row: no event is lost or repeated.
        """
        import time

        path = f"/v1/jobs/{quote(job_id, safe='')}/events/stream"
        failures = 0
        while True:
            try:
                with self._http.stream("GET", path, params={"after": after},
                                       timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as response:
                    if response.status_code in self.RETRY_STATUSES and failures < self.retries:
                        raise httpx.RemoteProtocolError(f"HTTP {response.status_code}")
                    if not response.is_success:
                        response.read()
                        raise error_from_response(response, f"the farm API at {self.base_url}")
                    for event, data in parse_sse(response.iter_lines()):
                        if event == "end":
                            return
                        ev = JobEventPublic.model_validate_json(data)
                        after, failures = ev.id, 0
                        yield ev
                return  # the server closed the stream without `end`: nothing more to follow
            except httpx.TransportError as exc:
                if failures >= self.retries:
                    raise FarmError(f"lost the event stream from {self.base_url} ({type(exc).__name__}); "
                                    f"resume with after={after}") from None
                time.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** failures))
                failures += 1

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
        name, version = parse_adapter_ref(ref)
        path = f"/v1/adapters/{quote(name, safe='')}" + (f"/{version}" if version is not None else "")
        return AdapterPublic.model_validate(self._call("GET", path))

    def pull(self, ref: str, dest: Path) -> PullResult:
        """Download every file, verify each sha256 against the catalog and checksums.json, then rename into
        `dest`; on any mismatch nothing appears at `dest`."""
        from farm.store.transfer import download_tree

        from farm.store.progress import CountingStore

        view = self.get_adapter(ref)
        files = ApiAdapterFiles(self, view)
        expected = {f.path: f.sha256 for f in view.files}
        with self._transfer(f"pull {view.name}:{view.version}", sum(f.size for f in view.files)) as advance:
            download_tree(CountingStore(files, advance), files.folder, Path(dest), expected=expected)
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


def _counted(chunks: Iterator[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


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
