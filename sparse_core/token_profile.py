"""Where one token of the native decode step goes: the weights' reads against everything else.

    python -m sparse_core bench profile [--dtype bfloat16] [--sparsity 0.5] [--json]

The native step (csrc/decode_engine.inc) times thread 0's phases when asked: each projection's gather of its
share of the active rows, the waits at the barriers after them, attention, the gate, the glue between projections
and the lm_head. Each gather's bytes come from the inputs the step counted as skipped, so every phase that reads
weights carries its GB/s beside the sitting's probe; whatever thread 0's phases do not cover (the launcher, the
team's start and end, the Python around the call) is the last row. A decode is memory-bound when the weights'
phases are nearly the whole token.
"""
from __future__ import annotations

import statistics

import torch

from . import bench

# Thread 0's phases in the engine's order (csrc/vector_kernels.h's Phase); the gathers' groups follow GROUPS.
PHASES = ("glue", "q/k/v gather", "o gather", "gate/up gather", "down gather", "waits after the gathers",
          "attention", "gate", "lm_head")
GATHERS = {"q/k/v gather": 0, "o gather": 1, "gate/up gather": 2, "down gather": 3}
OUTSIDE = "outside thread 0's phases"  # launcher, the team's start and end, Python


class TokenProfile:
    """The native step's phase seconds and skipped inputs, summed over the tokens it ran while this was attached."""

    def __init__(self, layers: int):
        self.phases = torch.zeros(len(PHASES), dtype=torch.float64)
        self.skipped = torch.zeros(layers, 4, dtype=torch.long)
        self.tokens = 0

    def count(self, skipped: torch.Tensor) -> None:
        self.skipped += skipped
        self.tokens += 1


def profile(model, spec, new_tokens: int = bench.DECODE_TOKENS, repeats: int = bench.DECODE_REPEATS) -> dict:
    """One setting's token, phase by phase: milliseconds a token, the share of the token's wall time, and for the
    phases that read weights the bytes and GB/s (over thread 0's time in them) against the sitting's probe."""
    from . import fast_decode, generate
    fast = fast_decode.decoder(model)
    if fast is None or not fast.runs_native(fast.step_inputs(spec).variant):
        raise ValueError("bench profile times the native decode step, which runs on the CPU for Llama-family "
                         "models without projection biases.")
    prompt = generate.encode_prompt(model, bench.PROMPT)
    bench.decode_steps(model, prompt, spec, 4, compiled=True)  # warm-up
    probed = bench.read_bandwidth_gbs(model.device.type)
    fast.profile = TokenProfile(model.num_layers)
    walls = []
    try:
        for _ in range(repeats):
            walls += [t.seconds for t in bench.decode_steps(model, prompt, spec, new_tokens, compiled=True)[1:]]
        taken = fast.profile
    finally:
        fast.profile = None
    bandwidth = max(probed, bench.read_bandwidth_gbs(model.device.type))
    tokens = taken.tokens
    wall = statistics.fmean(walls)
    seconds = (taken.phases / tokens).tolist()
    bytes_read = {name: _gather_bytes(fast, taken, group) / tokens for name, group in GATHERS.items()}
    bytes_read["lm_head"] = fast.head.numel() * fast.head.element_size()
    rows = []
    for name, s in zip(PHASES, seconds):
        row = dict(phase=name, ms=round(s * 1e3, 4), share=round(s / wall, 4))
        if name in bytes_read:
            gbs = bytes_read[name] / s / 1e9
            row.update(bytes=round(bytes_read[name]), gbs=round(gbs, 2), fraction_of_limit=round(gbs / bandwidth, 3),
                       flag=f"invalid: {gbs:.1f} GB/s is above the measured read bandwidth {bandwidth:.1f} GB/s"
                       if gbs > bandwidth else None)
        rows.append(row)
    outside = wall - sum(seconds)
    rows.append(dict(phase=OUTSIDE, ms=round(outside * 1e3, 4), share=round(outside / wall, 4)))
    weights = sum(r["ms"] for r in rows if "bytes" in r)
    return dict(model=model.name, dtype=model.weights, spec=spec.label if spec else "dense",
                tokens=tokens, tok_s=round(1 / wall, 2), ms=round(wall * 1e3, 4), bandwidth_gbs=bandwidth,
                weights_share=round(weights / (wall * 1e3), 4), threads=torch.get_num_threads(), rows=rows)


def _gather_bytes(fast, taken: TokenProfile, group: int) -> float:
    """The bytes of the rows group `group`'s gathers read over the profiled tokens: every input not skipped reads
    one row."""
    layers = fast.native_row_bytes()[group]
    return sum((taken.tokens * inputs - int(taken.skipped[l, group])) * row for l, (inputs, row) in enumerate(layers))


def table(results: list[dict]) -> str:
    """The profiles side by side, a column per setting: ms a token (share), and GB/s with its fraction of the
    probe where the phase reads weights."""
    head = f"{'phase':<28}" + "".join(f"{r['spec'][:30]:>34}" for r in results)
    lines = [head, f"{'tok/s':<28}" + "".join(f"{r['tok_s']:>34.1f}" for r in results)]
    for i, name in enumerate([*PHASES, OUTSIDE]):
        cells = []
        for r in results:
            row = r["rows"][i]
            cell = f"{row['ms']:.3f} ms ({row['share']:.0%})"
            if "gbs" in row:
                cell += f" {row['gbs']:.1f} GB/s ({row['fraction_of_limit']:.2f})" + (" !" if row["flag"] else "")
            cells.append(f"{cell:>34}")
        lines.append(f"{name:<28}" + "".join(cells))
    lines.append(f"{'weights share of the token':<28}" + "".join(f"{r['weights_share']:>34.0%}" for r in results))
    return "\n".join(lines)
