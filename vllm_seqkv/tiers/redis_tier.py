"""Redis/Valkey tier (``redis`` PyPI client). Server down -> miss + warning, never raises."""

from __future__ import annotations

from vllm_seqkv.tiers.base import Tier


class RedisTier(Tier):
    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", codec=None,
                 capacity_bytes: int | None = None, prefix: bytes = b"seqkv:",
                 ttl_s: int | None = None, timeout_s: float = 0.5, client=None):
        super().__init__(codec, capacity_bytes)
        import redis

        self.client = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _put(self, k, blob):
        self.client.set(self.prefix + k, blob, ex=self.ttl_s)

    def _get(self, k):
        return self.client.get(self.prefix + k)

    def _del(self, k):
        self.client.delete(self.prefix + k)

    def __contains__(self, key) -> bool:  # the server is the truth (other writers, TTLs)
        from vllm_seqkv.tiers.blob import key_bytes

        try:
            return bool(self.client.exists(self.prefix + key_bytes(key)))
        except Exception:
            return False
