"""What one decoded token costs in weight traffic, dense against sparse, and the bound that follows.

Batch-1 decoding reads every weight once per token and is limited by memory bandwidth, so a setting that skips a
share s of the bytes read can at best run 1/(1-s) times faster: the bound shown beside every measured speedup.
"""
from __future__ import annotations

import dataclasses

import pandas as pd

from .models import SparseModel

# Assumption, not a measurement: moving one byte from DRAM costs about 20 pJ (order of magnitude for modern
# DRAM interfaces, ~2.5 pJ/bit; older DDR is several times higher). Batch-1 decoding is dominated by weight traffic,
# so bytes x this figure approximates the memory energy per token; arithmetic and caches are left out.
DRAM_PJ_PER_BYTE = 20.0


# ---- per-token cost --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenCost:
    """Weight traffic and multiply-adds of one decoded token, dense vs sparse. Every weight element read takes
    part in exactly one multiply(-add) per token, so multiply-adds count the elements read (attention over the
    context, which reads the KV cache rather than weights, is not included)."""
    dense_bytes: int
    sparse_bytes: int
    bytes_per_element: int
    pj_per_byte: float = DRAM_PJ_PER_BYTE

    @property
    def dense_macs(self) -> int:
        return self.dense_bytes // self.bytes_per_element

    @property
    def sparse_macs(self) -> int:
        return self.sparse_bytes // self.bytes_per_element

    @property
    def bound(self) -> float:
        """The most a memory-bound decoder can gain: dense bytes over sparse bytes, 1/(1-s)."""
        return self.dense_bytes / self.sparse_bytes

    @property
    def reads_skipped(self) -> float:
        """s, the share of all weight bytes read per token that the setting skips: "weight reads skipped"."""
        return 1.0 - self.sparse_bytes / self.dense_bytes

    def energy_uj(self, num_bytes: int) -> float:
        return num_bytes * self.pj_per_byte * 1e-6

    def frame(self) -> pd.DataFrame:
        rows = [("weight bytes read", self.dense_bytes, self.sparse_bytes),
                ("multiply-adds", self.dense_macs, self.sparse_macs),
                ("memory energy (µJ)", self.energy_uj(self.dense_bytes), self.energy_uj(self.sparse_bytes))]
        table = pd.DataFrame(rows, columns=["per token", "dense", "sparse"])
        table["saved"] = 1.0 - table["sparse"] / table["dense"]
        return table


def token_cost(model: SparseModel, skipped: float, pj_per_byte: float = DRAM_PJ_PER_BYTE) -> TokenCost:
    """Cost per token when a fraction `skipped` of the sparsifiable weight reads is skipped (a model-wide sparsity,
    as `SparsityCounter.weighted(model.skippable_params(method))` measures it)."""
    total, sparsifiable = model_bytes(model)
    element = model.element_bytes
    saved = int(round(skipped * sparsifiable / element)) * element
    return TokenCost(total, total - saved, element, pj_per_byte)


def model_bytes(model: SparseModel) -> tuple[int, int]:
    """(weight bytes read per decoded token, of which sparsifiable). The input embedding reads one row, so it
    counts only when it is the (tied) output head, which reads it all. int8 weights count their rows at a byte and
    their scales beside them; a skipped input skips its row, not its block's scale row, which the block's other
    inputs read (so the scales count as read every token)."""
    head = {p.data_ptr() for p in model.model.get_output_embeddings().parameters()}
    embed_only = {p.data_ptr() for p in model.model.get_input_embeddings().parameters()} - head
    seen, total = set(embed_only), 0
    for p in model.model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total, sum(sum(g.values()) for g in model.group_params) * model.element_bytes
