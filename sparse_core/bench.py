"""Kernel and decode benchmarks: does skipping inputs turn into skipped weight reads, and into tokens per second?

    python -m sparse_core bench kernels [--json] [--quick]
    python -m sparse_core bench decode [--json] [--sparsity 0.5]

Batch-1 decoding is memory-bound, so a linear whose input has a fraction s of zeros can at best run 1/(1-s) times
faster than dense. The kernel benchmark rotates between enough weight copies that the working set exceeds the
last-level cache by half (otherwise the weights come from cache and the bound does not apply) and reports medians.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops

SHAPES = ((4096, 11008), (11008, 4096), (576, 1536), (1536, 576))  # (out_features, in_features)
DTYPES = ("float32", "bfloat16")
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
QUICK_SPARSITIES, QUICK_REPEATS = (0.0, 0.5, 0.9), 8  # --quick: the whole run in under a minute on 2 cores
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
Progress = Callable[[int, int], None]


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs); 64 MiB when it cannot be read."""
    sizes = []
    for index in range(8):
        try:
            text = open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read().strip()
        except OSError:
            break
        sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
    return max(sizes, default=64 << 20)


def _sparse_input(width: int, sparsity: float, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, float]:
    """A random input and the threshold that skips exactly `sparsity` of it."""
    x = torch.randn(1, width, dtype=dtype, device=device)
    drop = int(round(sparsity * width))
    threshold = 0.0 if drop == 0 else float(x.abs().float().sort().values[0, drop - 1])
    return x, threshold


