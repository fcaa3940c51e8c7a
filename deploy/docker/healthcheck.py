"""Container health checks for the dermq images (Docker HEALTHCHECK, compose).

    python /opt/dermq/healthcheck.py api      # GET /healthz on the API's port (https when uvicorn serves TLS)
    python /opt/dermq/healthcheck.py flower   # GET /healthcheck on Flower's port (exempt from its basic auth)

Exit status 0 when healthy, 1 otherwise. Standard library only, and it never imports dermq: a check
runs every few seconds and must start fast. It reads the same DERMQ_* variables as the process it
checks, with the same defaults as core.config.Settings (tests/deploy compares them).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

API_PORT_DEFAULT = "8000"
FLOWER_PORT_DEFAULT = "5555"


def health_url(target: str) -> str:
    if target == "api":
        port = os.environ.get("DERMQ_API_PORT", API_PORT_DEFAULT)
        scheme = "https" if os.environ.get("DERMQ_TLS_CERTFILE") else "http"
        return f"{scheme}://127.0.0.1:{port}/healthz"
    if target == "flower":
        port = os.environ.get("DERMQ_FLOWER_PORT", FLOWER_PORT_DEFAULT)
        return f"http://127.0.0.1:{port}/healthcheck"
    raise SystemExit(f"unknown target {target!r}: use 'api' or 'flower'")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: healthcheck.py api|flower")
    url = health_url(argv[1])
    # Loopback to the process's own certificate, issued for the public name: nothing to verify here.
    context = ssl._create_unverified_context()  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
            healthy = response.status == 200
    except Exception as exc:  # any failure is "unhealthy"; say why in `docker inspect`
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
