"""Redis coordination: per-replica KV snapshots and reserve leases, with TTLs.

    cacheopt:snapshot:<replica>   JSON KVSnapshot, expires SNAPSHOT_TTL_S after its last publish
    cacheopt:lease:<replica>      JSON {"blocks", "epoch"}: the replica's share of the cluster
                                  reserve, expires LEASE_TTL_S after the split that wrote it
    cacheopt:lease_epoch          the epoch of the last lease set written

The global scheduler writes all leases of one rebalancing at once with a Lua script that
refuses an epoch older than the stored one, so a restarted or slow scheduler cannot
overwrite a newer split; a replica reads its lease with the time it has left and keeps
it no longer (global_scheduler.reserve.freshest_lease). A replica that stops publishing
disappears from routing when its snapshot expires, and its lease expires after it.

Every Redis failure (connection lost, read-only replica, out of memory, NOAUTH, a
timeout) raises `StoreUnavailable`, and a value that does not parse reads as missing:
both are counted in `errors`, and callers keep their last values and carry on. Only
`check` (at start) treats refused credentials as fatal: a wrong password is a
configuration error, not an outage.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

from global_scheduler.reserve import Lease

log = logging.getLogger("cacheopt.store")
SNAPSHOT_TTL_S = 3.0
LEASE_TTL_S = 10.0
PREFIX = "cacheopt"

# KEYS: lease keys, then the epoch key. ARGV: epoch, ttl_ms, then one value per lease key.
SET_LEASES = """
local epoch = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[#KEYS]) or '-1') or -1
if epoch <= current then return current end
for i = 1, #KEYS - 1 do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[2])
end
redis.call('SET', KEYS[#KEYS], ARGV[1])
return epoch
"""


class StoreUnavailable(Exception):
    pass


class StoreConfigError(ValueError):
    """Redis refused the configured credentials (or the URL is malformed)."""


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """`redis://[user:password@]host:port/db`, `rediss://` for TLS (with `ssl_ca_certs`
    and the other redis-py options as URL query parameters)."""

    def __init__(self, url: str, *, timeout_s: float = 0.5):
        import redis

        self.url = redacted(url)
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as error:
            raise StoreConfigError(f"redis_url {self.url}: {error}") from None
        self._set_leases = self._redis.register_script(SET_LEASES)
        self._auth_errors = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
                             redis.exceptions.NoPermissionError)
        self._errors = (redis.exceptions.RedisError, OSError)
        self.errors: Counter[str] = Counter()  # kind of failure -> count
        self._failing = False

    def check(self) -> None:
        """At start: raises StoreConfigError when Redis refuses the credentials; an
        unreachable Redis is only logged (coordination resumes when it is back)."""
        try:
            self._redis.ping()
        except self._auth_errors as error:
            raise StoreConfigError(f"Redis at {self.url} refused the credentials: {error}") from None
        except self._errors as error:
            if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
                raise StoreConfigError(f"Redis at {self.url} refused the credentials: {error}") from None
            log.warning("Redis at %s is not reachable yet (%s); serving goes on without it", self.url, error)

    def _call(self, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except self._errors as error:
            self.errors[type(error).__name__] += 1
            if not self._failing:
                log.warning("Redis at %s failed (%s: %s); keeping the last values", self.url,
                            type(error).__name__, error)
            self._failing = True
            raise StoreUnavailable(f"{type(error).__name__}: {error}") from None
        if self._failing:
            log.info("Redis at %s answers again", self.url)
            self._failing = False
        return result

    def _bad_value(self, key: str, value) -> None:
        self.errors["bad_value"] += 1
        log.warning("Redis key %s holds a value that does not parse (%.80r); ignored", key, value)

    def publish_snapshot(self, replica: str, snapshot: dict) -> None:
        self._call(self._redis.set, f"{PREFIX}:snapshot:{replica}", json.dumps(snapshot),
                   px=int(SNAPSHOT_TTL_S * 1000))

    def snapshots(self, replicas: list[str]) -> dict[str, dict]:
        keys = [f"{PREFIX}:snapshot:{r}" for r in replicas]
        out = {}
        for replica, key, value in zip(replicas, keys, self._call(self._redis.mget, keys)):
            if value is None:
                continue
            try:
                snapshot = json.loads(value)
            except ValueError:
                snapshot = None
            if isinstance(snapshot, dict):
                out[replica] = snapshot
            else:
                self._bad_value(key, value)
        return out

    def set_leases(self, epoch: int, leases: dict[str, int]) -> int:
        """Write every lease (atomically); returns the stored epoch, which is larger than
        `epoch` when a newer split was already written."""
        names = sorted(leases)
        keys = [f"{PREFIX}:lease:{r}" for r in names] + [f"{PREFIX}:lease_epoch"]
        args = [epoch, int(LEASE_TTL_S * 1000)] + [json.dumps({"blocks": leases[r], "epoch": epoch}) for r in names]
        return int(self._call(self._set_leases, keys=keys, args=args))

    def lease(self, replica: str, now: float | None = None) -> Lease | None:
        """The replica's lease as Redis holds it, expiring when its key does."""
        key = f"{PREFIX}:lease:{replica}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        value, ttl_ms = self._call(pipe.execute)
        if value is None:
            return None
        try:
            data = json.loads(value)
            blocks, epoch = data["blocks"], data["epoch"]
            if not (isinstance(blocks, int) and isinstance(epoch, int) and blocks >= 0 and ttl_ms > 0):
                raise ValueError(value)
        except (ValueError, TypeError, KeyError):
            self._bad_value(key, value)
            return None
        return Lease(blocks, epoch, (time.time() if now is None else now) + ttl_ms / 1000)

    def epoch(self) -> int:
        value = self._call(self._redis.get, f"{PREFIX}:lease_epoch")
        try:
            return -1 if value is None else int(value)
        except ValueError:
            self._bad_value(f"{PREFIX}:lease_epoch", value)
            return -1