def _median_ms(calls: list[Callable[[], object]], repeats: int, device: str) -> list[float]:
    """Median wall time of each call, interleaved so load from elsewhere hits them all alike."""
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, sink in zip(calls, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            sink.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def kernel_rows(shapes=SHAPES, dtypes=DTYPES, sparsities=SPARSITIES, repeats: int = 30, device: str = "cpu",
                progress: Progress | None = None) -> list[dict]:
    """Dense F.linear vs ops.sparse_linear at batch 1 for each shape, dtype and sparsity: one dict per row."""
    rows, total = [], len(shapes) * len(dtypes) * len(sparsities)
    cache = last_level_cache_bytes() if device == "cpu" else 0
    for out_features, in_features in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            # Sparse reads the (in, out) rows a patched model stores. Dense is that model's dense path on the same
            # rows (SparseLinear.dense); plain HF, F.linear on HF's (out, in) layout, is timed beside it.
            template = torch.randn(out_features, in_features, dtype=dtype, device=device)
            copies = min(512, max(2, -(-3 * cache // (2 * template.numel() * template.element_size()))))
            plain = [template.clone() for _ in range(copies)]
            stored = [template.t().contiguous().t() for _ in range(copies)]
            with torch.inference_mode():
                for sparsity in sparsities:
                    x, threshold = _sparse_input(in_features, sparsity, dtype, device)
                    turn = iter(range(1 << 62))
                    hf = lambda: F.linear(x, plain[next(turn) % copies])
                    dense = lambda: ops.dense_linear(x, stored[next(turn) % copies], None)
                    sparse = lambda: ops.sparse_linear(x, stored[next(turn) % copies], None, threshold)
                    _median_ms([hf, dense, sparse], copies + 2, device)  # warm-up
                    hf_ms, dense_ms, sparse_ms = _median_ms([hf, dense, sparse], repeats, device)
                    rows.append(dict(out_features=out_features, in_features=in_features, dtype=dtype_name,
                                     sparsity=sparsity, hf_dense_ms=round(hf_ms, 4), dense_ms=round(dense_ms, 4),
                                     sparse_ms=round(sparse_ms, 4), speedup=round(dense_ms / sparse_ms, 3),
                                     bound=round(1.0 / (1.0 - sparsity), 3)))
                    if progress:
                        progress(len(rows), total)
            del plain, stored, template
    return rows


def model_bytes(model) -> tuple[int, int]:
    """(weight bytes read per decoded token, of which sparsifiable). The input embedding reads one row, so it
    counts only when it is the (tied) output head, which reads it all."""
    embed = model.model.get_input_embeddings().weight
    head = model.model.get_output_embeddings().weight
    seen, total = set(), 0
    for p in model.model.parameters():
        if p.data_ptr() in seen or (p is embed and embed.data_ptr() != head.data_ptr()):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    size = embed.element_size()
    return total, sum(sum(g.values()) for g in model.group_params) * size


def decode_result(sparsity: float = 0.5, new_tokens: int = 64, dtype: str = "float32", repeats: int = 3,
                  model=None, progress: Progress | None = None) -> dict:
    """Greedy decode tokens/s of the default model, dense (the model's own dense path, see SparseLinear.dense) vs
    TEAL at `sparsity`, same prompt."""
    from . import calibrate, generate, models
    from .trace import SparsityCounter

    model = model or models.load(dtype=dtype)
    spec = calibrate.calibrate(model, "teal", sparsity)
    prompt = generate.encode_prompt(model, PROMPT)
    run = lambda s, n: generate.generate(model, prompt, s, max_new_tokens=n, stop_at_eos=False)
    counter = SparsityCounter()  # measured in its own untimed run: observers cost time
    with torch.inference_mode():
        list(generate.stream(model, prompt, spec, max_new_tokens=new_tokens, observers=[counter], stop_at_eos=False))
    run(None, 4), run(spec, 4)  # warm-up
    rates = {None: [], spec: []}
    for done in range(repeats):
        for s in rates:
            rates[s].append(run(s, new_tokens).tokens_per_second)
        if progress:
            progress(done + 1, repeats)
    dense, sparse = statistics.median(rates[None]), statistics.median(rates[spec])
    from .report import token_cost  # report builds on this module's model_bytes
    weights = model.skippable_params("teal")  # in the cats layout TEAL reads all of up: that share is not skippable
    readable = 1.0 - sum(p.get("read_anyway", 0) for p in weights) / sum(sum(p.values()) for p in weights)
    return dict(model=model.name, dtype=str(model.dtype).replace("torch.", ""), backend=ops.describe_backends(),
                new_tokens=new_tokens, dense_tok_s=round(dense, 2), sparse_tok_s=round(sparse, 2),
                speedup=round(sparse / dense, 3), bound=round(token_cost(model, sparsity * readable).bound, 3),
                achieved_sparsity=round(counter.weighted(weights), 4))


# ---- command line ------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("what", choices=["kernels", "decode"])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quick", action="store_true", help="kernels: fewer sparsities and repeats (under a minute)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="decode: TEAL target sparsity")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="decode: model dtype")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="kernels: device")


def _bar(label: str) -> Progress:
    def update(done: int, total: int) -> None:
        print(f"\r{label} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return update


def run(args) -> int:
    if args.what == "kernels":
        sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
        rows = kernel_rows(SHAPES, DTYPES, sparsities, repeats=QUICK_REPEATS if args.quick else 30, device=args.device,
                           progress=_bar("kernels"))
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
        if args.json:
            print(json.dumps({"backend": ops.describe_backends(), "device": device, "rows": rows}))
            return 0
        print(f"backend: {ops.describe_backends()}\ndevice: {device}")
        print(f"{'out x in':>12} {'dtype':>9} {'s':>5} {'HF ms':>9} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'bound':>6}")
        for r in rows:
            print(f"{r['out_features']:>5}x{r['in_features']:<6} {r['dtype']:>9} {r['sparsity']:>5} {r['hf_dense_ms']:>9.3f} "
                  f"{r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} {r['speedup']:>8.2f} {r['bound']:>6.2f}")
        return 0
    result = decode_result(args.sparsity, args.new_tokens, args.dtype, progress=_bar("decode"))
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0
