"""The sparsity setting as a value: a frozen `SparsitySpec` passed per call, never stored on the shared model.

A spec holds one number per (layer, projection group). What the number means depends on the method:
  teal  -> magnitude threshold t: inputs with |x| <= t are skipped (0 keeps every non-zero input)
  cats  -> threshold on |act(gate(x))| for the MLP intermediate ("mlp_mid" column); other groups stay dense
  topk  -> fraction of inputs dropped per token (0.5 keeps the larger half of |x|), no calibration needed
  dense -> nothing is skipped
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

SPEC_VERSION = 1
METHODS = ("dense", "teal", "cats", "topk")
# q/k/v share the attention input, o has its own, gate/up share the MLP input, down has its own.
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_mid")


class SpecError(ValueError):
    """A spec that cannot be used: wrong model, wrong version, bad values. The message is one sentence."""


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    method: str
    values: tuple[tuple[float, ...], ...]  # [layer][group index in GROUPS]
    model_fingerprint: str
    version: int = SPEC_VERSION
    targets: tuple[tuple[float, ...], ...] | None = None  # the sparsity each value was calibrated for
    provenance: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise SpecError(f"Unknown sparsity method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.version != SPEC_VERSION:
            raise SpecError(f"Spec version {self.version} is not supported (this build reads version {SPEC_VERSION}).")
        for table, name in ((self.values, "values"), (self.targets, "targets")):
            if table is None:
                continue
            for layer, row in enumerate(table):
                if len(row) != len(GROUPS):
                    raise SpecError(f"Spec {name} for layer {layer} has {len(row)} entries; expected {len(GROUPS)} ({', '.join(GROUPS)}).")
                for group, v in zip(GROUPS, row):
                    _check_number(v, f"{name}[{layer}][{group}]", upper=1.0 if (name == "targets" or self.method == "topk") else None)

    @property
    def num_layers(self) -> int:
        return len(self.values)

    @property
    def is_dense(self) -> bool:
        return self.method == "dense" or all(v == 0.0 for row in self.values for v in row)

    @property
    def label(self) -> str:
        """What to call this spec wherever a result it produced is shown: its given name, else method and target."""
        named = dict(self.provenance).get("name")
        if named:
            return named
        if self.method == "dense":
            return "dense"
        allocation = dict(self.provenance).get("allocation", "uniform")
        if self.uniform_target is not None and allocation == "uniform":
            return f"{self.method.upper()} {self.uniform_target:.0%}"
        target = dict(self.provenance).get("target")
        return f"{self.method.upper()} {allocation}" + (f" {float(target):.0%}" if target else "")

    @property
    def uniform_target(self) -> float | None:
        """The one sparsity every sparsified (layer, group) was calibrated for, None where they differ."""
        targets = {t for row in (self.targets or ()) for t in row if t > 0}
        return targets.pop() if len(targets) == 1 else None

    def value(self, layer: int, group: str) -> float:
        return self.values[layer][GROUPS.index(group)]

    # ---- constructors ------------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int, model_fingerprint: str) -> "SparsitySpec":
        return cls("dense", _table(num_layers, 0.0), model_fingerprint)

    def zeroed(self) -> "SparsitySpec":
        """This method with nothing skipped (but exact zeros): the dense output, with the scores it thresholds
        exposed to observers (CATS' gate activation too)."""
        return SparsitySpec(self.method, _table(self.num_layers, 0.0), self.model_fingerprint)

    @classmethod
    def uniform_topk(cls, num_layers: int, model_fingerprint: str, sparsity: float) -> "SparsitySpec":
        """Top-k keeps the (1 - sparsity) largest |x| of every projection input, per token."""
        _check_number(sparsity, "sparsity", upper=1.0)
        table = _table(num_layers, sparsity)
        return cls("topk", table, model_fingerprint, targets=table)

    @classmethod
    def from_tables(cls, method: str, values: Sequence[Sequence[float]], model_fingerprint: str,
                    targets: Sequence[Sequence[float]] | None = None, **provenance: str) -> "SparsitySpec":
        number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # else __post_init__ names it
        as_tuple = lambda t: tuple(tuple(number(v) for v in row) for row in t)
        return cls(method, as_tuple(values), model_fingerprint,
                   targets=None if targets is None else as_tuple(targets),
                   provenance=tuple(sorted((k, str(v)) for k, v in provenance.items())))

    def with_provenance(self, **extra: str) -> "SparsitySpec":
        merged = dict(self.provenance) | {k: str(v) for k, v in extra.items()}
        return dataclasses.replace(self, provenance=tuple(sorted(merged.items())))

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "groups": list(GROUPS),
            "values": [list(r) for r in self.values],
            "targets": None if self.targets is None else [list(r) for r in self.targets],
            "provenance": dict(self.provenance),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparsitySpec":
        if not isinstance(data, Mapping):
            raise SpecError("A spec must be a JSON object with 'version', 'method', 'model_fingerprint' and 'values'.")
        missing = [k for k in ("version", "method", "model_fingerprint", "values") if k not in data]
        if missing:
            raise SpecError(f"The spec is missing the field(s) {', '.join(missing)}.")
        if list(data.get("groups", GROUPS)) != list(GROUPS):
            raise SpecError(f"The spec's groups {data.get('groups')} do not match {list(GROUPS)}.")
        try:
            return cls.from_tables(str(data["method"]), data["values"], str(data["model_fingerprint"]),
                                   data.get("targets"), **dict(data.get("provenance") or {}))
        except SpecError:
            raise
        except (TypeError, ValueError) as err:
            raise SpecError(f"The spec's tables are malformed ({err}).") from None

    @classmethod
    def from_json(cls, text: str) -> "SparsitySpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"The spec is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from None
        if isinstance(data, Mapping) and data.get("version") != SPEC_VERSION:
            raise SpecError(f"Spec version {data.get('version')!r} is not supported (this build reads version {SPEC_VERSION}).")
        return cls.from_dict(data)

    def check_model(self, fingerprint: str, num_layers: int) -> None:
        """Refuse a spec made for another model: its thresholds would be meaningless here."""
        if self.model_fingerprint != fingerprint:
            raise SpecError(f"This spec was made for model {self.model_fingerprint}, not the loaded model {fingerprint}; calibrate a new one.")
        if self.num_layers != num_layers:
            raise SpecError(f"This spec covers {self.num_layers} layers but the model has {num_layers}.")


def _table(num_layers: int, value: float) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(value for _ in GROUPS) for _ in range(num_layers))


def _check_number(v: Any, name: str, upper: float | None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(f"{name} must be a number, got {v!r}.")
    if math.isnan(v) or math.isinf(v):
        raise SpecError(f"{name} is {v}; every value must be a finite number.")
    if v < 0:
        raise SpecError(f"{name} is {v}; values cannot be negative.")
    if upper is not None and v > upper:
        raise SpecError(f"{name} is {v}; a sparsity must lie between 0 and 1.")
