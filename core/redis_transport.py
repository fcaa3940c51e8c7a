"""Kombu's Redis transport with one client object per channel instead of one per command.

Kombu's Redis channel makes a new ``redis.Redis`` for every synchronous command it sends (its
``conn_or_acquire``): each published message, and in a worker each delivery's bookkeeping
(``QoS.append``) and each acknowledgement. Building one costs more CPU than the command's round
trip; a py-spy profile of a worker under ``python -m bench.load`` put it at a tenth of the main
process. The client only wraps the channel's connection pool, and is safe to share between
threads, so this channel keeps the first one it makes. Everything else is kombu's.

Used for ``redis://`` and ``rediss://`` brokers (:func:`core.queueing.common_config`); a TLS one
takes its options from ``broker_use_ssl``, which is always set for ``rediss://`` (with kombu's own
transport, named by the scheme, a URL without them connected without checking the certificate; with
this one, named apart from it, such a URL would not use TLS at all). Any other scheme keeps kombu's
own transport.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # BRPOP and pub/sub: kombu keeps those clients itself
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


#: ``broker_transport`` for Celery: this module's transport
NAME = f"{__name__}:Transport"
