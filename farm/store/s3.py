"""The s3:// store (AWS, MinIO, R2, moto): boto3's transfer manager, sha256 computed while bytes stream.

boto3 is imported lazily so that importing farm.store stays cheap for producers.
Credentials come from the standard AWS chain (env, config files, instance roles); they are never logged.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from farm.errors import NotFound, StoreError
from farm.store.base import (
    HashingReader,
    ObjectInfo,
    Store,
    open_source,
    require_prefix_to_delete,
    validate_key,
    validate_prefix,
)
from farm.store.local import temp_path_beside

MiB = 1024 * 1024
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # S3's limit for SigV4 presigned URLs
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_ACCESS_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}


def default_transfer_config():
    """Multipart above 8 MiB in 8 MiB parts, 8 threads; the classic (pure Python) transfer client.

    The classic client is pinned because the CRT one, picked automatically on some instance types, reads
    file objects differently; our hashing wrappers rely on the classic client's in-order streaming.
    """
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=8 * MiB,
        multipart_chunksize=8 * MiB,
        max_concurrency=8,
        use_threads=True,
        preferred_transfer_client="classic",
    )


_loader_lock = threading.Lock()
_shared_loader = None


def _new_boto3_session():
    """A fresh boto3 session (credentials resolved anew) that reuses one parsed copy of the service models.

    Parsing the S3 model is most of the cost of a client; sharing the loader makes open_store cheap enough to call
    per request.
    """
    global _shared_loader
    import boto3.session
    import botocore.session

    core = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _shared_loader)
    return boto3.session.Session(botocore_session=core)


def make_client(endpoint_url: str | None, region: str | None):
    """A boto3 S3 client for AWS or an S3-compatible endpoint."""
    from botocore.config import Config

    options: dict = {
        "region_name": region,
        "retries": {"max_attempts": 5, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 120,
        "max_pool_connections": 16,
        # SigV4 everywhere: R2 and recent MinIO refuse the legacy V2 signatures in presigned URLs.
        "signature_version": "s3v4",
    }
    if endpoint_url:
        # S3-compatible servers (MinIO, moto, most on-prem) want path-style addressing; and some of them reject
        # the CRC checksum trailers boto3 sends by default since 1.36. Integrity is ours anyway: every artifact
        # file is sha256-checked end to end.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return _new_boto3_session().client("s3", endpoint_url=endpoint_url, config=Config(**options))


def _hash_file(path: Path) -> tuple[int, str]:
    """Size and hex sha256 of a local file, read once in large chunks (just written: it is in the page cache)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _etag(response: dict) -> str | None:
    etag = response.get("ETag")
    return etag.strip('"') if etag else None


class S3Store(Store):
    """Objects under ``s3://bucket/prefix/``. `transfer_config` (a boto3 TransferConfig) may be replaced at will."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client=None,
        transfer_config=None,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if self.prefix:
            validate_prefix(self.prefix)
        self.endpoint_url = endpoint_url
        self.client = client if client is not None else make_client(endpoint_url, region)
        self.transfer_config = transfer_config if transfer_config is not None else default_transfer_config()

    # -- naming -------------------------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def uri_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _where(self) -> str:
        return f" at {self.endpoint_url}" if self.endpoint_url else ""

    @contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """Turn boto3/botocore failures into NotFound / StoreError messages that say what to do."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        target = self.uri(key) if key is not None else self.uri_root()
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND_CODES and key is not None:
                raise NotFound(f"no object {key!r} in the store {self.uri_root()}") from None
            if code == "NoSuchBucket":
                raise StoreError(
                    f"the bucket {self.bucket!r} does not exist{self._where()}; create it or fix FARM_STORE_URL"
                ) from None
            if code in _ACCESS_CODES:
                raise StoreError(
                    f"S3 refused to {action} {target}{self._where()} ({code}): check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy"
                ) from None
            message = error.get("Message", "")
            raise StoreError(f"S3 could not {action} {target}{self._where()}: {code} {message}") from None
        except NoCredentialsError:
            raise StoreError(
                f"no AWS credentials found to {action} {target}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the environment of this process"
            ) from None
        except EndpointConnectionError:
            raise StoreError(
                f"cannot reach the S3 endpoint {self.endpoint_url or 'of AWS'} to {action} {target}: "
                "check FARM_S3_ENDPOINT_URL and that the server is up"
            ) from None
        except (BotoCoreError, Boto3Error) as exc:
            text = str(exc)
            if "NoSuchBucket" in text:
                raise StoreError(
                    f"the bucket {self.bucket!r} does not exist{self._where()}; create it or fix FARM_STORE_URL"
                ) from None
            raise StoreError(f"S3 could not {action} {target}{self._where()}: {text}") from None

    # -- writing ------------------------------------------------------------------------------------------------
    def put_file(self, path: Path, key: str) -> ObjectInfo:
        full = self._full(key)
        with open_source(Path(path)) as f:
            reader = HashingReader(f)
            with self._errors("upload", key):
                self.client.upload_fileobj(reader, self.bucket, full, Config=self.transfer_config)
                head = self.client.head_object(Bucket=self.bucket, Key=full)
        if head["ContentLength"] != reader.bytes_read:
            raise StoreError(
                f"upload of {path} to {self.uri(key)} stored {head['ContentLength']} bytes but {reader.bytes_read} "
                "were sent (another writer replaced it?); upload again"
            )
        return ObjectInfo(key=key, size=reader.bytes_read, sha256=reader.hexdigest(), etag=_etag(head))

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        full = self._full(key)
        data = bytes(data)
        with self._errors("upload", key):
            response = self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        return ObjectInfo(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(), etag=_etag(response))

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> None:
        require_prefix_to_delete(prefix)
        keys = [self.prefix + key for key in self.list_keys(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            with self._errors("delete under", None):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"S3 could not delete {len(response['Errors'])} objects under {self.uri_root()}{prefix}, "
                    f"first {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
                )

    # -- reading ------------------------------------------------------------------------------------------------
    def get_file(self, key: str, path: Path) -> ObjectInfo:
        """Download to a temp file beside `path`, then hash it in one pass and rename it into place.

        The transfer manager writes into the temp file itself (a real, seekable file), so parts land at their
        offsets as they arrive. A non-seekable writer would make it buffer out-of-order parts, and with more parts
        than its in-memory window (s3transfer 0.19: 10) the download deadlocks.
        """
        full = self._full(key)
        path = Path(path)
        with self._errors("read", key):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_beside(path)
        try:
            with open(tmp, "wb") as f:
                with self._errors("download", key):
                    self.client.download_fileobj(self.bucket, full, f, Config=self.transfer_config)
                f.flush()
                os.fsync(f.fileno())
            size, digest = _hash_file(tmp)
            if size != head["ContentLength"]:
                raise StoreError(
                    f"download of {self.uri(key)} gave {size} bytes but the object has "
                    f"{head['ContentLength']} (it changed during the download?); download again"
                )
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size=size, sha256=digest, etag=_etag(head))

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("look up", key):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except NotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        keys = []
        with self._errors("list", None):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    if key and not key.endswith("/"):  # "folder" marker objects made by some S3 consoles
                        keys.append(key)
        return sorted(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        full = self._full(key)
        if not 1 <= int(expires_s) <= MAX_PRESIGN_SECONDS:
            raise StoreError(f"expires_s={expires_s} is out of range: S3 presigned URLs last 1 s to 7 days (604800 s)")
        with self._errors("sign a URL for", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=int(expires_s)
            )
