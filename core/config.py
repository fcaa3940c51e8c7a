"""dermq's one settings object, read from ``DERMQ_*`` environment variables (or a ``.env`` file).

Every process (API, worker, beat, CLI, Alembic) builds it once with :func:`get_settings` and passes
it down; nothing else reads the environment. Unsafe values are refused outside development.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from ml.images import ImageLimits

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SECRETS = {"", "changeme", "change-me", "secret", "password", "admin", "example"}


class FaultInjection(BaseModel):
    """Faults the worker injects into its own classifications, for the fault-tolerance tests only
    (``DERMQ_FAULT_INJECTION``, JSON). :class:`Settings` refuses it unless ``DERMQ_ENVIRONMENT=test``;
    the hooks live in ``worker/faults.py``.

        DERMQ_FAULT_INJECTION='{"sleep_before_inference": 30, "attempts": [1]}'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: seconds to sleep just before inference (a slow job: soft and hard time limits)
    sleep_before_inference: float = Field(0.0, ge=0)
    #: block the soft-time-limit signal during that sleep, like native code that never returns to
    #: Python: only the hard limit (the child is killed) ends it
    ignore_soft_limit: bool = False
    #: end the worker child with os._exit during inference (a poison case that kills its worker)
    exit_during_inference: bool = False
    #: the first N inferences of each worker process raise torch.OutOfMemoryError (the GPU fallback)
    cuda_oom_times: int = Field(0, ge=0)
    #: inject only on these attempt numbers (counted in Postgres at each claim); None: every attempt
    attempts: list[int] | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DERMQ_", env_file=".env", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"

    # --- storage and broker -------------------------------------------------------------
    database_url: str = "postgresql+psycopg2:///dermq"
    database_pool_size: int = Field(5, ge=1)
    database_statement_timeout_ms: int = Field(15_000, ge=100)
    #: No statement waits longer than this for a lock (the audit chain's included): fail, don't hang.
    database_lock_timeout_ms: int = Field(5_000, ge=10)
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: after `dermq db upgrade` (run as the owner role), grant this runtime role its privileges
    #: (INSERT and SELECT only on the audit tables, core/db_roles.py); None: grant nothing
    database_runtime_role: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    # --- keys -------------------------------------------------------------------------
    #: JSON key file: {"active": "<kek id>", "keys": {"<kek id>": "<base64 32 bytes>"}, "api_key_pepper": "..."}
    key_file: Path | None = ROOT / "var" / "keys.json"
    #: The same JSON inline (for containers that mount secrets as env vars); wins over key_file.
    keys_json: SecretStr | None = None

    # --- audit log (core/audit_log.py, core/checkpoint.py) -------------------------------------
    #: the log's name in its signed checkpoints (c2sp.org/tlog-checkpoint origin line)
    audit_log_origin: str = Field("dermq.local/audit", min_length=1, max_length=200, pattern=r"^[^\s+]+$")
    #: Ed25519 checkpoint signing key, outside the database (None: audit-signing-key.json beside key_file)
    audit_signing_key_file: Path | None = None
    #: every signed checkpoint is also appended here, outside Postgres (None: not written)
    audit_witness_file: Path | None = ROOT / "var" / "audit-witness.log"
    #: how often the sealer sequences committed events into the log
    audit_seal_interval_seconds: float = Field(1.0, gt=0, le=60)
    #: production refuses to start when the database login owns the audit table or is a superuser
    audit_require_runtime_role: bool = True

    # --- HTTP API -----------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    #: Prometheus /metrics of the API, on its own listener (never the public port); 0 turns it off.
    metrics_port: int = Field(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: Prometheus /metrics of a worker host (all prefork children aggregated); 0 turns it off.
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    #: Serve HTTPS directly from uvicorn (otherwise terminate TLS at nginx, see deploy/nginx).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    public_base_url: str = ""
    trust_forwarded_for: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_image_side: int = Field(12_000, ge=64)
    max_image_pixels: int = Field(50_000_000, ge=4096)
    min_image_side: int = Field(32, ge=1)
    max_client_ref_length: int = Field(128, ge=1)
    page_size_default: int = Field(50, ge=1)
    page_size_max: int = Field(200, ge=1)

    # --- rate limits (requests per minute per key; failed auth per source address) -------------
    rate_limit_submissions_per_minute: int = Field(120, ge=1)
    rate_limit_reads_per_minute: int = Field(1200, ge=1)
    rate_limit_failed_auth_per_minute: int = Field(20, ge=1)

    # --- worker -------------------------------------------------------------------------
    model: str = "effnet-lite0-ham10000-v2"
    device: str = "auto"
    #: auto: ONNX Runtime on the CPU (int8 where the model's manifest chose it), PyTorch on CUDA
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    #: load and warm the model as each worker child starts (off: on its first case)
    preload_model: bool = True
    #: dynamic batching: a worker claims up to batch_max_size queued cases in one statement, runs them
    #: as one pass and stores them in one transaction. auto (= on) batches on every device: on a GPU
    #: the pass costs about one image's, on the CPU the bookkeeping per case shrinks (bench.pipeline);
    #: off: one case per task and per transaction
    batching: Literal["auto", "on", "off"] = "auto"
    batch_max_size: int = Field(8, ge=1, le=256)
    #: on a CUDA worker, how long a short batch waits for more cases; the CPU never waits (a bigger
    #: batch costs the sum of its images there, so waiting only adds latency)
    batch_max_wait_ms: int = Field(10, ge=0, le=1000)
    #: worker children (Celery prefork). 0 = auto: one per core on a CPU worker, where processes with
    #: one thread each beat threads (python -m bench.layout: 1.6x on 2 cores); 1 on a CUDA worker
    worker_concurrency: int = Field(0, ge=0)
    worker_threads: int = Field(0, ge=0)
    worker_max_tasks_per_child: int = Field(2000, ge=1)
    task_soft_time_limit: float = Field(60.0, gt=0)
    task_time_limit: float = Field(90.0, gt=0)
    gradcam_budget_seconds: float = Field(5.0, gt=0)
    broker_visibility_timeout: int = Field(300, ge=1)
    max_attempts: int = Field(3, ge=1)
    overlay_max_side: int = Field(512, ge=64)

    # --- recovery and retention ---------------------------------------------------------------
    sweep_interval_seconds: float = Field(30.0, gt=0)
    requeue_grace_seconds: float = Field(60.0, ge=0)
    running_grace_seconds: float = Field(30.0, ge=0)
    retention_days: int = Field(30, ge=1)
    purge_interval_seconds: float = Field(3600.0, gt=0)

    # --- completion callbacks to clinic portals (core/callbacks.py) ------------------------------
    callback_timeout_seconds: float = Field(5.0, gt=0)
    #: delivery attempts per finished case before the callback is given up (polling still works)
    callback_max_attempts: int = Field(8, ge=1)
    #: exponential backoff between attempts: base * 2**(attempt-1), with jitter, capped
    callback_backoff_seconds: float = Field(2.0, gt=0)
    callback_backoff_max_seconds: float = Field(300.0, gt=0)
    callback_url_max_length: int = Field(2048, ge=64, le=8192)

    # --- tests only -------------------------------------------------------------------------
    #: JSON, see FaultInjection; refused unless environment is "test"
    fault_injection: FaultInjection | None = None

    # --- Flower -------------------------------------------------------------------------
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_user: str = "operator"
    flower_password: SecretStr = SecretStr("")
    #: Keep Flower's task history across restarts in this file (None: in memory only).
    flower_state_file: Path | None = None

    # --- logging ------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str) -> str:
        if not value.startswith("postgresql"):
            raise ValueError("DERMQ_DATABASE_URL must be a PostgreSQL URL (postgresql+psycopg2://...)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.task_soft_time_limit < self.task_time_limit < self.broker_visibility_timeout:
            raise ValueError(
                "time limits must satisfy task_soft_time_limit < task_time_limit < broker_visibility_timeout "
                f"(got {self.task_soft_time_limit}, {self.task_time_limit}, {self.broker_visibility_timeout}); "
                "otherwise Redis redelivers tasks that are still running"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both DERMQ_TLS_CERTFILE and DERMQ_TLS_KEYFILE, or neither")
        if self.gradcam_budget_seconds >= self.task_soft_time_limit:
            raise ValueError("gradcam_budget_seconds must be below task_soft_time_limit")
        if self.fault_injection is not None and self.environment != "test":
            raise ValueError(
                "DERMQ_FAULT_INJECTION makes workers sleep, crash and fail on purpose; it is honoured only "
                "with DERMQ_ENVIRONMENT=test. Unset it."
            )
        if self.environment == "production" and self.keys_json is None and self.key_file is None:
            raise ValueError("production needs DERMQ_KEY_FILE or DERMQ_KEYS_JSON")
        return self

    def require_flower_password(self) -> str:
        """Flower's password; refuses an empty one anywhere and an example value in production."""
        password = self.flower_password.get_secret_value()
        if not password:
            raise ValueError("set DERMQ_FLOWER_PASSWORD: Flower is never served without authentication")
        if self.environment == "production" and (password.lower() in EXAMPLE_SECRETS or len(password) < 12):
            raise ValueError("DERMQ_FLOWER_PASSWORD is an example or shorter than 12 characters; set a real one")
        return password

    @property
    def broker_url(self) -> str:
        return self.redis_url

    def image_limits(self) -> ImageLimits:
        """The bounds on an uploaded image: the intake validates with them and the worker decodes with them."""
        from ml.images import ImageLimits

        return ImageLimits(
            max_bytes=self.max_upload_bytes,
            max_side=self.max_image_side,
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, validated once.

    Secrets can also come from files (Docker and Kubernetes secrets): with ``DERMQ_SECRETS_DIR``
    set, a file there named like the variable in lower case (``dermq_flower_password``,
    ``dermq_database_url``, ``dermq_keys_json``) supplies that setting.
    """
    secrets_dir = os.environ.get("DERMQ_SECRETS_DIR")
    return Settings(_secrets_dir=secrets_dir) if secrets_dir else Settings()  # type: ignore[call-arg]
