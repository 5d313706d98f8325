"""What the CLI moves through the farm's HTTP API besides adapters and datasets (issues 13 and 15).

- a checkpoint's adapter folder (`farm pull JOB@step-K DEST`), every file verified against the catalog's sha256;
- an adapter bundle out (`farm export NAME[:V] FILE.tar`): streamed into a temporary file beside FILE.tar, its
  size and sha256 checked against what the API announced, then renamed;
- a bundle in (`farm import FILE.tar`): uploaded to POST /v1/bundles, where the farm verifies every byte before
  it writes anything (farm.bundles.import_bundle).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

import httpx

from farm.bundles import ExportResult, ImportResult
from farm.client_http import ApiAdapterFiles, HttpClient, _counted, error_from_response
from farm.errors import BundleError, FarmError
from farm.names import adapter_ref
from farm.schemas import AdapterFilePublic, PullResult
from farm.store.base import CHUNK_SIZE


class ApiCheckpointFiles(ApiAdapterFiles):
    """One checkpoint's adapter folder as the API serves it (GET /v1/jobs/{id}/checkpoints/{step}/files/{path})."""

    def __init__(self, client: HttpClient, job_id: str, step: int, files: list[AdapterFilePublic]):
        self.client = client
        self.folder = f"{job_id}/checkpoints/{step}/files"
        self.files = {f"{self.folder}/{f.path}": f for f in files}

    def uri(self, key: str) -> str:
        return f"{self.client.base_url}/v1/jobs/{quote(key)}"

    def uri_root(self) -> str:
        return f"{self.client.base_url}/v1/jobs/"


def pull_checkpoint(client: HttpClient, ref: str, dest: Path) -> PullResult:
    """Download checkpoint JOB@step-K's adapter folder through the API into `dest`, each file's sha256 checked
    against the catalog; on any mismatch nothing appears at `dest`."""
    from farm.checkpoints import parse_checkpoint_ref
    from farm.store.progress import CountingStore
    from farm.store.transfer import download_prefix

    job_ref, step = parse_checkpoint_ref(ref)
    data = client._call("GET", f"/v1/jobs/{quote(job_ref, safe='')}/checkpoints/{step}")
    files = [AdapterFilePublic.model_validate(f) for f in data["files"]]
    store = ApiCheckpointFiles(client, data["job_id"], data["step"], files)
    with client._transfer(f"pull {data['job_id'][:8]}@step-{step}", sum(f.size for f in files)) as advance:
        records = download_prefix(CountingStore(store, advance), store.folder, Path(dest),
                                  expected={f.path: f.sha256 for f in files})
    return PullResult(name=f"{data['job_id']}@step-{data['step']}", version=data["step"],
                      dest=str(Path(dest).resolve()),
                      files=[AdapterFilePublic(path=r["path"], size=r["size"], sha256=r["sha256"]) for r in records])


def export_bundle(client: HttpClient, ref: str, dest: Path) -> ExportResult:
    """Write adapter `ref` as a bundle at `dest` from the farm's API (GET /v1/adapters/{name}/{version}/bundle).

    The bytes land in a temporary file beside `dest`, renamed only when their count and sha256 match the
    Content-Length and X-Farm-Bundle-Sha256 the API sent. Raises FarmError (dest exists), BundleError (cut off or
    changed in transit), NotFound (unknown adapter)."""
    dest = Path(dest)
    if dest.exists():
        raise FarmError(f"{dest} already exists: choose a new file name for the bundle", field="file")
    if not dest.parent.is_dir():
        raise FarmError(f"{dest.parent} is not a folder: create it first or choose another path", field="file")
    view = client.get_adapter(ref)
    where = f"the farm API at {client.base_url}"
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    try:
        with client._http.stream("GET", f"/v1/adapters/{quote(view.name, safe='')}/{view.version}/bundle") as resp:
            if not resp.is_success:
                resp.read()
                raise error_from_response(resp, where)
            announced = resp.headers.get("content-length")
            sha = resp.headers.get("x-farm-bundle-sha256")
            with open(tmp, "wb") as fh, client._transfer(f"export {view.name}:{view.version}",
                                                         int(announced) if announced else None) as advance:
                for chunk in resp.iter_bytes(CHUNK_SIZE):
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    advance(len(chunk))
        if announced is not None and size != int(announced):
            raise BundleError(f"the bundle from {where} was cut off ({size} of {announced} bytes); export again")
        if sha and digest.hexdigest() != sha:
            raise BundleError(f"the bundle from {where} changed in transit (sha256 {digest.hexdigest()}, the API "
                              f"announced {sha}); export again")
        os.replace(tmp, dest)
    except httpx.TransportError as exc:
        raise BundleError(f"downloading the bundle of {view.name}:{view.version} from {where} failed "
                          f"({type(exc).__name__}: {exc}); export again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(adapter=adapter_ref(view.name, view.version), path=str(dest.resolve()), size=size,
                        sha256=digest.hexdigest(), files=len(view.files))


def import_bundle(client: HttpClient, path: Path, as_name: str | None = None) -> ImportResult:
    """Upload the bundle at `path` to POST /v1/bundles; the farm verifies every byte before it writes anything."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file", field="file")
    size = path.stat().st_size
    params = {"as_name": as_name} if as_name else None
    with open(path, "rb") as fh, client._transfer(f"import {path.name}", size) as advance:
        data = client._call("POST", "/v1/bundles", params=params,
                            content=_counted(iter(lambda: fh.read(CHUNK_SIZE), b""), advance),
                            headers={"Content-Type": "application/x-tar", "Content-Length": str(size)})
    return ImportResult.model_validate(data)
