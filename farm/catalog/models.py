"""Tables of the catalog. The broker only rings the bell; every state lives here."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
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
    # train loss and eval loss at this step, for `farm checkpoints`
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)

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


# ---------------------------------------------------------------- catalog at scale
# `farm jobs` reads newest first (created_at DESC, id DESC), optionally for one state: each index hands those rows
# over in that order (scanned backwards), so a page of 50 reads 50 index entries instead of sorting the table.
Index("ix_jobs_created_at_id", Job.created_at, Job.id)
Index("ix_jobs_state_created_at_id", Job.state, Job.created_at, Job.id)

# ---------------------------------------------------------------- automation

class JobLineage(Base):
    """Why a job exists and what it is, by content: the dedupe key, and a replay's or a firing's origin."""

    __tablename__ = "job_lineage"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    # sha256 over kind, resolved spec without its name, base model hash, dataset digest (farm.automation.dedupe)
    content_key: Mapped[str] = mapped_column(String(64), index=True)
    origin: Mapped[str] = mapped_column(String(16), default="submit")  # submit | replay | retrain | schedule
    replay_of: Mapped[str | None] = mapped_column(String(80))  # name:version a replay reruns


class FeedbackRow(Base):
    """One learning event of an adapter's pool (a dataset row); `used_by_job_id` once a retraining took it."""

    __tablename__ = "feedback_rows"
    __table_args__ = (UniqueConstraint("adapter_name", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the row's canonical JSON: a row sent twice counts once
    row: Mapped[dict] = mapped_column(JSON)
    batch_key: Mapped[str] = mapped_column(String(512))  # store key of the file it arrived in
    used_by_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RetrainPolicy(Base):
    """`farm retrain NAME --every N`: retrain NAME once its pool holds N new rows (overrides a spec's retrain:)."""

    __tablename__ = "retrain_policies"
    __table_args__ = (UniqueConstraint("adapter_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(String(64))
    every: Mapped[int] = mapped_column(Integer)
    replay: Mapped[float] = mapped_column(default=0.5)
    max_steps: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RetrainRun(Base):
    """One retraining started from a pool; unique per pool content, so a pool never starts two jobs."""

    __tablename__ = "retrain_runs"
    __table_args__ = (UniqueConstraint("adapter_name", "pool_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(String(64))
    pool_sha256: Mapped[str] = mapped_column(String(64))  # sha256 of the sorted row hashes it learned from
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    parent: Mapped[str] = mapped_column(String(80))  # name:version it continues from
    rows: Mapped[list] = mapped_column(JSON)  # the row hashes (the events it learned from)
    replay_rows: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Schedule(Base):
    """A spec submitted on a cron expression or every N seconds by `farm beat`."""

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)  # the spec as given, local paths made absolute; validated per firing
    cron: Mapped[str | None] = mapped_column(String(128))
    every_seconds: Mapped[int | None] = mapped_column(Integer)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ScheduleFiring(Base):
    """One slot of a schedule, fired once: the unique (schedule, slot) makes a second beat's firing a no-op."""

    __tablename__ = "schedule_firings"
    __table_args__ = (UniqueConstraint("schedule_id", "slot_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), index=True)
    slot_at: Mapped[datetime] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(16))  # submitted | deduplicated | error
    job_id: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    fired_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """A job notification to one URL (the outbox); its id is the idempotency key, the same on every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "url", "event"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttempt(Base):
    """Every POST of a delivery: its HTTP status or the error."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


# ---------------------------------------------------------------- routing, sharing

class AdapterProfile(Base):
    """What an adapter version is for, as the router sees it: built at publish (or lazily, for older and imported
    versions) from the spec's description and tags, the name, and a sample of the training prompts."""

    __tablename__ = "adapter_profiles"
    __table_args__ = (UniqueConstraint("adapter_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list] = mapped_column(JSON)
    prompts: Mapped[list] = mapped_column(JSON)  # a sample of the training prompts
    text: Mapped[str] = mapped_column(Text)  # the document the ranker sees
    embedding_model: Mapped[str | None] = mapped_column(String(1024))  # FARM_ROUTER_MODEL that embedded `text`
    embedding: Mapped[list | None] = mapped_column(JSON)  # unit vector; '[..]' is also pgvector's text form
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AdapterOrigin(Base):
    """Where an imported adapter version came from (its job row is a job of kind `import`)."""

    __tablename__ = "adapter_origins"
    __table_args__ = (UniqueConstraint("adapter_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    farm_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(64))
    checksums_sha256: Mapped[str] = mapped_column(String(64))  # sha256 of the artifact's checksums.json
    source: Mapped[str] = mapped_column(String(1024))  # the bundle file or remote/name:version it came from
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Remote(Base):
    """Another farm's API. The token is never stored: only the name of the environment variable holding it."""

    __tablename__ = "remotes"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(1024))
    token_env: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FarmIdentity(Base):
    """This farm's id (one row, made on first use): recorded as the origin of the adapters it exports."""

    __tablename__ = "farm_identity"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
