"""The dermq-client command pointed at the wrong place: a problem as JSON on stderr and exit status 1,
never a traceback. A tiny local web site (an HTML page on every path) stands in for a wrong
``--base-url``; no dermq stack is needed."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from dermq_client.cli import main

from tests.local_site import QuietHandler, serving

CASE_ID = "00000000-0000-4000-8000-000000000000"


class WebSite(QuietHandler):
    def _page(self) -> None:
        self.answer(200, "text/html; charset=utf-8", b"<!doctype html><title>Example clinic</title><p>Welcome</p>")

    do_GET = do_POST = do_DELETE = _page


@pytest.fixture
def web_site() -> Iterator[str]:
    with serving(WebSite) as base:
        yield base


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMQ_API_KEY", "dq_test")
    monkeypatch.delenv("DERMQ_BASE_URL", raising=False)


@pytest.mark.parametrize(
    "command",
    [["get", CASE_ID], ["list"], ["wait", CASE_ID, "--timeout", "5"], ["erase", CASE_ID, "--yes"]],
    ids=["get", "list", "wait", "erase"],
)
def test_a_web_site_at_the_base_url_is_a_problem_not_a_traceback(
    web_site: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--base-url", web_site, *command])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    problem = json.loads(err)
    assert problem["code"] == "unexpected_response" and problem["status"] == 200
    assert "not a dermq answer" in problem["detail"] and "check the base URL" in problem["detail"]


@pytest.mark.parametrize("base_url", ["http://[::1", "dermq.example:8000"])
def test_an_unusable_base_url_is_a_problem_not_a_traceback(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--base-url", base_url, "get", CASE_ID])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    problem = json.loads(err)
    assert problem["code"] == "invalid_base_url" and "--base-url" in problem["detail"]
    assert base_url in problem["detail"]


def test_a_missing_api_key_is_a_problem_with_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 2 means a wait ran out, which a script may answer by waiting again: a missing key
    must not look like that."""
    monkeypatch.delenv("DERMQ_API_KEY")
    status = main(["get", CASE_ID])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert json.loads(err)["code"] == "missing_api_key"


def test_an_idempotency_key_the_server_would_refuse_is_a_problem_not_a_traceback(
    web_site: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "lesion.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    status = main(["--base-url", web_site, "submit", str(image), "--idempotency-key", "visit-Müller"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    problem = json.loads(err)
    assert problem["code"] == "invalid_argument" and "Müller" not in problem["detail"]


class _Terminal(io.StringIO):
    """What a clinician types at a terminal."""

    def isatty(self) -> bool:
        return True


def test_erase_asks_for_the_case_id_back_and_sends_nothing_unconfirmed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Erasure cannot be undone: a command from the shell's history, or the wrong id pasted, must not
    erase at once; without a terminal (a script's loop over piped ids) nothing is read or erased without
    --yes. The base URL reaches nothing: a request sent is a connection problem, not this one."""
    cases: list[tuple[io.StringIO, bool]] = [
        (_Terminal(""), False),
        (_Terminal("00000000-0000-4000-8000-00000000000f\n"), False),
        (io.StringIO(CASE_ID + "\n"), False),  # piped: the next loop's id, not an answer
        (_Terminal(CASE_ID + "\n"), True),
    ]
    for stdin, sent in cases:
        monkeypatch.setattr("sys.stdin", stdin)
        status = main(["--base-url", "http://127.0.0.1:9", "erase", CASE_ID])
        out, err = capsys.readouterr()
        assert status == 1 and out == ""
        problem = json.loads(err[err.index('{"code"') :])
        assert (problem["code"] != "not_confirmed") is sent, problem
        assert stdin.read() == ("" if stdin.isatty() else CASE_ID + "\n")  # piped input left unread


def test_a_file_problem_is_json_without_the_files_name(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """A local file name may be a patient's ("Smith_John_MRN0042.jpg"): it stays out of stderr, which
    lands in cron and CI logs, and the problem is JSON like every other."""
    status = main(["--base-url", "http://127.0.0.1:9", "submit", str(tmp_path / "Smith_John_MRN0042.jpg")])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    problem = json.loads(err)
    assert problem["code"] == "file_error" and "MRN0042" not in err and "Smith" not in err


def test_a_malformed_key_is_its_own_problem_and_not_repeated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DERMQ_API_KEY", "dq_secret\u200bkey")
    status = main(["get", CASE_ID])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert json.loads(err)["code"] == "invalid_api_key" and "secret" not in err
