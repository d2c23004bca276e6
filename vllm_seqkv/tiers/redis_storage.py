"""Redis/Valkey storage (``redis`` PyPI client): blobs under ``prefix + key``, optional TTL."""

from __future__ import annotations

from vllm_seqkv.tiers.storage import Storage


class RedisStorage(Storage):
    """Shared across engines and nodes: the server is the truth (other writers, TTLs)."""

    name = "redis"
    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: bytes = b"seqkv:",
                 ttl_s: int | None = None, timeout_s: float = 0.5, client=None):
        import redis  # only needed when used

        self.client = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def put(self, key, blob):
        self.client.set(self.prefix + key, blob, ex=self.ttl_s)

    def get(self, key):
        return self.client.get(self.prefix + key)

    def delete(self, key):
        self.client.delete(self.prefix + key)

    def exists(self, key) -> bool:
        return bool(self.client.exists(self.prefix + key))
