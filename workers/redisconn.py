"""Every Redis client of Cocoon is made here, from one URL: the web server's, the bot's, the
watcher's and the worker nodes' (through :mod:`workers.redis_auth`).

Two kinds of URL:

- ``redis://``, ``rediss://`` (TLS), ``unix://``: one server, as redis-py reads them.
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` (``rediss+sentinel``:
  TLS to the data servers): the primary of ``service`` as Redis Sentinel names it. The clients
  ask the sentinels for the primary at every new connection, so after a failover they reach the
  new primary on their own (redis-py's Sentinel). The credentials are the data servers' (a
  worker's ACL user); the sentinels are asked without them.

Imports only redis-py: the node carries no operator code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import Sentinel

__all__ = [
    "SENTINEL_SCHEMES",
    "SentinelTarget",
    "async_client",
    "is_sentinel",
    "is_tls",
    "lacks_tls",
    "parse_sentinel",
    "sync_client",
    "with_credentials",
    "without_credentials",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
MAX_SENTINELS = 16
SENTINEL_TIMEOUT_S = 2.0  # a sentinel that does not answer in this long is skipped


class _BlockingAsyncSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """A sentinel-managed pool that waits for a free connection (up to ``timeout``) instead of
    failing at ``max_connections``: the dispatcher's, as with a single server."""


class _AsyncSentinelClient(aioredis.Redis):
    """The primary's client; closing it closes its connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


class _SentinelClient(redis.Redis):
    """The primary's client; closing it closes its connections to the sentinels too."""

    def close(self) -> None:
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def is_tls(url: str) -> bool:
    """The data servers are reached over TLS (``rediss://`` or ``rediss+sentinel://``)."""
    return urlsplit(url).scheme in {"rediss", "rediss+sentinel"}


def lacks_tls(url: str, tee: str) -> bool:
    """A worker of TEE kind ``tee`` may not be given ``url``: it is not TLS, and only a
    development-TEE worker may be told a plain ``redis://`` (the backend refuses to tell it, the
    worker refuses to use it)."""
    return tee != "dev" and not is_tls(url)


def _split_netloc(netloc: str) -> tuple[str, str]:
    """``(userinfo, hosts)`` of a netloc (userinfo ``""`` when there is none)."""
    userinfo, at, hosts = netloc.rpartition("@")
    return (userinfo if at else ""), hosts


def parse_sentinel(url: str) -> SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL; ValueError names what is wrong (never the
    password)."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Redis Sentinel URL: {parts.scheme}://")
    userinfo, hosts = _split_netloc(parts.netloc)
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "26379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a sentinel must be host:port, not {item!r}")
        sentinels.append((host, int(port)))
    if not 0 < len(sentinels) <= MAX_SENTINELS:
        raise ValueError(f"a Redis Sentinel URL names 1 to {MAX_SENTINELS} sentinels")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a Redis Sentinel URL's path is /service or /service/db")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database of a Redis Sentinel URL is a number, not {path[1]!r}")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None and username is not None:  # redis://secret@host: a password
            username, password = None, username
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        tls=parts.scheme == "rediss+sentinel",
    )


def without_credentials(url: str) -> str:
    """``url`` without its userinfo (for clients given a credential provider)."""
    parts = urlsplit(url)
    _userinfo, hosts = _split_netloc(parts.netloc)
    return urlunsplit((parts.scheme, hosts, parts.path, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password`` as its userinfo (any it had is replaced), query kept."""
    parts = urlsplit(url)
    _userinfo, hosts = _split_netloc(parts.netloc)
    if not hosts:
        hosts = "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _sentinel_kwargs(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options of the data servers, from the URL and the caller."""
    kwargs = dict(options)
    kwargs.setdefault("db", target.db)
    if target.username is not None:
        kwargs.setdefault("username", target.username)
    if target.password is not None:
        kwargs.setdefault("password", target.password)
    if target.tls:
        kwargs["ssl"] = True
    else:
        kwargs.pop("ssl_ca_data", None)
    return kwargs


def _sentinel_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": options.get("socket_connect_timeout") or SENTINEL_TIMEOUT_S,
    }


def async_client(
    url: str,
    *,
    max_connections: int | None = None,
    blocking_timeout: float | None = None,
    **options: Any,
) -> aioredis.Redis:
    """A ``redis.asyncio.Redis`` for ``url``. ``max_connections`` bounds its pool; with
    ``blocking_timeout`` a caller past it waits that long for a free connection (else it
    fails at once). ``options`` are redis-py's connection options."""
    if max_connections is not None:
        options["max_connections"] = max_connections
    if not is_sentinel(url):
        if blocking_timeout is not None:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, timeout=blocking_timeout, **options
            )
            return aioredis.Redis(connection_pool=pool)
        return aioredis.Redis.from_url(url, **options)
    target = parse_sentinel(url)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(options))
    kwargs = _sentinel_kwargs(target, options)
    if blocking_timeout is not None:
        client: aioredis.Redis = sentinel.master_for(
            target.service,
            redis_class=_AsyncSentinelClient,
            connection_pool_class=_BlockingAsyncSentinelPool,
            timeout=blocking_timeout,
            **kwargs,
        )
    else:
        client = sentinel.master_for(target.service, redis_class=_AsyncSentinelClient, **kwargs)
    return client


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (RQ's connections, the CLI's checks)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel(url)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(options))
    client: redis.Redis = sentinel.master_for(
        target.service, redis_class=_SentinelClient, **_sentinel_kwargs(target, options)
    )
    return client
