"""nginx writes no patient data to a file: an upload streams to the API as it arrives, and an answer a
client reads slowly (a heat map: the patient's image under the map; a case list, FHIR, an export)
waits in nginx's buffers instead of going to a temporary file. Real nginx runs the shipped
configuration over HTTP/1.1 and HTTP/2, in front of a stand-in API; each check is first run with the
setting taken out (nginx's default), to show that it sees the file nginx then writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import support
from tests.deploy import manifests as m
from tests.deploy import nginx_run

UPLOAD = os.urandom(768 * 1024)  # over nginx's 16 KiB body buffer, sent at a quarter of it a second
ANSWER = hashlib.shake_256(b"heat map").digest(24 * 1024 * 1024)  # over what the sockets hold on loopback
PROTOCOLS = ("--http1.1", "--http2")


class StandInApi(BaseHTTPRequestHandler):
    """Reads a POST's body whole and answers with its length and digest; answers a GET with ANSWER."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(json.dumps({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode())

    def do_GET(self) -> None:
        self._send(ANSWER)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a control's client left mid-answer
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", support.free_port()), StandInApi)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def curl_version() -> str:
    try:
        return subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module", autouse=True)
def curl_speaks_http2() -> None:
    if "HTTP2" not in curl_version():
        pytest.skip("needs curl with HTTP/2 (nghttp2), the protocol browsers upload over")


def held_temp_files(master: int) -> set[str]:
    """The temporary files (client_body_temp_path, proxy_temp_path) nginx's workers hold open: nginx
    unlinks them as it opens them, so their folders look empty while they hold a request's bytes."""
    held = set()
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(master):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "_temp/" in target:
                    held.add(target)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process or descriptor gone meanwhile
    return held


def transfer(
    tmp_path: Path, port: int, protocol: str, *, upload: bool, stop_at_a_file: bool
) -> tuple[str, bytes, set[str]]:
    """curl through nginx at a client's pace (an upload sent slowly, or an answer read slowly), nginx's
    workers' temporary files looked at every 20 ms meanwhile: the HTTP version, the answer, the files seen."""
    master = int((tmp_path / "nginx.pid").read_text())
    sent, answer = tmp_path / "upload.bin", tmp_path / "answer.bin"
    sent.write_bytes(UPLOAD)
    args = ["curl", "-sk", protocol, "--max-time", "60", "-o", str(answer), "-w", "%{http_version}"]
    if upload:
        args += ["--limit-rate", "192k", "--data-binary", f"@{sent}", "-H", "Content-Type: application/octet-stream"]
        url = f"https://localhost:{port}/v1/cases"
    else:
        args += ["--limit-rate", "8M"]
        url = f"https://localhost:{port}/v1/cases/00000000-0000-0000-0000-000000000000/heatmap"
    seen: set[str] = set()
    with subprocess.Popen([*args, url], stdout=subprocess.PIPE, text=True) as curl:
        while curl.poll() is None:
            seen |= held_temp_files(master)
            if seen and stop_at_a_file:
                curl.kill()
            time.sleep(0.02)
        version = curl.communicate()[0]
    return version, answer.read_bytes() if answer.exists() else b"", seen


@pytest.mark.parametrize(
    ("setting", "upload", "spool"),
    [("proxy_request_buffering off;", True, "client_temp"), ("proxy_max_temp_file_size 0;", False, "proxy_temp")],
    ids=["an upload streams to the API", "an answer read slowly waits in the buffers"],
)
def test_nginx_holds_no_patient_data_in_a_file(
    tmp_path: Path, upstream: int, setting: str, upload: bool, spool: str
) -> None:
    """With ``setting`` taken out (nginx's default) the check sees the body go to a file in ``spool``;
    with the shipped configuration no file holds it, and the body arrives whole."""
    default = m.NGINX_CONF.read_text().replace(setting, "")
    control, ports = nginx_run.run_nginx(tmp_path / "control", text=default, upstream_port=upstream)
    try:
        for protocol in PROTOCOLS:
            _, _, seen = transfer(tmp_path / "control", ports["8443"], protocol, upload=upload, stop_at_a_file=True)
            assert any(spool in path for path in seen), (protocol, seen, control.output()[-1000:])
    finally:
        control.stop()
    server, ports = nginx_run.run_nginx(tmp_path / "shipped", upstream_port=upstream)
    try:
        for protocol, version in zip(PROTOCOLS, ("1.1", "2"), strict=True):
            used, answer, seen = transfer(
                tmp_path / "shipped", ports["8443"], protocol, upload=upload, stop_at_a_file=False
            )
            assert not seen, f"nginx wrote the body ({protocol}) to {seen}"
            assert used == version
            if upload:
                assert json.loads(answer) == {"bytes": len(UPLOAD), "sha256": hashlib.sha256(UPLOAD).hexdigest()}
            else:
                assert answer == ANSWER  # whole: the client got it all, only later
    finally:
        server.stop()
