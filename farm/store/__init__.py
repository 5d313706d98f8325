"""Object storage for artifacts, checkpoints and datasets: ``file://DIR`` or ``s3://bucket/prefix``.

    store = open_store()                      # FARM_STORE_URL, FARM_S3_ENDPOINT_URL, FARM_S3_REGION
    info = store.put_file(Path("a.json"), "adapters/x/v1/a.json")   # ObjectInfo(key, size, sha256, etag)
    upload_tree(store, Path("out"), "adapters/x/v1")                # checksums.json written last
    download_tree(store, "adapters/x/v1", Path("x-v1"))             # verified, then renamed into place
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from farm.errors import StoreError
from farm.settings import FarmSettings, get_settings
from farm.store.base import ObjectInfo, Store, sha256_file, validate_key, validate_prefix
from farm.store.local import LocalStore
from farm.store.transfer import download_prefix, download_tree, upload_tree

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "Store",
    "download_prefix",
    "download_tree",
    "open_store",
    "sha256_file",
    "upload_tree",
    "validate_key",
]


def open_store(url: str | None = None, settings: FarmSettings | None = None) -> Store:
    """Open the store at `url` (default: settings.store_url, i.e. FARM_STORE_URL).

    ``file://DIR``: a folder, relative to the current directory unless absolute (``file:///srv/farm``); created if
    missing. ``s3://bucket/prefix``: an S3 bucket, through settings.s3_endpoint_url (FARM_S3_ENDPOINT_URL; unset for
    AWS) and settings.s3_region; credentials from the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).
    """
    settings = settings or get_settings()
    url = url if url is not None else settings.store_url
    if not isinstance(url, str) or "://" not in url:
        raise StoreError(
            f"FARM_STORE_URL={url!r} is not a store URL: use file://DIR or s3://bucket/prefix", field="store_url"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":
        folder = unquote(url[len("file://") :])
        if not folder:
            raise StoreError(
                "FARM_STORE_URL='file://' names no folder: use file://DIR (relative) or file:///abs/dir",
                field="store_url",
            )
        return LocalStore(folder)
    if scheme == "s3":
        from farm.store.s3 import S3Store

        parts = urlsplit(url)
        if not parts.netloc:
            raise StoreError(f"FARM_STORE_URL={url!r} names no bucket: use s3://bucket/prefix", field="store_url")
        prefix = unquote(parts.path).strip("/")
        try:
            validate_prefix(prefix)
        except StoreError as exc:
            raise StoreError(f"FARM_STORE_URL={url!r} has a bad prefix: {exc.message}", field="store_url") from None
        try:
            return S3Store(parts.netloc, prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            raise StoreError(
                f"FARM_S3_ENDPOINT_URL={settings.s3_endpoint_url!r} is not usable: {exc}; give a URL like "
                "http://127.0.0.1:9000",
                field="s3_endpoint_url",
            ) from None
    raise StoreError(
        f"FARM_STORE_URL={url!r} has an unknown scheme {scheme!r}: use file://DIR or s3://bucket/prefix",
        field="store_url",
    )
