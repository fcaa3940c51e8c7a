"""Connection URLs whose password would be read in part as the host or the port.

A URL's password must percent-encode the characters that end its user part, or the clients read the
rest of the password as something else and then print it: SQLAlchemy ends the password at its first
``@`` and takes what follows as the host (``could not translate host name "<rest>@postgres"``, and
in production the refusal of a database reached without ``verify-full`` named that host); Python's
``urllib``, which redis-py and kombu parse a Redis URL with, ends the host part at the first ``/``,
``?`` or ``#`` and takes what came before it in the password as the port (``Port could not be cast to
integer value as '<start of the password>'``, in a traceback that every process printed at start).
Such a URL never connects, in any environment, so it is refused when the settings are read, with a
message that names the setting and never a part of the URL.

In production a Redis URL must also carry a password unless it stays on the host, and a TLS one
(``rediss://``) must verify the server's certificate (:func:`redis_prod_problem`).

TLS to Redis is set in the URL alone, the same for every process: ``rediss://`` and the parameters
of :data:`TLS_PARAMETERS` (``?ssl_cert_reqs=required&ssl_ca_certs=/run/secrets/redis-ca.pem``).
redis-py reads them from the URL; Celery's broker connection (kombu) and Flower's broker page get
them as ``broker_use_ssl`` (:func:`redis_tls`): Flower ignores a URL's, and kombu, given none, skipped
the check of the server's certificate.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from core import db_tls


def url_password(url: str) -> str | None:
    """The password a connection URL holds (percent-decoded), or None, read as its client reads it: a
    Redis URL as redis-py and kombu do (``urllib``: to the last ``@``), a database URL as SQLAlchemy
    does (to the first ``@``; ``urlsplit`` would end it at a ``/`` and judge a generated password by
    its start, or find none)."""
    try:
        if urlsplit(url).scheme in ("redis", "rediss", *SOCKET_SCHEMES):
            password = urlsplit(url).password
            return unquote(password) if password else None
        return make_url(url).password or None
    except (ArgumentError, ValueError):  # not a URL, or a port that is not a number: the client refuses it
        return None


def database_url_problem(url: str) -> str | None:
    """Why ``DERMQ_DATABASE_URL`` cannot be read as SQLAlchemy reads it, or None."""
    try:
        host = make_url(url).host
    except ValueError:  # a port that is not a number: int() quotes it, and it may be a password's part
        return (
            "DERMQ_DATABASE_URL cannot be read: its port is not a number, or its password holds an '@' "
            "that is not percent-encoded; write '@' in the password as %40"
        )
    if host and "@" in host:
        return (
            "DERMQ_DATABASE_URL cannot be read: its password holds an '@' that is not percent-encoded, so "
            "the rest of the password would be taken for the host; write '@' in the password as %40"
        )
    return None


def redis_url_problem(url: str) -> str | None:
    """Why ``DERMQ_REDIS_URL`` cannot be read as redis-py and kombu read it, or None."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    after_host = url.partition("://")[2][len(parts.netloc) :]
    if port == -1 or ("@" in after_host and "@" not in parts.netloc):
        return (
            "DERMQ_REDIS_URL cannot be read: its port is not a number, or it holds an '@' after the host part, "
            "which a '/', '?' or '#' in the password ends early, taking the start of the password for the "
            "port; percent-encode those characters in the password (%2F, %3F, %23) and any '@' after the "
            "host (%40)"
        )
    query = parse_qs(parts.query)
    given = {name for name in query if name.startswith("ssl_")}
    if repeated := sorted(name for name in given if len(query[name]) > 1):  # redis-py reads the first, kombu the last
        return f"DERMQ_REDIS_URL gives {', '.join(repeated)} more than once; give each TLS parameter once"
    if given and parts.scheme != "rediss":
        return "DERMQ_REDIS_URL has TLS parameters (ssl_...) but not the scheme rediss://, which TLS needs"
    if given - set(TLS_PARAMETERS):
        return (
            f"DERMQ_REDIS_URL: {', '.join(sorted(given - set(TLS_PARAMETERS)))} is not a TLS parameter that "
            f"every dermq process passes on; use {', '.join(TLS_PARAMETERS)}"
        )
    tls = redis_tls(url)
    if tls is not None and tls["ssl_cert_reqs"] not in ("required", "optional", "none"):
        return "DERMQ_REDIS_URL: ssl_cert_reqs must be required (or, outside production, optional or none)"
    return None


#: The TLS parameters a ``rediss://`` URL may carry, as redis-py names them: whether and how the
#: server's certificate is checked (``required``, the default, or ``optional`` or ``none``: refused in
#: production), the CA file that signed it, and a client certificate and key if Redis asks for one.
TLS_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def redis_tls(url: str) -> dict[str, str] | None:
    """The TLS options of a ``rediss://`` URL (Celery's ``broker_use_ssl``), the server's certificate
    checked unless it says otherwise (as redis-py does); None for any other scheme."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    given = {name: values[-1] for name, values in parse_qs(parts.query).items() if name in TLS_PARAMETERS}
    return {"ssl_cert_reqs": "required", **given}


#: URL schemes of a Redis reached through a Unix socket (redis-py's, and kombu's transport name)
SOCKET_SCHEMES = ("unix", "redis+socket")


def redis_prod_problem(url: str) -> str | None:
    """Why production must not use ``DERMQ_REDIS_URL``, or None: it names no password and reaches Redis
    over a network, or it is a TLS URL that does not verify the server (``ssl_cert_reqs`` other than
    ``required``: whoever stands between could read the traffic and answer as Redis). Whoever reaches a
    Redis that asks for no password can queue tasks, send the workers control commands (shut every one
    down, past Flower's login) and clear the rate limits. A Unix socket (its file's mode decides who
    may connect) or a loopback address needs none (``make run``, the tests, a ``dermq`` command on a
    host without Redis); the message names the setting and the host, never the URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = redis_tls(url)
    if tls is not None and tls["ssl_cert_reqs"] != "required":
        return (
            f"refusing to start: DERMQ_REDIS_URL has ssl_cert_reqs={tls['ssl_cert_reqs']} for the Redis at {host}; "
            "in production the server's certificate is verified: ssl_cert_reqs=required&ssl_ca_certs=<the CA's "
            "file> (deploy/README.md, 'Redis TLS')"
        )
    if parts.scheme in SOCKET_SCHEMES or parts.password or db_tls.is_local(host):
        return None
    return (
        f"refusing to start: DERMQ_REDIS_URL names no password for the Redis at {host}; in production the "
        "broker must require one (whoever reaches it could queue tasks and stop the workers). Give Redis a "
        "user with a password (an ACL user, or requirepass for the default one) and put them in the URL, "
        "redis://<user>:<password>@<host>:6379/0, from a secret file (deploy/README.md, 'Redis authentication')"
    )
