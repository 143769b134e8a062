"""The in-memory cache the app and the engine share: bounded, least recently used out first."""
from sparse_core.store import BoundedCache


def test_a_read_keeps_an_entry_and_the_least_recently_used_goes():
    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_a_missing_key_gives_the_default_and_a_put_replaces_in_place():
    cache = BoundedCache(2)
    assert cache.get("x", "none") == "none"
    cache.put("a", 1)
    cache.put("a", 2)
    cache.put("b", 3)
    assert cache.get("a") == 2 and list(cache) == ["b", "a"]
