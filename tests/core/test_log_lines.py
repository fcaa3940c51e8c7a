"""What the JSON log lines may carry: Celery's own task lines name an exception's type, never its
message (which can quote data), and a classify message whose argument is not a case id is logged
without that argument (anyone who can write to the broker chooses it)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.logs import JsonFormatter

SECRET = "MRN-777 Jane Roe"


def _line(record: logging.LogRecord) -> dict[str, object]:
    return json.loads(JsonFormatter("worker").format(record))


def test_celery_task_lines_name_the_exceptions_type_not_its_message() -> None:
    for description in ("raised unexpected", "retry"):
        record = logging.LogRecord(
            "celery.app.trace",
            logging.ERROR,
            __file__,
            1,
            "Task %(name)s[%(id)s] %(description)s: %(exc)s",
            ({"name": "dermq.drift", "id": "t-1", "description": description, "exc": f"ValueError('{SECRET}')"},),
            None,
        )
        assert _line(record)["msg"] == f"Task dermq.drift[t-1] {description}: ValueError"
    # any other logger's message is its own
    plain = logging.LogRecord("dermq.worker", logging.INFO, __file__, 1, "batch of %d", (3,), None)
    assert _line(plain)["msg"] == "batch of 3"


def test_a_classify_message_that_is_no_case_id_is_logged_without_it() -> None:
    from worker.tasks import classify

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("worker"))
    worker_log = logging.getLogger("dermq.worker")
    worker_log.addHandler(handler)
    try:
        assert classify.run(SECRET) == "ignored"
    finally:
        worker_log.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "bad_message" and SECRET not in json.dumps(line)


def test_a_sweeps_line_carries_its_counts(caplog) -> None:  # type: ignore[no-untyped-def]
    """Its counts were extra fields the JSON lines leave out: every sweep's line said only "sweep"."""
    import uuid

    from core import recovery

    report = recovery.SweepReport()
    report.requeued.append(uuid.uuid4())
    report.republished.extend([uuid.uuid4(), uuid.uuid4()])
    with caplog.at_level(logging.INFO, logger=recovery.log.name):
        recovery.log_report(report)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "sweep"]
    line = _line(record)
    assert (line["requeued"], line["republished"], line["failed"], line["callbacks_republished"]) == (1, 2, 0, 0)


def test_a_skipped_rewrap_names_its_row_and_why() -> None:
    """``dermq keys rewrap`` prints 20 skipped rows and sends the operator to the log for the rest: the
    JSON lines dropped both fields, and named none."""
    record = logging.LogRecord(
        "dermq.keys", logging.WARNING, __file__, 1, "a data key could not be re-wrapped", (), None
    )
    record.__dict__.update(event="rewrap_skipped", row="case 1b2c blob image", reason="DecryptionError: tampered")
    line = _line(record)
    assert (line["row"], line["reason"]) == ("case 1b2c blob image", "DecryptionError: tampered")


_LOGGING_PROCESS = """
import logging, sys
from core.logs import configure_logging

configure_logging("INFO", json_lines=sys.argv[1] == "json", component="api")

def read_reference(reference):
    try:
        int(reference)
    except ValueError as cause:
        raise LookupError(f"no case for {reference!r}") from cause

try:
    read_reference(sys.argv[2])
except LookupError:
    logging.getLogger("dermq.api").exception("request failed", extra={"event": "failed", "case_id": "c-1"})
    logging.getLogger("uvicorn.error").error("Exception in ASGI application", exc_info=True)
logging.getLogger("celery.app.trace").error(
    "Task %(name)s[%(id)s] %(description)s: %(exc)s",
    {"name": "dermq.classify", "id": "t-1", "description": "raised unexpected", "exc": f"KeyError({sys.argv[2]!r})"},
)
"""


@pytest.mark.parametrize("form", ["json", "plain"])
def test_no_exception_message_reaches_stderr_in_either_format(form: str) -> None:
    """``DERMQ_LOG_JSON=false`` printed Python's tracebacks, each exception's message (and its cause's)
    quoted, and Celery's task lines with the exception's repr: the plain lines keep the JSON lines'
    rule, one line a record, the exception's type and where it happened."""
    done = subprocess.run(
        [sys.executable, "-c", _LOGGING_PROCESS, form, SECRET],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 3, done.stderr
    assert SECRET not in done.stderr and "MRN" not in done.stderr
    first = lines[0] if form == "plain" else " ".join(f"{k}={v}" for k, v in json.loads(lines[0]).items())
    for shown in ("request failed", "event=failed", "case_id=c-1", "exception=LookupError", "at=<string>:11"):
        assert shown in first, first
    assert "Task dermq.classify[t-1] raised unexpected: KeyError" in lines[2]
    if form == "plain":
        assert lines[0].split()[1:4] == ["ERROR", "api", "dermq.api:"]
        assert 'frames="<string>:14 <module> > <string>:11 read_reference"' in lines[0]
