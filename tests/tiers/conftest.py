import pytest

from seqkv_fixtures.redis_server import local_redis_server, redis_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    pytest.importorskip("redis", reason="the `redis` client is not installed (pip install redis)")
    exe = redis_binary(install=True)
    if exe is None:
        pytest.skip("no redis-server/valkey-server and apt-get could not install one")
    with local_redis_server(exe, tmp_path_factory.mktemp("redis")) as server:
        yield server
