"""dermq's one settings object, read from ``DERMQ_*`` environment variables (or a ``.env`` file).

Every process (API, worker, beat, CLI, Alembic) builds it once with :func:`get_settings` and passes
it down; nothing else reads the environment. The environment is ``production`` unless another is
asked for (``make run`` asks for ``development``, the tests for ``test``); unsafe values are refused
in production, never silently relaxed: among them a database reached over a network without
``sslmode=verify-full`` (:mod:`core.db_tls`), and a Redis reached over one without a password
(:mod:`core.connection_urls`).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import connection_urls, db_tls, proxies

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SECRETS = {"", "changeme", "change-me", "secret", "password", "admin", "example"}
#: The words of the placeholders that templates and examples use (deploy/k8s/secrets/*.template.yaml).
PLACEHOLDER_WORDS = ("replace_me", "replaceme", "replace-me", "changeme", "change_me", "change-me")
#: Fragments that mark one in a secret chosen by hand (Flower's password); a generated password, as
#: in a connection URL, may hold "<", ">" or "example" by chance (:func:`is_placeholder_password`).
PLACEHOLDER_MARKS = (*PLACEHOLDER_WORDS, "<", ">", "example")


def is_example_secret(value: str) -> bool:
    """Whether ``value`` is an example or a template's placeholder rather than a real secret."""
    lowered = value.strip().lower()
    return lowered in EXAMPLE_SECRETS or any(mark in lowered for mark in PLACEHOLDER_MARKS)


