"""One client interface for the CLI, two implementations: the local service layer, or the farm's HTTP API.

`get_client()` picks by settings: FARM_API_URL set -> HTTP (farm.client_http.HttpClient), else local. Each
client imports what it needs only when it is made: the HTTP client never loads the service layer (SQLAlchemy,
Celery, the store's S3 code), and the local one loads the service layer when it is first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from farm.settings import FarmSettings, get_settings

if TYPE_CHECKING:
    from farm.schemas import AdapterPublic, JobEventPublic, JobPublic, PullResult


class FarmClient(Protocol):
    def submit(self, spec_path: Path, force: bool = False) -> JobPublic: ...
    def get_job(self, job_id: str) -> JobPublic: ...
    def list_jobs(self, *, state: str | None = None, kind: str | None = None, name: str | None = None,
                  limit: int = 50, offset: int = 0) -> list[JobPublic]: ...
    def job_events(self, job_id: str, after: int = 0) -> list[JobEventPublic]: ...
    def cancel(self, job_id: str) -> JobPublic: ...
    def wait(self, job_id: str, on_update: Callable[[JobPublic], None] | None = None,
             timeout: float | None = None) -> JobPublic: ...
    def list_adapters(self, name: str | None = None) -> list[AdapterPublic]: ...
    def get_adapter(self, ref: str) -> AdapterPublic: ...
    def pull(self, ref: str, dest: Path) -> PullResult: ...


def _service():
    from farm import service

    return service


class LocalClient:
    """Calls the service layer in-process (needs the catalog, broker and store settings)."""

    transfer_progress = None
    """A factory (label, total bytes) -> context manager with advance(n): bars on dataset uploads and
    pulls, as on farm.client_http.HttpClient (the CLI sets it when stderr is a terminal)."""

    def __init__(self, settings: FarmSettings | None = None):
        self.settings = settings or get_settings()

    def submit(self, spec_path: Path, force: bool = False) -> JobPublic:
        from farm.store.progress import transfer_bars

        with transfer_bars(self.transfer_progress):
            return _service().submit_job(Path(spec_path), settings=self.settings, force=force)

    def get_job(self, job_id: str) -> JobPublic:
        return _service().get_job(job_id, settings=self.settings)

    def list_jobs(self, *, state=None, kind=None, name=None, limit=50, offset=0) -> list[JobPublic]:
        return _service().list_jobs(state=state, kind=kind, name=name, limit=limit, offset=offset,
                                    settings=self.settings)

    def job_events(self, job_id: str, after: int = 0) -> list[JobEventPublic]:
        return _service().job_events(job_id, after=after, settings=self.settings)

    def cancel(self, job_id: str) -> JobPublic:
        return _service().cancel_job(job_id, settings=self.settings)

    def wait(self, job_id: str, on_update=None, timeout=None) -> JobPublic:
        return _service().wait_for_job(job_id, on_update=on_update, timeout=timeout, settings=self.settings)

    def list_adapters(self, name=None) -> list[AdapterPublic]:
        return _service().list_adapters(name, settings=self.settings)

    def get_adapter(self, ref: str) -> AdapterPublic:
        return _service().get_adapter(ref, settings=self.settings)

    def pull(self, ref: str, dest: Path) -> PullResult:
        if self.transfer_progress is None:
            return _service().pull_adapter(ref, dest, settings=self.settings)
        view = _service().get_adapter(ref, settings=self.settings)
        with self.transfer_progress(f"pull {view.name}:{view.version}", sum(f.size for f in view.files)) as bar:
            return _service().pull_adapter(f"{view.name}:{view.version}", dest, settings=self.settings,
                                           on_bytes=bar.advance)


def get_client(settings: FarmSettings | None = None) -> FarmClient:
    """HTTP client when FARM_API_URL is set, else the local service layer."""
    settings = settings or get_settings()
    if settings.api_url:
        from farm.client_http import HttpClient

        return HttpClient(settings)
    return LocalClient(settings)
