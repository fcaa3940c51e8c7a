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
"""

from __future__ import annotations

from urllib.parse import urlsplit

from sqlalchemy.engine import make_url


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
