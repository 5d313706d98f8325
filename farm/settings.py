"""Settings from the environment (prefix ``FARM_``), built once per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FarmSettings(BaseSettings):
    """Where the farm's services live. Defaults run everything on one machine (embedded mode)."""

    model_config = SettingsConfigDict(env_prefix="FARM_", extra="ignore")

    home: Path = Field(Path(".farm"), description="Local state folder for the embedded defaults.")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the Celery broker.")
    database_url: str = Field("sqlite:///.farm/catalog.db", description="SQLAlchemy URL of the catalog.")
    store_url: str = Field("file://.farm/store", description="file://DIR or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); None for AWS.")
    s3_region: str | None = Field(None, description="S3 region name.")
    work_dir: Path = Field(Path(".farm/work"), description="Scratch space of workers (job inputs, outputs).")
    cache_dir: Path = Field(Path(".farm/cache"), description="Worker cache of downloaded models and datasets.")

    lease_seconds: int = Field(120, ge=5, description="How long a claim lasts without a heartbeat.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker renews its lease.")
    max_attempts: int = Field(3, ge=1, description="Attempts per job before it ends failed.")
    requeue_after_seconds: float = Field(
        300, gt=0, description="A waiting job this quiet with no message in the broker gets its doorbell again.")
    max_group_size: int = Field(8, ge=1, description="Largest device group any worker serves; bigger jobs are refused.")
    visibility_timeout: int = Field(
        7 * 24 * 3600, description="Redis re-delivery timeout; above the longest job (celery#5935)."
    )

    api_url: str | None = Field(None, description="When set, the CLI talks to this farm API instead of locally.")
    api_token: SecretStr | None = Field(None, description="Bearer token the CLI sends to the API.")
    api_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="API tokens as a JSON object name -> token."
    )
    flower_basic_auth: SecretStr | None = Field(None, description="user:password for Flower.")

    @field_validator("home", "work_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Runners work in their own job folder: relative paths would point elsewhere there.
        return value.expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> FarmSettings:
    """The process-wide settings object (tests clear the cache after changing the environment)."""
    return FarmSettings()
