"""dermq-client: a Python client for the dermq API (submit dermoscopy images, wait for the triage,
read heat maps, erase cases, report confirmed outcomes) and for verifying its completion callbacks."""

from dermq_client._core import RetryPolicy, __version__
from dermq_client.aio import AsyncClient
from dermq_client.callbacks import verify_callback
from dermq_client.client import Client
from dermq_client.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    DermqError,
    Forbidden,
    Gone,
    InvalidInput,
    InvalidSignature,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    WaitTimeout,
)
from dermq_client.models import (
    CallbackNotice,
    Case,
    CaseSummary,
    Diagnosis,
    Failure,
    ImageInfo,
    ModelRef,
    OutOfDistribution,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CallbackNotice",
    "Case",
    "CaseSummary",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DermqError",
    "Diagnosis",
    "Failure",
    "Forbidden",
    "Gone",
    "ImageInfo",
    "InvalidInput",
    "InvalidSignature",
    "ModelRef",
    "NotFound",
    "OutOfDistribution",
    "PayloadTooLarge",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "WaitTimeout",
    "__version__",
    "verify_callback",
]
