"""Structured logging: one JSON object per line (or, with ``DERMQ_LOG_JSON=false``, one plain line
under the same rules), carrying the request id and case id of the work in progress. Only ids, codes,
counts and timings are logged: never image bytes, client references, API keys or other secrets (the
formatters drop any field they do not know, and exception messages).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
case_id_var: ContextVar[str | None] = ContextVar("case_id", default=None)

#: Extra fields a log call may attach (logger.info(..., extra={...})); anything else is dropped.
ALLOWED_EXTRA = frozenset(
    {
        "event",
        "case_id",
        "audit_position",
        "audit_event_id",
        "request_id",
        "task_id",
        "status",
        "method",
        "path",
        "route",
        "status_code",
        "duration_ms",
        "waited_ms",
        "error",
        "code",
        "attempt",
        "model_id",
        "device",
        "count",
        "component",
        "key_id",
        "clinic_id",
        "outcome",
        "reasons",
        "label",
        "seconds",
        "queue",
        "priority",
        "bytes",
        "retry_in",
        "window",
        "row",  # a key rewrap's skipped row: its case or clinic id and kind (core.keyrotation)
        "reason",  # why it was skipped: dermq's own message
        "step",  # a retention step that failed (core.retention_steps)
        "period",  # the period whose key it could not destroy (a calendar month, week or day)
        "detail",  # its error's message, when the error is dermq's own (no patient data)
        # a sweep's counts (core.recovery.log_report)
        "requeued",
        "failed",
        "republished",
        "broker_checked",
        "callbacks_republished",
    }
)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self.component), default=str)


class PlainFormatter(logging.Formatter):
    """The human-readable lines (``DERMQ_LOG_JSON=false``), under the JSON lines' rule: one line a
    record, the allowed fields only, and for an exception its type and where it happened (the frames as
    ``file:line function``), never its message, its locals or Python's traceback, which quotes it."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record, self.component)
        head = f"{fields.pop('ts')} {record.levelname} {fields.pop('component')} {fields.pop('logger')}:"
        fields.pop("level")
        text = " ".join([head, _one_line(str(fields.pop("msg")))])
        if record.exc_info and record.exc_info[2] is not None:
            frames = _frames(record.exc_info[2])
            fields["frames"] = " > ".join(f"{_where(tb)} {tb.tb_frame.f_code.co_name}" for tb in frames)
        extras = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        return f"{text} {extras}" if extras else text


def _fields(record: logging.LogRecord, component: str) -> dict[str, object]:
    """What a line may carry, whatever its format: ids, codes, counts, timings, and for an exception
    its type and where it happened (``at``: the innermost frame's file:line)."""
    entry: dict[str, object] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "component": component,
        "msg": _message(record),
    }
    request_id, case_id = request_id_var.get(), case_id_var.get()
    if request_id:
        entry["request_id"] = request_id
    if case_id:
        entry["case_id"] = case_id
    for key, value in record.__dict__.items():
        if key in ALLOWED_EXTRA and key not in entry:
            entry[key] = value
    if record.exc_info and record.exc_info[0] is not None:
        # The exception type and where it happened, not its message: messages can quote data.
        entry["exception"] = record.exc_info[0].__name__
        frames = _frames(record.exc_info[2])
        if frames:
            entry["at"] = _where(frames[-1])
    return entry


def _frames(tb: TracebackType | None) -> list[TracebackType]:
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


def _where(tb: TracebackType) -> str:
    """The frame's file (its name alone) and line: ``tasks.py:212``."""
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def _message(record: logging.LogRecord) -> str:
    """The record's message; for Celery's task lines ("Task ...[id] raised unexpected: <exc>",
    "... retry: <exc>"), the exception's type instead of its repr, whose message can quote data."""
    args = record.args
    if record.name == "celery.app.trace" and isinstance(args, dict) and "exc" in args:
        return str(record.msg) % {**args, "exc": str(args["exc"]).split("(", 1)[0]}
    return record.getMessage()


def configure_logging(level: str = "INFO", *, json_lines: bool = True, component: str = "dermq") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(PlainFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "multipart", "python_multipart", "PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "celery", "kombu", "flower"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
