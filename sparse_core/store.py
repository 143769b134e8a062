"""Where results are kept so each is measured once per setting: a bounded in-memory cache shared by threads, and
JSON files in the user's cache for measurements (quality, speed) that must come back identical on every surface."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse-lab"


def write_atomically(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def digest(*parts: Any) -> str:
    """A short stable name for a key made of plain values (repr of numbers, strings, tuples)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def measurement_key(model, spec) -> str:
    """What a speed or quality measurement belongs to: the model (weights, dtype, layout, device, dense route) and
    the spec's method and values (not its name or date: two specs with equal values measure the same)."""
    return digest(model.fingerprint, model.weight_key, model.layout, str(model.device), model.dense_route,
                  None if spec is None else (spec.method, spec.values))


class BoundedCache:
    """A dict that forgets its least recently used entry beyond `limit` entries (a read counts as a use, so what
    every visit reads stays while what one visit made ages out); safe to share between threads (sessions)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._items.pop(key, None)
            while len(self._items) >= self.limit:
                self._items.popitem(last=False)
            self._items[key] = value
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        with self._lock:
            return iter(list(self._items))


class DiskStore:
    """One JSON file per key under the cache folder `<kind>-v<version>`. The one versioning rule: a store's version
    goes up when what it keeps changes meaning (another procedure, other fields), so no file of an older procedure is
    ever read back; the reason for each bump is said beside the store. A file that cannot be read counts as missing."""

    def __init__(self, kind: str, version: int):
        self.kind, self.version = kind, version

    @property
    def folder(self) -> Path:
        return cache_dir() / f"{self.kind}-v{self.version}"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, key: str, value: dict) -> dict:
        write_atomically(self.path(key), json.dumps(value))
        return value

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
