"""Tables of the catalog. The broker only rings the bell; every state lives here."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",  # every column: two uniques may share the first
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Job states. Terminal ones never change again.
QUEUED, RUNNING, RECOVERING, CANCELLING = "queued", "running", "recovering", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
CLAIMABLE_STATES = (QUEUED, RECOVERING)
ACTIVE_STATES = (RUNNING, CANCELLING)
JOB_STATES = (QUEUED, RUNNING, RECOVERING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)

# Adapter version states: a reserved version becomes visible only when ready.
PUBLISHING, READY = "publishing", "ready"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A UTC timestamp, read back timezone-aware on every database.

    PostgreSQL stores ``timestamptz``; SQLite stores naive text, so values are converted to UTC on the way in and
    tagged UTC on the way out. Without this, SQLite hands back naive datetimes that cannot be compared with
    aware ones (TypeError), and a non-UTC aware value would be stored as if it were UTC.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self):
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        # A naive value is taken to be UTC already (what utcnow().replace(tzinfo=None) and SQLite produce).
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict: JSON, list: JSON, datetime: UTCDateTime}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    queue: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    submitted_by: Mapped[str | None] = mapped_column(String(128))
    # Fencing token: bumped by every successful claim; writes carry it and are refused when it moved on.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[dict | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    checkpoints: Mapped[list[Checkpoint]] = relationship(back_populates="job", order_by="Checkpoint.step")


class JobEvent(Base):
    """Every state transition, progress report, checkpoint and eval of a job, in order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    type: Mapped[str] = mapped_column(String(16))  # state | progress | eval | checkpoint | log
    state: Mapped[str | None] = mapped_column(String(16))
    data: Mapped[dict | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="events")


class Checkpoint(Base):
    """A resumable checkpoint in the store under jobs/<job_id>/checkpoints/step-<k>/."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    prefix: Mapped[str] = mapped_column(String(512))
    files: Mapped[list] = mapped_column(JSON)  # [{path, size, sha256}]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="checkpoints")


class Adapter(Base):
    """One published adapter version and its provenance."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version"), UniqueConstraint("job_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=PUBLISHING)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(512))  # store key prefix adapters/<name>/v<N>/
    base_model: Mapped[str | None] = mapped_column(String(1024))
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    dataset_uri: Mapped[str | None] = mapped_column(String(1024))
    dataset_sha256: Mapped[str | None] = mapped_column(String(64))
    source_model: Mapped[str | None] = mapped_column(String(1024))  # extraction: the fine-tuned model
    source_model_sha256: Mapped[str | None] = mapped_column(String(64))
    parent_adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    spec_hash: Mapped[str] = mapped_column(String(64))
    provenance: Mapped[dict | None] = mapped_column(JSON)  # the full metadata.json
    metrics: Mapped[dict | None] = mapped_column(JSON)  # final metrics summary
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    files: Mapped[list[AdapterFile]] = relationship(back_populates="adapter", order_by="AdapterFile.path")


class AdapterFile(Base):
    __tablename__ = "adapter_files"
    __table_args__ = (UniqueConstraint("adapter_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    etag: Mapped[str | None] = mapped_column(String(128))

    adapter: Mapped[Adapter] = relationship(back_populates="files")


# ---------------------------------------------------------------- issue 12 (catalog at scale)

# ---------------------------------------------------------------- issue 13 (base models, checkpoints, merge)

# ---------------------------------------------------------------- issue 14 (automation)

# ---------------------------------------------------------------- issue 15 (routing, sharing)

# ---------------------------------------------------------------- issue 10 (co-training)

# ---------------------------------------------------------------- issue 16 (console)

# ---------------------------------------------------------------- issue 11 (recovery, hardening)
