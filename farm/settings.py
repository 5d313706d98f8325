"""Settings from the environment (prefix ``FARM_``), built once per process.

FarmSettings reads the environment as pydantic-settings' BaseSettings did for it (``env_prefix="FARM_"``,
case-insensitive names, JSON for list and dict fields, keyword arguments before the environment, defaults
validated), without importing pydantic-settings, whose import alone (every settings source: CLI, AWS, Azure, GCP,
TOML, YAML) cost a light producer such as `farm submit` more than building the settings.
"""

from __future__ import annotations

import json
import os
import typing
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "FARM_"
_JSON_ORIGINS = (list, dict, set, frozenset, tuple)


def _is_json_field(annotation) -> bool:
    """A field whose environment value is JSON: a list, dict, set or tuple, or a pydantic model."""
    origin = typing.get_origin(annotation) or annotation
    return origin in _JSON_ORIGINS or (isinstance(origin, type) and issubclass(origin, BaseModel))


def environment_values(cls: type[BaseModel], environ: typing.Mapping[str, str] | None = None) -> dict:
    """The fields of `cls` set in the environment: FARM_<FIELD> in any letter case; list and dict fields as JSON
    (a value that is not JSON raises ValueError naming the field)."""
    env = {key.lower(): value for key, value in (os.environ if environ is None else environ).items()}
    found = {}
    for name, field in cls.model_fields.items():
        value = env.get(f"{ENV_PREFIX.lower()}{name}")
        if value is None:
            continue
        if _is_json_field(field.annotation):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} is not JSON") from None
        found[name] = value
    return found


class FarmSettings(BaseModel):
    """Where the farm's services live. Defaults run everything on one machine (embedded mode)."""

    model_config = ConfigDict(extra="ignore", validate_default=True, arbitrary_types_allowed=True)

    def __init__(self, **values) -> None:
        """Keyword arguments win over the environment (a dict field merges the two, keys given here winning)."""
        merged = environment_values(type(self))
        for name, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(name), dict):
                value = {**merged[name], **value}
            merged[name] = value
        super().__init__(**merged)

    home: Path = Field(Path(".farm"), description="Local state folder for the embedded defaults.")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the Celery broker.")
    database_url: str = Field("sqlite:///.farm/catalog.db", description="SQLAlchemy URL of the catalog.")
    store_url: str = Field("file://.farm/store", description="file://DIR or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); None for AWS.")
    s3_region: str | None = Field(None, description="S3 region name.")
    work_dir: Path = Field(Path(".farm/work"), description="Scratch space of workers (job inputs, outputs).")
    cache_dir: Path = Field(Path(".farm/cache"), description="Worker cache of downloaded models and datasets.")
    # the s3:// and farm: model cache under cache_dir/models is bounded; least recently used goes first
    model_cache_max_gb: float = Field(200.0, gt=0, description="Size bound of the worker's model cache (GiB).")

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
    # routing and sharing
    router_model: str | None = Field(None, description=(
        "Folder of a sentence-transformers model: `farm route` embeds profiles and queries with it instead of BM25."))
    router_threshold: float | None = Field(None, ge=0, le=1, description=(
        "Confidence below which no adapter fits a query (default 0.05 for BM25, 0.3 for embeddings)."))
    bundle_max_bytes: int = Field(
        16 * 1024 ** 3, ge=1024, description="Largest adapter bundle `farm import` reads (all files together).")
    # webhooks, schedules
    webhook_urls: list[str] = Field(default_factory=list, description=(
        "JSON list of URLs told about every job's end (besides a spec's notify.url)."))
    webhook_secret: SecretStr | None = Field(None, description="Key of the X-Farm-Signature HMAC-SHA256 of the body.")
    webhook_max_attempts: int = Field(8, ge=1, description="POSTs of one notification before it is given up.")
    webhook_backoff_seconds: float = Field(
        5.0, gt=0, description="Wait before the 2nd POST; doubles after each failure (capped at one hour).")
    beat_interval_seconds: float = Field(
        5.0, gt=0, description="How often `farm beat` reads the schedules and retraining pools from the catalog.")
    runner_memory_limit_mb: int | None = Field(None, ge=256, description=(
        "Cap on a runner's address space (RLIMIT_AS); a job that needs more runs out of memory and is retried "
        "with a halved micro-batch."))
    # co-training
    cotrain_max: int = Field(4, ge=1, le=64, description=(
        "Most training jobs one worker trains together on one shared base (same base, quantization, dtype, "
        "devices); 1 turns co-training off."))
    # the API's trust boundary and limits
    model_roots: list[Path] = Field(default_factory=list, description=(
        "JSON list of folders under which an API caller may name a local base model; none: no local paths."))
    api_max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body (a spec) the API reads; larger ones get 413.")
    api_max_upload_bytes: int = Field(
        4 * 1024 ** 3, ge=1024,
        description="Largest dataset or bundle upload (POST /v1/datasets, /v1/bundles) the API takes; larger: 413.")
    reaper_interval_seconds: float | None = Field(
        None, gt=0, description="Seconds between two rounds of the lease reaper; default a quarter of the lease.")

    @field_validator("home", "work_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Runners work in their own job folder: relative paths would point elsewhere there.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _under_home(self) -> FarmSettings:
        # FARM_HOME is the one home of the farm's local state; what is not set on its own lives there.
        home = self.home
        derived = {"database_url": f"sqlite:///{home}/catalog.db", "store_url": f"file://{home}/store",
                   "work_dir": home / "work", "cache_dir": home / "cache"}
        for name, value in derived.items():
            if name not in self.model_fields_set:
                object.__setattr__(self, name, value)
        return self


@lru_cache(maxsize=1)
def get_settings() -> FarmSettings:
    """The process-wide settings object (tests clear the cache after changing the environment). A FARM_* variable
    with an unusable value raises SettingsError naming the variable (the CLI prints it as one line)."""
    from pydantic import ValidationError

    from farm.errors import SettingsError

    try:
        return FarmSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else ""
        variable = f"{ENV_PREFIX}{name.upper()}" if name else "a FARM_* variable"
        raise SettingsError(f"{variable}: {first['msg']}; fix it in the environment "
                            f"({len(exc.errors())} problem(s) in all)", field=variable) from None
    except ValueError as exc:  # a list or dict variable that is not JSON
        raise SettingsError(f"{exc}: give it as JSON, like '[\"a\", \"b\"]'") from None
