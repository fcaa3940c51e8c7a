"""Transport security of the database connection: in production, a Postgres reached over a network
must be reached with ``sslmode=verify-full``.

``verify-full`` is the one libpq mode that both encrypts and checks that the server's certificate is
signed by the CA in ``sslrootcert`` *and* names the host the URL connects to. ``require`` accepts any
certificate, ``verify-ca`` any host that holds one from the same CA (another database of the same
provider, say), and ``prefer`` or ``allow`` fall back to plain text: with any of them a host on the
path can read or impersonate the database. A local connection (a Unix socket, or a loopback
address) crosses no network and stays as it is (``make run``, the tests).

The check reads the URL as libpq will: its host (``postgres``, or several in a ``host=a,b`` query
parameter), ``hostaddr`` and ``sslmode``, and where the URL names none, ``PGHOST``, ``PGHOSTADDR``
and ``PGSSLMODE`` from the environment. Its message names the hosts and the mode, never the URL
(which holds the password).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from sqlalchemy.engine import make_url

REQUIRED_SSLMODE = "verify-full"
#: libpq's default when neither the URL nor PGSSLMODE names a mode
DEFAULT_SSLMODE = "prefer"


def _values(value: str | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, tuple) else (value,)
    return [part.strip() for item in items for part in item.split(",")]


def is_local(host: str) -> bool:
    """A Unix socket (empty, or a directory path; ``@`` an abstract one) or a loopback address."""
    if not host or host.startswith(("/", "@")) or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def network_hosts(url: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The hosts and addresses of ``url`` that are not local (empty: every connection stays local)."""
    environ = os.environ if environ is None else environ
    parsed = make_url(url)
    hosts = ([parsed.host] if parsed.host else []) + _values(parsed.query.get("host"))
    addresses = _values(parsed.query.get("hostaddr"))
    if not hosts:
        hosts = _values(environ.get("PGHOST"))
    if not addresses:
        addresses = _values(environ.get("PGHOSTADDR"))
    return [host for host in [*hosts, *addresses] if not is_local(host)]


def sslmode(url: str, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    modes = _values(make_url(url).query.get("sslmode"))
    return modes[-1] if modes else environ.get("PGSSLMODE", DEFAULT_SSLMODE)


def transport_problem(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Why production must not connect to the database this way, or None."""
    remote = network_hosts(url, environ)
    mode = sslmode(url, environ)
    if not remote or mode == REQUIRED_SSLMODE:
        return None
    return (
        f"refusing to start: the database at {', '.join(sorted(set(remote)))} is reached with sslmode={mode}; over a "
        f"network production needs sslmode={REQUIRED_SSLMODE}, which checks the server's certificate and name "
        "against a CA you mount. Add ?sslmode=verify-full&sslrootcert=/run/secrets/postgres-ca.crt to "
        "DERMQ_DATABASE_URL and mount that CA (deploy/README.md, 'Database TLS')"
    )
