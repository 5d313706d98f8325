"""A job's checkpoints as users see them: list them, pull one as a standard PEFT adapter, prune old ones.

A checkpoint lives in the store under jobs/<job_id>/checkpoints/step-<k>/ (farm.training.checkpoint describes
its files); its `adapter/` folder is a stock peft save_pretrained folder, so pulling that folder, verified
against the sha256 the catalog recorded at upload, gives an adapter `PeftModel.from_pretrained` loads.
Training keeps the newest `training.keep_checkpoints` in the store; after publishing, the job's checkpoints go
unless `training.keep_checkpoints_after_publish` is set.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from farm.errors import NotFound, SpecError
from farm.schemas import AdapterFilePublic, PullResult
from farm.settings import FarmSettings, get_settings

ADAPTER_DIR = "adapter/"
_CHECKPOINT_REF = re.compile(r"^(?P<job>[0-9a-fA-F]{4,32})@step-(?P<step>\d+)$")


class CheckpointPublic(BaseModel):
    """One stored checkpoint of a job."""

    job_id: str
    step: int
    """Optimizer steps done when it was saved."""
    loss: float | None = None
    """Train loss at that step."""
    eval_loss: float | None = None
    """Eval loss at that step (when the job evaluated there)."""
    size: int
    """Bytes in the store (adapter, optimizer and RNG state)."""
    created_at: datetime
    ref: str
    """JOB@step-K: what `farm pull` takes."""


def is_checkpoint_ref(ref: str) -> bool:
    """JOB@step-K (JOB a job id or a unique prefix of it)."""
    return "@" in ref


def parse_checkpoint_ref(ref: str) -> tuple[str, int]:
    """JOB@step-K -> (job id or prefix, K); SpecError when it is not that shape."""
    m = _CHECKPOINT_REF.match(ref.strip())
    if not m:
        raise SpecError(f"checkpoint reference {ref[:80]!r}: write JOB@step-K, as in 3f2a9c@step-40 "
                        "(list them with `farm checkpoints JOB`)")
    return m["job"].lower(), int(m["step"])


def _view(ckpt) -> CheckpointPublic:
    metrics = ckpt.metrics or {}
    return CheckpointPublic(job_id=ckpt.job_id, step=ckpt.step, loss=metrics.get("loss"),
                            eval_loss=metrics.get("eval_loss"), size=sum(int(f.get("size", 0)) for f in ckpt.files),
                            created_at=ckpt.created_at, ref=f"{ckpt.job_id}@step-{ckpt.step}")


def list_checkpoints(job_id: str, *, settings: FarmSettings | None = None) -> list[CheckpointPublic]:
    """The checkpoints of a job still in the store, oldest first (a unique job id prefix is accepted)."""
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_id)
        return [_view(c) for c in repo.list_checkpoints(session, job.id)]


def checkpoint_files(ref: str, *,
                     settings: FarmSettings | None = None) -> tuple[str, int, str, list[AdapterFilePublic]]:
    """(job id, step, store prefix of the adapter folder, its files with the catalog's sha256) of JOB@step-K.

    Raises SpecError (not JOB@step-K), NotFound (unknown job, no such step, no adapter folder in it)."""
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    settings = settings or get_settings()
    job_ref, step = parse_checkpoint_ref(ref)
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_ref)
        found = {c.step: c for c in repo.list_checkpoints(session, job.id)}
        if step not in found:
            have = ", ".join(f"step-{k}" for k in sorted(found)) or "none"
            raise NotFound(f"job {job.id} has no checkpoint at step {step} in the store (it has: {have}); list them "
                           f"with `farm checkpoints {job.id[:8]}`")
        job_id, prefix, files = job.id, found[step].prefix, found[step].files
    entries = [AdapterFilePublic(path=f["path"][len(ADAPTER_DIR):], size=int(f.get("size", 0)), sha256=f["sha256"])
               for f in files if f["path"].startswith(ADAPTER_DIR)]
    if not entries:
        raise NotFound(f"{ref}: the checkpoint holds no adapter folder")
    return job_id, step, prefix + ADAPTER_DIR, entries


def pull_checkpoint(ref: str, dest: str | Path, *, settings: FarmSettings | None = None) -> PullResult:
    """Download JOB@step-K's adapter folder, every file verified against the catalog, into `dest`.

    The result is a standard PEFT adapter folder. A mismatch raises ChecksumMismatch and leaves nothing at `dest`.
    """
    from farm.store import open_store
    from farm.store.transfer import download_prefix

    settings = settings or get_settings()
    job_id, step, prefix, entries = checkpoint_files(ref, settings=settings)
    records = download_prefix(open_store(settings.store_url, settings), prefix, Path(dest),
                              expected={e.path: e.sha256 for e in entries})
    return PullResult(name=f"{job_id}@step-{step}", version=step, dest=str(Path(dest).resolve()),
                      files=[AdapterFilePublic(path=r["path"], size=r["size"], sha256=r["sha256"], etag=r.get("etag"))
                             for r in records])


def prune_checkpoints(job_id: str, keep: int, *, settings: FarmSettings | None = None) -> list[int]:
    """Delete all but the newest `keep` checkpoints of a job (store objects first, then the catalog rows).

    keep=0 deletes them all (after publishing). Returns the steps deleted. The newest one is what a retry resumes
    from, so training never prunes it (keep >= 1).
    """
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope
    from farm.store import open_store

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        stored = [(c.step, c.prefix) for c in repo.list_checkpoints(session, job_id)]
    doomed = stored[:-keep] if keep > 0 else stored
    if not doomed:
        return []
    store = open_store(settings.store_url, settings)
    for _, prefix in doomed:
        store.delete_prefix(prefix)
    with session_scope(settings.database_url) as session:
        repo.delete_checkpoints(session, job_id, [step for step, _ in doomed])
    return [step for step, _ in doomed]


def prune_as_training_goes(job_id: str, *, settings: FarmSettings | None = None) -> list[int]:
    """After a checkpoint lands: keep the job's `training.keep_checkpoints` newest ones (default 3)."""
    keep = _training_setting(job_id, "keep_checkpoints", 3, settings)
    return prune_checkpoints(job_id, max(int(keep), 1), settings=settings)


def prune_after_publish(job_id: str, *, settings: FarmSettings | None = None) -> list[int]:
    """After the job published: delete its checkpoints unless `training.keep_checkpoints_after_publish`."""
    if _training_setting(job_id, "keep_checkpoints_after_publish", False, settings):
        return []
    return prune_checkpoints(job_id, 0, settings=settings)


def _training_setting(job_id: str, key: str, default, settings: FarmSettings | None):
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        training = (repo.get_job(session, job_id).spec or {}).get("training") or {}
    return training.get(key, default)
