"""The one way the project opens a Redis client: standalone or Redis Cluster, by URL.

``FLEET_REDIS_URL`` names a standalone Redis (``redis://``, ``rediss://``, ``unix://``)
or a Redis Cluster (``redis+cluster://host:port``, ``rediss+cluster://`` with TLS): one
node of the cluster; the client finds the others and follows the slots as they move.
A cluster client speaks database 0 only.

In cluster mode the keys that a script or transaction touches together carry a hash
tag so they share a slot (:class:`~fleet_telemetry.core.redis_keys.RedisKeys`); the
standalone names stay as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # the settings import this module: the client library loads on first use
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

RedisClient: TypeAlias = "aioredis.Redis | RedisCluster"
"""A client of either kind; both speak the commands the project uses."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""The URL schemes of a Redis Cluster and the plain scheme the client is given."""


def is_cluster_url(url: str) -> bool:
    """True when ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def is_cluster_client(client: RedisClient) -> bool:
    """True for a Redis Cluster client: keys in different slots need a command each."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def connect_redis(url: str, *, timeout: float | None = 2.0, **options: Any) -> RedisClient:
    """A client for ``url`` (nothing is connected until the first command): a
    ``RedisCluster`` for a cluster URL, a ``Redis`` otherwise. ``timeout`` bounds each
    connect and each reply. Raises ``ValueError`` for a cluster URL naming a database
    other than 0."""
    if timeout is not None:
        options.setdefault("socket_timeout", timeout)
        options.setdefault("socket_connect_timeout", timeout)
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0; end the URL with /0 or nothing")
    plain = urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme.lower()], path=""))
    return RedisCluster.from_url(plain, **options)