def is_placeholder_password(value: str) -> bool:
    """Whether a connection URL's ``value`` is an example password or a template's placeholder: one of
    :data:`EXAMPLE_SECRETS`, a placeholder word (``REPLACE_ME...``) or a whole ``<...>``; not a
    password that merely holds "<", ">" or "example", as generated ones may."""
    lowered = value.strip().lower()
    whole = lowered.startswith("<") and lowered.endswith(">")
    return lowered in EXAMPLE_SECRETS or whole or any(word in lowered for word in PLACEHOLDER_WORDS)


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value may be a secret (the database URL holds a password)
    model_config = SettingsConfigDict(
        env_prefix="DERMQ_", env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    environment: Literal["development", "test", "production"] = "production"

    # --- storage and broker -------------------------------------------------------------
    database_url: str = "postgresql+psycopg2:///dermq"
    #: Postgres connections each process keeps open and never exceeds (opened as needed).
    database_pool_size: int = Field(10, ge=1)
    #: How long a request or task waits for one of them when all are in use before it is refused
    #: (the API answers 503 ``database_busy`` with Retry-After).
    database_pool_timeout_s: float = Field(10.0, gt=0)
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
    #: Per-period key-encryption keys (core/period_keys.py): a writable folder, outside the database
    #: and never in a backup (None: period-keys/ beside key_file; with keys_json and no key_file,
    #: no period keys: case blobs are wrapped under the key file's KEK, as before them)
    period_key_dir: Path | None = None
    #: the period a case's data keys are wrapped for: its UTC calendar month, ISO week or day
    key_period: Literal["month", "week", "day"] = "month"
    #: days a period's key outlives the retention of its last case (then retention destroys it)
    period_key_grace_days: int = Field(7, ge=0)

    # --- audit log (core/audit_log.py, core/checkpoint.py) -------------------------------------
    #: the log's name in its signed checkpoints (c2sp.org/tlog-checkpoint origin line)
    audit_log_origin: str = Field("dermq.local/audit", min_length=1, max_length=200, pattern=r"^[^\s+]+$")
    #: Ed25519 checkpoint signing key, outside the database (None: audit-signing-key.json beside key_file)
    audit_signing_key_file: Path | None = None
    #: every signed checkpoint is also appended here, outside Postgres (None: not written)
    audit_witness_file: Path | None = ROOT / "var" / "audit-witness.log"
    #: how often the sealer sequences committed events into the log
    audit_seal_interval_seconds: float = Field(1.0, gt=0, le=60)
    #: seconds each minute's audit check spends walking the log again from where the last left off
    #: (core/audit_rewalk.py; needs the witness file, beside which it keeps its place; 0: never)
    audit_rewalk_seconds: float = Field(3.0, ge=0, le=25)
    #: production refuses to start when the database login owns the audit table or is a superuser
    audit_require_runtime_role: bool = True

    # --- HTTP API -----------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    #: API processes (uvicorn workers behind one port; metrics served once). 0: one per usable core.
    #: Leave the worker its share where both run on one machine (make run picks half the cores).
    api_processes: int = Field(1, ge=0, le=64)
    api_port: int = Field(8000, ge=1, le=65535)
    #: Prometheus /metrics of the API, on its own listener (never the public port); 0 turns it off.
    metrics_port: int = Field(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: Prometheus /metrics of a worker host (all prefork children aggregated); 0 turns it off.
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    #: make run's callback worker's /metrics, beside the worker's on one machine (a deployment runs the
    #: callback worker in a container of its own, on its DERMQ_WORKER_METRICS_PORT); 0 turns it off
    callback_worker_metrics_port: int = Field(9102, ge=0, le=65535)
    #: Serve HTTPS directly from uvicorn (otherwise terminate TLS at nginx, see deploy/nginx).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    #: The reverse proxies (addresses or networks) whose X-Forwarded-For and X-Forwarded-Proto the API
    #: believes: nginx's network in compose, the ingress controllers' pod network in Kubernetes. From
    #: any other peer the headers are ignored (a client talking to the API directly cannot choose the
    #: address its requests are limited and audited under). "*" trusts everyone, as does a network
    #: larger than a /8 (core.proxies): refused in production.
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_image_side: int = Field(12_000, ge=64)
    max_image_pixels: int = Field(50_000_000, ge=4096)
    #: The pixel cap for PNG, TIFF, BMP and WebP, whose compression has no practical bound.
    max_lossless_pixels: int = Field(25_000_000, ge=4096)
    min_image_side: int = Field(32, ge=1)
    #: Memory that concurrent image decodes in one process (an API process, a worker child) may
    #: hold at once; a decode that does not fit waits up to 2 s, then the API answers 429.
    decode_memory_bytes: int = Field(384 * 1024 * 1024, ge=16 * 1024 * 1024)
    #: Uploads one clinic may have in flight at once in one API process (beyond: 429).
    max_concurrent_uploads_per_clinic: int = Field(4, ge=1)
    #: Upload bodies one API process may hold in memory at once, whichever clinics send them (each
    #: from its start until its case is stored); an upload that would pass it answers 429. At least
    #: one upload of ``max_upload_bytes`` with its form fields.
    upload_memory_bytes: int = Field(256 * 1024 * 1024, ge=1024 + 64 * 1024)
    #: An upload that sends nothing for this long, or is not complete after ``upload_timeout_seconds``,
    #: is answered 408 and lets go of its clinic's slot (a stalled connection would hold it forever).
    upload_idle_timeout_seconds: float = Field(30.0, gt=0)
    upload_timeout_seconds: float = Field(300.0, gt=0)
    max_client_ref_length: int = Field(128, ge=1)
    #: Requests that may wait for a case's end at once in one API process (``?wait=``); more answer at once.
    long_poll_max_waiters: int = Field(1000, ge=0)
    #: How long an API process remembers a verified key (emptied at once by any revocation); 0: never.
    key_cache_seconds: float = Field(300.0, ge=0)
    page_size_default: int = Field(50, ge=1)
    page_size_max: int = Field(200, ge=1)

    # --- rate limits (requests per minute per key; failed auth per source address) -------------
    rate_limit_submissions_per_minute: int = Field(120, ge=1)
    rate_limit_reads_per_minute: int = Field(1200, ge=1)
    rate_limit_failed_auth_per_minute: int = Field(20, ge=1)

    # --- worker -------------------------------------------------------------------------
    model: str = "effnet-lite0-ham10000-v4"
    #: the SHA-256 of the model's manifest.json (`dermq model list`): a worker serves that manifest only;
    #: a classification worker in production refuses to start without it
    model_sha256: str = Field("", pattern=r"^(?:[0-9a-f]{64})?$")
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
    #: the decoded pixels one batch may hold (a JPEG counts its draft-mode decode, other formats their
    #: declared size): a case takes a batch slot only if it decodes to at most batch_max_pixels /
    #: batch_max_size pixels; a larger one is classified alone. 48 M: a batch's canvases (3 bytes a
    #: pixel, and their copies while being drawn) stay within a worker child's few hundred MiB; eight
    #: 12-megapixel JPEGs (0.75 M each once decoded) still share a batch
    batch_max_pixels: int = Field(48_000_000, ge=1_000_000)
    #: worker children (Celery prefork). 0 = auto: one per core on a CPU worker, where processes with
    #: one thread each beat threads (python -m bench.layout: 1.6x on 2 cores); 1 on a CUDA worker
    worker_concurrency: int = Field(0, ge=0)
    worker_threads: int = Field(0, ge=0)
    worker_max_tasks_per_child: int = Field(2000, ge=1)
    #: a worker child whose resident memory has peaked above this many MiB is replaced once its task
    #: has ended (Celery's worker_max_memory_per_child; the task's result is committed and acknowledged
    #: first): memory that grows case after case ends in a fresh child, not in the container's OOM kill
    #: of a child mid-case. 0: no bound. A CPU child holds about 1 GiB at work (bench.load); a child
    #: below this bound after its first cases would be replaced after every case
    worker_max_memory_per_child_mb: int = Field(0, ge=0)
    task_soft_time_limit: float = Field(60.0, gt=0)
    task_time_limit: float = Field(90.0, gt=0)
    gradcam_budget_seconds: float = Field(5.0, gt=0)
    broker_visibility_timeout: int = Field(300, ge=1)
    max_attempts: int = Field(3, ge=1)
    overlay_max_side: int = Field(512, ge=64)

    # --- recovery and retention ---------------------------------------------------------------
    sweep_interval_seconds: float = Field(30.0, gt=0)
    #: how long a queued case, or a pending callback with no retry waiting out its backoff, may be
    #: without a message in Redis before the sweeper publishes it again (core/recovery.py)
    requeue_grace_seconds: float = Field(60.0, ge=0)
    running_grace_seconds: float = Field(30.0, ge=0)
    retention_days: int = Field(30, ge=1)
    purge_interval_seconds: float = Field(3600.0, gt=0)
    #: field performance (worker/field.py) also reports the cases submitted in the last this many
    #: months, this month included: a recent drop shows there long before it moves the lifetime figures
    field_window_months: int = Field(6, ge=1, le=120)

    # --- completion callbacks to clinic portals (core/callbacks.py) ------------------------------
    callback_timeout_seconds: float = Field(5.0, gt=0)
    #: delivery attempts per finished case before the callback is given up (polling still works)
    callback_max_attempts: int = Field(8, ge=1)
    #: exponential backoff between attempts: base * 2**(attempt-1), with jitter, capped
    callback_backoff_seconds: float = Field(2.0, gt=0)
    callback_backoff_max_seconds: float = Field(180.0, gt=0)
    callback_url_max_length: int = Field(2048, ge=64, le=8192)
    #: hours the secret a callback registration replaces keeps signing beside the new one (0: none),
    #: while the portal takes the new one into its configuration (core/callback_secrets.py)
    callback_secret_overlap_hours: float = Field(24.0, ge=0, le=720)
    #: days a settled callback delivery (delivered, failed, cancelled) is kept before retention
    #: deletes it (the audit trail keeps every attempt; a clinic's status reads the last day)
    callback_history_days: int = Field(30, ge=1)
    #: attempts one callback worker (worker.callbacks_app) makes at once, each on a thread of its own:
    #: they wait on clinics' servers, not on a core (each holds a pooled database connection only to
    #: lease its row and to record the answer)
    callback_worker_threads: int = Field(8, ge=1, le=256)
    #: attempts at one clinic's receiver at once, over every callback worker: a clinic whose server
    #: answers slowly holds no more threads than this, and its further callbacks wait their turn
    #: (core.callback_attempts.lease) while other clinics' go out
    callback_clinic_concurrency: int = Field(2, ge=1, le=256)
    #: looks a callback's own message takes at its row while another transaction holds it, a second
    #: apart and doubling (core.callback_pacing.held_seconds), before it ends and leaves the delivery,
    #: still pending, to the sweeper: the transactions of dermq that hold one are short
    callback_held_looks: int = Field(8, ge=1, le=30)
    #: Plain http and loopback/private callback receivers (a portal on a developer's machine).
    #: Refused in production: it turns off the SSRF guard of core/callback_urls.py.
    callback_allow_private_urls: bool = False

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
        """A PostgreSQL URL, connected through psycopg2 (the driver dermq installs): ``postgresql://`` and
        ``postgres://``, as libpq and most tools write them, get the driver named."""
        scheme, separator, rest = value.partition("://")
        if separator and scheme in ("postgresql", "postgres"):
            return f"postgresql+psycopg2://{rest}"
        if not separator or scheme != "postgresql+psycopg2":
            raise ValueError(
                "DERMQ_DATABASE_URL must be a PostgreSQL URL for psycopg2 (postgresql://... or postgresql+psycopg2://...)"
            )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"DERMQ_FORWARDED_ALLOW_IPS: {item!r} is not an address or network") from None
        return value

    @field_validator("model_sha256", mode="before")
    @classmethod
    def _digest(cls, value: object) -> object:  # as sha256sum or PowerShell's Get-FileHash (upper case) print it
        return value.strip().lower() if isinstance(value, str) else value

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
        if self.upload_memory_bytes < self.max_upload_bytes + 64 * 1024:
            raise ValueError(
                "DERMQ_UPLOAD_MEMORY_BYTES must hold at least one upload of DERMQ_MAX_UPLOAD_BYTES and its "
                "form fields (64 KiB more): a larger image would be refused 429 for good"
            )
        if self.gradcam_budget_seconds >= self.task_soft_time_limit:
            raise ValueError("gradcam_budget_seconds must be below task_soft_time_limit")
        # an attempt ends at its deadline (three timeouts, then recording it) on the callback worker's
        # threads, where no task time limit applies; the task limit bounds the other tasks
        attempt = max(self.task_time_limit, 3 * self.callback_timeout_seconds + CALLBACK_RECORD_SECONDS)
        # (a callback waiting its turn at a clinic's receiver waits no longer: core.callback_pacing)
        if self.callback_backoff_max_seconds + attempt >= self.broker_visibility_timeout:
            raise ValueError(
                "callback_backoff_max_seconds plus one attempt (the larger of task_time_limit and three "
                "callback_timeout_seconds and 5 s) must be below broker_visibility_timeout: a callback retry "
                "waits out its backoff unacknowledged, and Redis would hand it out a second time"
            )
        everyone = [item for item in self.forwarded_allow_ips if proxies.trusts_every_client(item)]
        if self.environment == "production" and everyone:
            raise ValueError(
                f"DERMQ_FORWARDED_ALLOW_IPS={everyone[0]!r} lets any client choose the address it is audited and "
                "limited under; name the proxies' addresses or networks"
            )
        if self.environment == "production" and self.callback_allow_private_urls:
            raise ValueError(
                "DERMQ_CALLBACK_ALLOW_PRIVATE_URLS turns off the callback SSRF guard; it is refused in production"
            )
        if self.environment == "production" and self.keys_json is None and self.key_file is None:
            raise ValueError("production needs DERMQ_KEY_FILE or DERMQ_KEYS_JSON")
        # first: a URL read with part of its password as the host or port would print that part
        for problem in (
            connection_urls.database_url_problem(self.database_url),
            connection_urls.redis_url_problem(self.redis_url),
        ):
            if problem:
                raise ValueError(problem)
        if self.environment == "production" and (
            problem := db_tls.transport_problem(self.database_url) or connection_urls.redis_prod_problem(self.redis_url)
        ):
            raise ValueError(problem)
        for name, url in (("DERMQ_DATABASE_URL", self.database_url), ("DERMQ_REDIS_URL", self.redis_url)):
            password = connection_urls.url_password(url)
            if self.environment == "production" and password and is_placeholder_password(password):
                raise ValueError(f"{name}'s password is an example or a template placeholder; set a real one")
        return self

    def require_flower_password(self) -> str:
        """Flower's password; refuses an empty one anywhere and an example value in production."""
        password = self.flower_password.get_secret_value()
        if not password:
            raise ValueError("set DERMQ_FLOWER_PASSWORD: Flower is never served without authentication")
        if self.environment == "production" and (is_example_secret(password) or len(password) < 12):
            raise ValueError(
                "DERMQ_FLOWER_PASSWORD is an example, a template placeholder or shorter than 12 characters; "
                "set a real one"
            )
        return password

    @property
    def broker_url(self) -> str:
        return self.redis_url

    @property
    def period_key_folder(self) -> Path | None:
        """Where period keys live: ``period_key_dir``, else ``period-keys`` beside the key file."""
        if self.period_key_dir is not None:
            return self.period_key_dir
        if self.keys_json is None and self.key_file is not None:
            return self.key_file.parent / "period-keys"
        return None


#: what a callback attempt needs besides its POST: leasing its row and recording its answer
CALLBACK_RECORD_SECONDS = 5.0
#: the longest a callback waiting its turn at its clinic's receiver holds its message before it
#: tries again (core.callback_pacing.turn_seconds), and never longer than the longest backoff
CALLBACK_LONGEST_TURN_SECONDS = 60.0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, validated once.

    Secrets can also come from files (Docker and Kubernetes secrets): with ``DERMQ_SECRETS_DIR``
    set, a file there named like the variable in lower case (``dermq_flower_password``,
    ``dermq_database_url``, ``dermq_keys_json``) supplies that setting.
    """
    secrets_dir = os.environ.get("DERMQ_SECRETS_DIR")
    if not secrets_dir:
        return Settings()
    # the files that supply settings, in any case: pydantic-settings finds DERMQ_KEYS_JSON as well
    for path in sorted(p for p in Path(secrets_dir).iterdir() if p.name.lower().startswith("dermq_")):
        if path.is_file() and (mode := exposed_bits(path.stat().st_mode)) is not None:
            raise ValueError(
                f"the secret file {path} has mode {mode:o}: others may read or change it; chmod 600 it (or 440 "
                "with a group that only dermq's services use, as the Kubernetes manifests mount it)"
            )
    return Settings(_secrets_dir=secrets_dir)


def exposed_bits(st_mode: int) -> int | None:
    """The permission bits of ``st_mode`` when a secret under them is exposed: any bit for other users,
    or group write or execute. Owner read (and write) and group read are allowed: Kubernetes mounts
    Secret files as root:<fsGroup> with ``defaultMode: 0440`` and the services read them through that group."""
    mode = stat.S_IMODE(st_mode)
    return mode if mode & 0o037 else None
