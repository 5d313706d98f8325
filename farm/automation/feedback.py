"""Learning events: rows sent to a published adapter (`farm feedback NAME FILE.jsonl`, POST
/v1/adapters/{name}/feedback) join its event pool, in the catalog (one row each) and the store (the file as it
came, content-addressed under feedback/<name>/<sha256>.jsonl).

Rows are validated in the adapter's dataset format exactly as a dataset is (farm.datasets: the error names the
line). A row is identified by the sha256 of its canonical JSON: a row sent twice counts once.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import func, select

from farm.catalog import repository as repo
from farm.catalog.models import FeedbackRow, Job
from farm.catalog.session import session_scope
from farm.datasets import validate_dataset
from farm.errors import DatasetError, SpecError
from farm.settings import FarmSettings, get_settings


@dataclass
class FeedbackResult:
    """What a feedback upload did."""

    adapter: str
    received: int
    """Rows in the upload."""
    added: int
    """Rows new to the pool (the rest were sent before)."""
    pool_new: int
    """Rows of the pool no retraining has used yet."""
    every: int | None
    """The retraining policy's threshold (None: no policy, the pool only collects)."""
    retrain_job: str | None = None
    """Id of the retraining job this upload started, if any."""

    def to_dict(self) -> dict:
        return asdict(self)


def row_sha256(row: dict) -> str:
    """sha256 of a row's canonical JSON (sorted keys, no spaces): its identity in the pool."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


def adapter_format(session, name: str) -> str:
    """The dataset format of the adapter's latest version (its rows must be in it)."""
    adapter = repo.get_adapter(session, name)
    job = session.get(Job, adapter.job_id)
    spec = (job.spec if job is not None else None) or {}
    fmt = (spec.get("dataset") or {}).get("format")
    if spec.get("kind") != "train" or not fmt:
        raise SpecError(f"adapter {name!r} was not trained from a dataset ({spec.get('kind', 'unknown')} job): "
                        "feedback goes to trained adapters")
    return fmt


def _insert_ignoring_duplicates(session, values: list[dict]) -> int:
    """INSERT … ON CONFLICT DO NOTHING on (adapter_name, sha256); returns the rows inserted."""
    if not values:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = (insert(FeedbackRow).values(values).on_conflict_do_nothing(index_elements=["adapter_name", "sha256"])
            .returning(FeedbackRow.id))
    return len(session.execute(stmt).all())


def add_feedback(name: str, path: str | Path, *, source: str | None = None, settings: FarmSettings | None = None,
                 trigger: bool = True) -> FeedbackResult:
    """Validate a JSONL file of rows in the adapter's format and add them to its pool; then start a retraining
    when the policy's threshold is reached (farm.automation.retrain.maybe_retrain).

    `source` is the name error messages use for the file (an upload's temp file means nothing to its sender).
    Nothing is added when a line is bad.
    """
    from farm.store import open_store

    settings = settings or get_settings()
    path = Path(path)
    with session_scope(settings.database_url) as session:
        fmt = adapter_format(session, name)
    try:
        info = validate_dataset(path, fmt)
    except DatasetError as exc:
        if source:
            exc.message = exc.message.replace(str(path), source)
            exc.args = (exc.message,)
        exc.field = "feedback"
        raise
    rows, seen = [], set()
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                row = json.loads(raw)
                digest = row_sha256(row)
                if digest not in seen:
                    seen.add(digest)
                    rows.append((digest, row))
    key = f"feedback/{name}/{info.sha256}.jsonl"
    store = open_store(settings.store_url, settings)
    if not store.exists(key):
        store.put_file(path, key)
    with session_scope(settings.database_url) as session:
        added = _insert_ignoring_duplicates(session, [
            {"adapter_name": name, "sha256": d, "row": r, "batch_key": key} for d, r in rows])
    from farm.automation.retrain import effective_policy, maybe_retrain

    job = maybe_retrain(name, settings=settings) if trigger else None
    with session_scope(settings.database_url) as session:
        policy = effective_policy(session, name)
        pool_new = pool_size(session, name)
    return FeedbackResult(adapter=name, received=info.examples, added=added, pool_new=pool_new,
                          every=policy.every if policy else None, retrain_job=job.id if job else None)


def add_feedback_bytes(name: str, body: bytes, *, settings: FarmSettings | None = None) -> FeedbackResult:
    """add_feedback for an upload (the API's request body); errors name it `feedback:<line>`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feedback.jsonl"
        path.write_bytes(body)
        return add_feedback(name, path, source="feedback", settings=settings)


def pool_size(session, name: str) -> int:
    """Rows of the adapter's pool no retraining has used yet."""
    return session.scalar(select(func.count()).select_from(FeedbackRow).where(
        FeedbackRow.adapter_name == name, FeedbackRow.used_by_job_id.is_(None))) or 0
