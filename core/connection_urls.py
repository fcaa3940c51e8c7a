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

In production a Redis URL must also carry a password unless it stays on the host
(:func:`redis_auth_problem`).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

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
    return None


#: URL schemes of a Redis reached through a Unix socket (redis-py's, and kombu's transport name)
SOCKET_SCHEMES = ("unix", "redis+socket")


def redis_auth_problem(url: str) -> str | None:
    """Why production must not use ``DERMQ_REDIS_URL``, or None: it names no password and reaches Redis
    over a network. Whoever reaches a Redis that asks for none can queue tasks, send the workers
    control commands (shut every one down, past Flower's login) and clear the rate limits. A Unix
    socket (its file's mode decides who may connect) or a loopback address stays as it is (``make
    run``, the tests, a ``dermq`` command on a host without Redis); the message names the setting
    and the host, never the URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme in SOCKET_SCHEMES or parts.password or db_tls.is_local(host):
        return None
    return (
        f"refusing to start: DERMQ_REDIS_URL names no password for the Redis at {host}; in production the "
        "broker must require one (whoever reaches it could queue tasks and stop the workers). Give Redis a "
        "user with a password (an ACL user, or requirepass for the default one) and put them in the URL, "
        "redis://<user>:<password>@<host>:6379/0, from a secret file (deploy/README.md, 'Redis authentication')"
    )
