"""``dermq-client``: the client from a shell. Prints JSON on stdout; a problem goes to stderr (as JSON)
with exit status 1 (an unusable base URL, an answer that is not dermq's, a missing key or an argument
refused before sending, too), a wait that runs out with 2. The key comes from ``DERMQ_API_KEY`` (never
an argument: it would show in the process list), the base URL from ``DERMQ_BASE_URL`` or ``--base-url``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dermq_client import _core
from dermq_client.client import Client
from dermq_client.errors import DermqError, WaitTimeout

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dermq-client",
        description="Submit dermoscopy images to dermq and read the results. "
        f"Needs DERMQ_API_KEY; DERMQ_BASE_URL (default {DEFAULT_BASE_URL}).",
    )
    parser.add_argument("--base-url", default=os.environ.get("DERMQ_BASE_URL", DEFAULT_BASE_URL))
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit an image as a new case")
    submit.add_argument("image", type=Path)
    submit.add_argument("--client-ref", help="your own reference, returned as sent")
    submit.add_argument("--urgent", action="store_true", help="urgent priority (served first)")
    submit.add_argument("--idempotency-key", help="default: a random one, reused by this command's retries")
    submit.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=60.0,
        metavar="SECONDS",
        help="wait for the case to end (default 60 s) and print the finished case",
    )

    get = commands.add_parser("get", help="print a case")
    get.add_argument("case_id")
    wait = commands.add_parser("wait", help="wait until a case has ended and print it")
    wait.add_argument("case_id")
    wait.add_argument("--timeout", dest="wait_timeout", type=float, default=60.0, help="seconds (default 60)")
    heatmap = commands.add_parser("heatmap", help="save a case's heat map (PNG)")
    heatmap.add_argument("case_id")
    heatmap.add_argument("-o", "--output", type=Path, required=True)
    listing = commands.add_parser("list", help="print the clinic's cases, newest first (one JSON object a line)")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "purged"])
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    erase = commands.add_parser("erase", help="erase a case's image, heat map, reference and result (asks first)")
    erase.add_argument("case_id")
    erase.add_argument("--yes", action="store_true", help="do not ask for the case id back (scripts)")
    outcome = commands.add_parser("outcome", help="report a case's confirmed diagnosis")
    outcome.add_argument("case_id")
    outcome.add_argument("diagnosis", help="class code: akiec, bcc, bkl, df, mel, nv or vasc")
    outcome.add_argument("--method", required=True, choices=["histo", "follow_up", "consensus", "confocal"])
    return parser


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _confirmed_erasure(case_id: str) -> bool:
    """Whether the case id was typed back at the terminal: erasure cannot be undone (``--yes`` skips
    this). Without a terminal nothing is read (a script's piped input, such as a list of ids for a loop,
    is not the clinician's answer) and nothing is erased."""
    if not sys.stdin.isatty():
        return False
    print(
        f"case {case_id}: its image, heat map, client reference and result are erased. This cannot be undone.\n"
        "type the case id to erase it: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        answer = input()
    except (EOFError, KeyboardInterrupt):  # the input ended, or Ctrl-C: no answer
        print(file=sys.stderr)
        answer = ""
    return answer.strip().lower() == case_id.strip().lower()


def _client(args: argparse.Namespace, api_key: str) -> Client:
    try:
        return Client(args.base_url, api_key, timeout=args.timeout)
    except ValueError as exc:  # the base URL
        raise DermqError(f"{exc}; check --base-url or DERMQ_BASE_URL", code="invalid_base_url") from None
    except OSError as exc:  # httpx's TLS set-up: SSL_CERT_FILE naming a missing file, say
        raise DermqError(f"the HTTP client could not be set up: {exc}", code="client_setup_failed") from None


def _run(args: argparse.Namespace, dermq: Client) -> None:
    if args.command == "submit":
        with _file_problems("the image"):  # the network's errors come as DermqError: an OSError is the file's
            case = dermq.submit(
                args.image,
                client_ref=args.client_ref,
                priority="urgent" if args.urgent else "routine",
                idempotency_key=args.idempotency_key,
                wait=args.wait,
            )
        if args.wait is not None and not case.terminal:
            raise WaitTimeout(f"case {case.id} did not end within {args.wait:g} s", case=case)
        _print(case.raw)
    elif args.command == "get":
        _print(dermq.get(args.case_id).raw)
    elif args.command == "wait":
        _print(dermq.wait(args.case_id, timeout=args.wait_timeout).raw)
    elif args.command == "heatmap":
        heat_map = dermq.heatmap(args.case_id)
        with _file_problems("the --output file"):
            args.output.write_bytes(heat_map)
        _print({"case_id": args.case_id, "heatmap": str(args.output)})
    elif args.command == "list":
        for number, row in enumerate(dermq.iter_cases(status=args.status, page_size=max(1, min(args.limit, 200)))):
            if number >= args.limit:
                break
            print(json.dumps(row.raw, sort_keys=True))
    elif args.command == "erase":
        _print(dermq.erase(args.case_id).raw)
    elif args.command == "outcome":
        _print(dermq.report_outcome(args.case_id, args.diagnosis, args.method))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_key = os.environ.get("DERMQ_API_KEY")
    if not api_key:
        return _problem("missing_api_key", "set DERMQ_API_KEY to your API key")
    try:
        _core.headers(api_key)
    except ValueError as exc:
        return _problem("invalid_api_key", str(exc))
    if args.command == "erase" and not args.yes and not _confirmed_erasure(args.case_id):
        return _problem(
            "not_confirmed",
            "the case is left as it was: type its id back at the prompt (--yes erases without asking, for scripts)",
        )
    try:
        with _client(args, api_key) as dermq:
            _run(args, dermq)
    except WaitTimeout as exc:
        print(f"dermq-client: {exc.detail}", file=sys.stderr)
        if exc.case is not None:
            _print(exc.case.raw)
        return 2
    except DermqError as exc:
        problem = exc.problem or {"status": exc.status, "code": exc.code, "detail": exc.detail}
        if exc.idempotency_key and args.command == "submit" and not args.idempotency_key:
            # the key this command made up: `submit --idempotency-key` with it again never makes a second case
            problem = problem | {"idempotency_key": exc.idempotency_key}
        print(json.dumps(problem, sort_keys=True), file=sys.stderr)
        return 1
    except ValueError as exc:  # an argument the client refuses before sending (a malformed key or time)
        return _problem("invalid_argument", str(exc))
    return 0


class FileProblem(DermqError):
    """A local file the command could not read or write; its path is not repeated (a file name may be
    a patient's: "Smith_John_MRN0042.jpg")."""


@contextmanager
def _file_problems(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise FileProblem(f"{exc.strerror or type(exc).__name__} ({what})", code="file_error") from None


def _problem(code: str, detail: str) -> int:
    """A problem found before any request: on stderr as JSON like the server's, exit status 1 (2 is
    a wait that ran out, which a script may answer by waiting again)."""
    print(json.dumps({"code": code, "detail": detail, "status": None}, sort_keys=True), file=sys.stderr)
    return 1
