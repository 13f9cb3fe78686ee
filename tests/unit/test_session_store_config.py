"""`sessions.store`: memory or a Redis URL; a bad value or an unreachable store stops the registry with a clear
message."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, SessionsConfig, load_config
from services.sessions import __main__ as registry_main
from services.sessions.redis_store import RedisSessionStore
from services.sessions.store import InMemorySessionStore, open_store
from tests.support.stack import free_port


@pytest.mark.parametrize(
    "url", ["memory", "redis://valkey:6379/0", "rediss://user:pw@db.example:6380", "unix:///run/v.sock"]
)
def test_memory_and_redis_urls_are_accepted(url):
    config = load_config(env={"ARK__SESSIONS__STORE": url})
    assert config.sessions.store == url
    expected = InMemorySessionStore if url == "memory" else RedisSessionStore
    assert isinstance(open_store(config.sessions), expected)


@pytest.mark.parametrize("url", ["", "valkey", "http://cache:6379", "redis://", "memcached://x:1"])
def test_anything_else_fails_at_start_naming_the_field(url):
    with pytest.raises(ConfigError) as info:
        load_config(env={"ARK__SESSIONS__STORE": url})
    assert "sessions.store" in str(info.value)
    assert "redis://" in str(info.value)


async def test_an_unreachable_store_stops_the_registry_with_its_reason(monkeypatch):
    monkeypatch.setattr(registry_main, "STORE_WAIT_SECONDS", 0.3)
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as info:
        await registry_main.connect(SessionsConfig(store=url))
    assert "sessions.store" in str(info.value) and url in str(info.value) and "unreachable" in str(info.value)
