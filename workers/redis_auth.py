"""How a worker node reaches Redis: TLS outside the development TEE, and credentials that can
be replaced without rebuilding its clients.

* An attested worker in a real TEE accepts only a ``rediss://`` (or ``rediss+sentinel://``)
  URL (:func:`tls_refusal`): its ACL password and every sealed job cross the network, and the
  TLS certificate is checked against the CA bundle the backend sent with the credentials
  (``redis_ca_pem``), or against
  the system's CAs. Only a development-TEE worker may be told a plain ``redis://``.
* The clients take their username and password from a :class:`NodeCredentials` (redis-py's
  ``CredentialProvider``) at every (re)connection, so that a node given new credentials after a
  re-attestation goes on with the same clients.

Imports only redis-py: the node carries no operator code.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.credentials import CredentialProvider

from workers import redisconn

__all__ = ["NodeCredentials", "TlsRefused", "async_client", "sync_client", "tls_refusal"]

TLS_SCHEME = "rediss"


class TlsRefused(Exception):
    """An attested worker was told a Redis URL without TLS: it does not connect."""


def tls_refusal(url: str, tee: str) -> str | None:
    """Why a worker of TEE kind ``tee`` must not use ``url`` (None: it may)."""
    if not redisconn.lacks_tls(url, tee):
        return None
    scheme = urlsplit(url).scheme
    return (
        f"the backend gave a {scheme or 'schemeless'}:// Redis URL; a worker outside the "
        "development TEE connects only with TLS (rediss://), so that its password and its "
        "jobs never cross the network in the clear"
    )


class NodeCredentials(CredentialProvider):
    """The node's Redis username and password, read at every connection; :meth:`replace` them
    after a re-attestation gave new ones."""

    def __init__(self, url: str) -> None:
        self.username = ""
        self.password = ""
        self.replace(url)

    def replace(self, url: str) -> None:
        parts = urlsplit(url)
        self.username = unquote(parts.username or "")
        self.password = unquote(parts.password or "")

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        if self.username:
            return self.username, self.password
        return (self.password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()

    def __bool__(self) -> bool:
        return bool(self.username or self.password)


def _options(url: str, credentials: NodeCredentials | None, ca_pem: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if credentials:
        options["credential_provider"] = credentials
    if ca_pem and redisconn.is_tls(url):
        options["ssl_ca_data"] = ca_pem
    return options


def sync_client(
    url: str, *, credentials: NodeCredentials | None = None, ca_pem: str | None = None
) -> redis.Redis:
    """A ``redis.Redis`` for ``url``; with ``credentials``, its userinfo is theirs."""
    target = redisconn.without_credentials(url) if credentials else url
    return redisconn.sync_client(target, **_options(url, credentials, ca_pem))


def async_client(
    url: str,
    *,
    credentials: NodeCredentials | None = None,
    ca_pem: str | None = None,
    max_connections: int | None = None,
) -> AsyncRedis:
    """A ``redis.asyncio.Redis`` for ``url``; with ``credentials``, its userinfo is theirs."""
    target = redisconn.without_credentials(url) if credentials else url
    options = _options(url, credentials, ca_pem)
    return redisconn.async_client(target, max_connections=max_connections, **options)
