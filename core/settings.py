"""Service settings, read from `AFINA_*` environment variables (and a `.env` file).

The defaults give the embedded mode: SQLite, the Celery broker and the artifacts all under
`AFINA_DATA_DIR`, so `afina serve` needs no other service.
"""

import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, TypeAdapter, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from afina.core.job_config import QUEUE_PATTERN

MiB = 1024 * 1024
DEFAULT_PROJECT = "default"
PROJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
API_KEY = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries as it was sent
# A queue a worker takes tasks from (AFINA_WORKER_QUEUES, `afina worker --queues`): the
# names a job's `resources.queue` takes, and at most this many a worker.
QueueName = Annotated[str, Field(pattern=QUEUE_PATTERN)]
MAX_WORKER_QUEUES = 16


def _comma_separated(value: object) -> object:
    """`a, b,c` -> ["a", "b", "c"]: what an environment variable holds for a list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# A worker's queues, as AFINA_WORKER_QUEUES or `afina worker --queues` give them: in their
# order, each once.
WorkerQueues = Annotated[
    list[QueueName],
    Field(min_length=1, max_length=MAX_WORKER_QUEUES),
    BeforeValidator(_comma_separated),
    AfterValidator(lambda queues: list(dict.fromkeys(queues))),
]


def _in_data_dir(template: str) -> Callable[[dict[str, Any]], str]:
    """A default under the data dir, which is declared (so validated) before the fields that
    use it: the embedded stack needs no URL set."""
    return lambda data: template.format(data_dir=data.get("data_dir", Path("data").resolve()))


class Settings(BaseSettings):
    # hide_input_in_errors: a bad AFINA_API_KEYS must not print the keys at start-up.
    model_config = SettingsConfigDict(
        env_prefix="AFINA_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Field(
        default=Path("data"), description="Root of everything the service keeps."
    )
    database_url: str = Field(
        default_factory=_in_data_dir("sqlite:///{data_dir}/afina.db"),
        description="SQLAlchemy URL; default SQLite file `{data_dir}/afina.db`.",
    )
    broker_url: str = Field(
        default_factory=_in_data_dir("sqla+sqlite:///{data_dir}/broker.db"),
        description="Celery broker URL; default kombu's SQLAlchemy transport on SQLite.",
    )
    storage_url: str = Field(
        default_factory=_in_data_dir("{data_dir}/artifacts"),
        description="Artifact root: a local path or an fsspec URL; default `{data_dir}/artifacts`.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint of an `s3://` storage_url (MinIO, Ceph, R2, ...); unset: "
        "AWS, or what AWS_ENDPOINT_URL says.",
    )
    s3_access_key_id: str | None = Field(
        default=None,
        description="The access key of an `s3://` storage_url; unset: the standard AWS "
        "credentials (AWS_ACCESS_KEY_ID, ~/.aws, an instance role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="The secret that goes with s3_access_key_id."
    )
    s3_region: str | None = Field(
        default=None,
        description="The region of an `s3://` storage_url's bucket; unset: AWS_DEFAULT_REGION "
        "or the bucket's own.",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default=["*"], description="Glob patterns of model ids/paths a job may name."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Bootstrap keys, `project:key` or a bare `key` (project `default`).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let models run their own code from the hub; an operator's choice only.",
    )
    max_upload_bytes: int = Field(default=512 * MiB, gt=0)
    max_line_bytes: int = Field(default=8 * MiB, gt=0, description="Longest JSONL line accepted.")
    max_json_bytes: int = Field(
        default=16 * MiB, gt=0, description="Largest request body that is not an upload."
    )
    log_level: str = "info"
    max_loaded_adapters: int = Field(
        default=8, ge=1, description="Adapters the inference engine keeps loaded (LRU)."
    )
    max_loaded_base_models: int = Field(
        default=1, ge=1, description="Base models the inference engine keeps loaded (LRU)."
    )
    max_batch_size: int = Field(
        default=16, ge=1, description="Generation requests decoded together; 1 = one at a time."
    )
    batch_window_ms: float = Field(
        default=10, ge=0, le=10_000, description="How long an idle engine waits to fill a batch."
    )
    max_new_tokens: int = Field(
        default=2048, ge=1, description="The most tokens one generation request may ask for."
    )
    max_queued_generations: int = Field(
        default=256, ge=1, description="Waiting generation requests beyond which a 429 answers."
    )
    worker_timeout_seconds: float = Field(
        default=30,
        ge=1,
        le=3600,
        description="A running job whose worker has not stamped its heartbeat for this long "
        "has lost its worker: it is queued again (or failed after max_attempts). Workers stamp "
        "every sixth of it; the clocks of the API and worker machines must agree well within it.",
    )
    worker_queues: Annotated[WorkerQueues, NoDecode] = Field(
        default=["train", "export"],
        description="The queues a worker takes tasks from, in order: `export` is merged "
        "exports', any other name a training queue (`train`, the default one, or a worker "
        "class's such as `train-80g`). A worker runs one task at a time; give exports a "
        "worker of their own to keep the training workers training.",
    )

    api_threads: int = Field(
        default=16,
        ge=1,
        le=512,
        description="Threads the API runs database work on, and as many for other blocking "
        "work (files). Its database pool holds a connection for each and a few more "
        "(2 x api_threads + 8 at most), so a thread never waits for one.",
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        description="Requests the API works on at once; beyond it a request is answered 503 "
        "with Retry-After at once rather than queued (/healthz is never refused).",
    )
    max_queue_seconds: float = Field(
        default=0.5,
        gt=0,
        description="How long a request may wait, once its headers are in, for the API to "
        "start on it; one that waited longer (the service is past its capacity) is answered "
        "503 with Retry-After at once (/healthz is never refused).",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="Open client connections; a connection beyond it is closed at once.",
    )
    header_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="How long a client may take to send a request's line and headers.",
    )
    body_timeout_seconds: float = Field(
        default=30,
        gt=0,
        description="How long a request's body may go without a byte arriving (408), and an "
        "answer may wait for a client that stopped reading it (the connection is closed).",
    )
    access_log: bool = Field(
        default=False,
        description="Log every request (uvicorn's access log); off by default, as it costs "
        "about a tenth of a cheap request. The compose file's proxy logs requests.",
    )
    key_cache_seconds: float = Field(
        default=1,
        ge=0,
        le=60,
        description="How long the API remembers that a key is valid: a revoked key stops "
        "within this time. 0 checks the database on every request.",
    )

    @property
    def heartbeat_seconds(self) -> float:
        """How often a worker stamps its running job's heartbeat: a sixth of the timeout."""
        return self.worker_timeout_seconds / 6

    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="How many runs of a job may end with a lost worker before it fails.",
    )
    min_free_bytes: int = Field(
        default=1024 * MiB,
        ge=0,
        description="Free space under which a disk the service writes to counts as nearly "
        "full: /readyz answers 503, and a job waiting for space waits until this much is free.",
    )
    disk_reserve_bytes: int = Field(
        default=16 * MiB,
        ge=0,
        description="Space kept aside beside a SQLite database, released when the disk is "
        "full so that deleting files and cancelling jobs still work; 0: none.",
    )
    disk_full_wait_seconds: float = Field(
        default=600,
        ge=0,
        le=86_400,
        description="How long a running job whose writes meet a full disk waits for space "
        "before it fails with `disk_full`.",
    )

    @field_validator("allowed_models", "api_keys", mode="before")
    @classmethod
    def split_comma_separated(cls, value: object) -> object:
        return _comma_separated(value)

    @field_validator("api_keys")
    @classmethod
    def keys_name_valid_projects(cls, entries: list[str]) -> list[str]:
        """Each entry a valid project and a key a request can carry, no key given twice. An
        error names the entry by its place: the text before ':' may be part of a bare key."""
        seen: dict[str, int] = {}
        for number, entry in enumerate(entries, start=1):
            project, key = split_api_key(entry)
            if not PROJECT_NAME.fullmatch(project):
                raise ValueError(
                    f"entry {number}: the project (before ':') must be 1-64 letters, digits, "
                    "'_' or '-'"
                )
            if not API_KEY.fullmatch(key):
                raise ValueError(
                    f"entry {number}: the key must be printable ASCII, with no space (a "
                    "request's header could not carry it)"
                )
            if key in seen:
                raise ValueError(f"entry {number} repeats the key of entry {seen[key]}")
            seen[key] = number
        return entries

    def storage_options(self) -> dict[str, Any]:
        """The fsspec options of `storage_url`: the S3 endpoint, credentials and region for
        an `s3://` URL (those unset are left to the standard AWS settings), none otherwise."""
        if not self.storage_url.startswith(("s3://", "s3a://")):
            return {}
        options: dict[str, Any] = {}
        if self.s3_access_key_id is not None:
            options["key"] = self.s3_access_key_id
        if self.s3_secret_access_key is not None:
            options["secret"] = self.s3_secret_access_key.get_secret_value()
        client: dict[str, str] = {}
        if self.s3_endpoint_url:
            client["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            client["region_name"] = self.s3_region
        if client:
            options["client_kwargs"] = client
        return options

    def api_key_projects(self) -> dict[str, str]:
        """{key: project} for the bootstrap keys."""
        return {key: project for project, key in map(split_api_key, self.api_keys)}

    @field_validator("data_dir")
    @classmethod
    def absolute(cls, data_dir: Path) -> Path:
        return data_dir.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def use_psycopg3(cls, url: str) -> str:
        """`postgresql://` would pick psycopg2, which afina does not ship; use psycopg 3."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        return url


def parse_worker_queues(value: str) -> list[str]:
    """A worker's queues written as AFINA_WORKER_QUEUES takes them (`train-80g,train`), in
    their order, each once; pydantic's ValidationError when a name or their number is wrong."""
    return TypeAdapter(WorkerQueues).validate_python(value)


def split_api_key(entry: str) -> tuple[str, str]:
    """`project:key` -> (project, key); a bare `key` belongs to the default project."""
    project, separator, key = entry.partition(":")
    return (project, key) if separator else (DEFAULT_PROJECT, entry)


@lru_cache
def get_settings() -> Settings:
    return Settings()
