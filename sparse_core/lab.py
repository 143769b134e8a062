"""One service per loaded model, for whoever drives the engine (the pages, the CLI, bench and selfcheck): the model,
its plain-HF baseline loaded once, the calibrated spec of each (method, target) in one cache, and the setting's one
stored quality and decode-speed measurement. Streamlit-free; a progress callback reports long work to any caller.
"""
from __future__ import annotations

import threading

from . import bench, calibrate, metrics, models
from .calibrate import Progress
from .spec import SparsitySpec
from .store import BoundedCache

MAX_SPECS = 256  # calibrated specs kept in memory (each is a few KB; on disk they come back in milliseconds)


class Lab:
    """A loaded model and what is measured on it. Shared between threads (browser sessions): every method is safe to
    call from several at once, and each measurement is made once per setting (the stores on disk keep it)."""

    def __init__(self, model: models.SparseModel, trust_remote_code: bool = False):
        self.model = model
        self._trust_remote_code = trust_remote_code
        self._plain: models.SparseModel | None = None
        self._plain_lock = threading.Lock()
        self._specs = BoundedCache(MAX_SPECS)

    @classmethod
    def load(cls, name: str = models.DEFAULT_MODEL, dtype: str = "float32", layout: str = "inputs",
             device: str = "auto", trust_remote_code: bool = False) -> Lab:
        return cls(models.load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, layout=layout),
                   trust_remote_code)

    def plain(self) -> models.SparseModel | None:
        """The same weights in HF's own layout with no kernels, the baseline every decode speed is also measured
        against; loaded on first use, once. None where this model is that already (the hf layout)."""
        if self.model.layout == "hf":
            return None
        with self._plain_lock:
            if self._plain is None:
                self._plain = models.load(self.model.name, dtype=str(self.model.dtype).removeprefix("torch."),
                                          device=self.model.device.type, layout="hf",
                                          trust_remote_code=self._trust_remote_code)
            return self._plain

    def spec_for(self, method: str, target: float, progress: Progress | None = None) -> SparsitySpec:
        """The calibrated spec of `method` at `target` (top-k and dense need no calibration), from the cache when it
        was made before."""
        spec = self.known_spec(method, target)
        if spec is None:
            spec = self._specs.put((method, round(target, 4)),
                                   calibrate.calibrate(self.model, method, target, progress=progress))
        return spec

    def known_spec(self, method: str, target: float) -> SparsitySpec | None:
        """The spec of `method` at `target` if it is in the cache: no calibration, nothing to wait for."""
        return self._specs.get((method, round(target, 4)))

    def quality(self, spec: SparsitySpec, progress: Progress | None = None) -> metrics.Evaluation:
        """The setting's one quality measurement: from disk when known, else measured once now."""
        return metrics.measured(self.model, spec, progress=progress)

    def stored_quality(self, spec: SparsitySpec) -> metrics.Evaluation | None:
        return metrics.stored(self.model, spec)

    def decode_speed(self, spec: SparsitySpec | None, compiled: bool) -> dict | None:
        """The setting's valid decode measurement on this machine, if there is one."""
        return bench.stored_decode(self.model, spec, compiled)

    def flagged_decode(self, spec: SparsitySpec | None, compiled: bool) -> dict | None:
        """The setting's last decode measurement when it was flagged (busy machine, above its bound)."""
        return bench.flagged_decode(self.model, spec, compiled)

    def measure_decode(self, spec: SparsitySpec | None, compiled: bool, new_tokens: int | None = None,
                       repeats: int | None = None, progress: Progress | None = None) -> dict:
        """Time the setting's greedy decode against the fastest dense, plain HF included, and store it."""
        return bench.decode_result(self.model, spec, bench.DECODE_TOKENS if new_tokens is None else new_tokens,
                                   bench.DECODE_REPEATS if repeats is None else repeats, plain=self.plain(),
                                   progress=progress, compiled=compiled)
