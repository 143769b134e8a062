"""The stores the app and the engine share: the in-memory cache (bounded, least recently used out first) and the
disk stores (one versioning rule: a bumped version never reads an older version's files)."""
from sparse_core import bench, calibrate, fast_decode, metrics, models, peer, tuning
from sparse_core.store import BoundedCache, DiskStore


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


def test_a_disk_store_reads_back_only_its_own_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    old, new = DiskStore("decode", 2), DiskStore("decode", 3)
    old.save("key", {"tok_s": 1.0})
    assert old.load("key") == {"tok_s": 1.0} and new.load("key") is None  # measured by the older procedure: not read
    assert new.save("key", {"tok_s": 2.0}) == new.load("key") and old.load("key") == {"tok_s": 1.0}
    new.path("key").write_text("{not json")
    assert new.load("key") is None  # a file that cannot be read counts as missing


def test_every_disk_store_follows_the_one_rule():
    stores = [metrics._MEASURED, fast_decode._COMPILE_SECONDS, bench._DECODES, peer._RESULTS,
              models._ROUTES, calibrate._CALIBRATIONS, tuning._COSTS]
    for store in stores:
        assert store.folder.name == f"{store.kind}-v{store.version}" and "-v" not in store.kind
    assert len({store.folder for store in stores}) == len(stores)
