"""Redis coordination: per-replica KV snapshots and reserve leases, with TTLs.

    cacheopt:snapshot:<replica>   JSON KVSnapshot, expires SNAPSHOT_TTL_S after its last publish
    cacheopt:lease:<replica>      blocks of the cluster reserve leased to the replica, LEASE_TTL_S
    cacheopt:lease_epoch          the epoch of the last lease set written

The global scheduler writes all leases of one rebalancing at once with a Lua script that
refuses an epoch older than the stored one, so a restarted or slow scheduler cannot
overwrite a newer split. A replica that stops publishing disappears from routing when its
snapshot expires, and its lease expires after it. Every call raises `StoreUnavailable`
when Redis is unreachable; callers keep their last values and carry on.
"""

from __future__ import annotations

import json

SNAPSHOT_TTL_S = 3.0
LEASE_TTL_S = 10.0
PREFIX = "cacheopt"

# KEYS: lease keys, then the epoch key. ARGV: epoch, ttl_ms, then one value per lease key.
SET_LEASES = """
local epoch = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[#KEYS]) or '-1')
if epoch <= current then return current end
for i = 1, #KEYS - 1 do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[2])
end
redis.call('SET', KEYS[#KEYS], ARGV[1])
return epoch
"""


class StoreUnavailable(Exception):
    pass


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 0.5):
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._set_leases = self._redis.register_script(SET_LEASES)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as error:
            raise StoreUnavailable(str(error)) from None

    def publish_snapshot(self, replica: str, snapshot: dict) -> None:
        self._call(self._redis.set, f"{PREFIX}:snapshot:{replica}", json.dumps(snapshot),
                   px=int(SNAPSHOT_TTL_S * 1000))

    def snapshots(self, replicas: list[str]) -> dict[str, dict]:
        values = self._call(self._redis.mget, [f"{PREFIX}:snapshot:{r}" for r in replicas])
        return {r: json.loads(v) for r, v in zip(replicas, values) if v is not None}

    def set_leases(self, epoch: int, leases: dict[str, int]) -> int:
        """Write every lease (atomically); returns the stored epoch, which is larger than
        `epoch` when a newer split was already written."""
        names = sorted(leases)
        keys = [f"{PREFIX}:lease:{r}" for r in names] + [f"{PREFIX}:lease_epoch"]
        args = [epoch, int(LEASE_TTL_S * 1000)] + [leases[r] for r in names]
        return int(self._call(self._set_leases, keys=keys, args=args))

    def lease(self, replica: str) -> int | None:
        value = self._call(self._redis.get, f"{PREFIX}:lease:{replica}")
        return None if value is None else int(value)

    def epoch(self) -> int:
        value = self._call(self._redis.get, f"{PREFIX}:lease_epoch")
        return -1 if value is None else int(value)
