"""Kernel and decode benchmarks: does skipping inputs turn into skipped weight reads, and into tokens per second?

    python -m sparse_core bench kernels [--json] [--quick]
    python -m sparse_core bench decode [--json] [--sparsity 0.5]
    python -m sparse_core bench profile [--json] [--sparsity 0.5]   (token_profile: where one token goes)

Batch-1 decoding is memory-bound, so a linear whose input has a fraction s of zeros can at best run 1/(1-s) times
faster than dense. Every speedup here is over the fastest dense product measured in the same run (HF's own layout,
F.linear on the stored rows, or the kernel with nothing skipped), every timing comes with its interquartile range,
and a result above 1.05 x its bound or with a wide spread carries a `flag` instead of passing as valid. The kernel
benchmark rotates between enough weight copies that the working set exceeds the last-level cache (the CPU's, or the
GPU's L2) by half: otherwise the weights come from cache and the bound does not apply.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .calibrate import Progress
from .cost import token_cost
from .machine import synchronize
from .store import DiskStore, measurement_key

SHAPES = ((4096, 11008), (11008, 4096), (576, 1536), (1536, 576))  # (out_features, in_features)
DTYPES = ("float32", "bfloat16")
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
FULL_REPEATS = 30
QUICK_SPARSITIES, QUICK_REPEATS = (0.0, 0.5, 0.9), 24  # --quick: fewer sparsities and repeats, for a first look
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BOUND_SLACK = 1.05   # a speedup above 1.05 x its bound is a broken measurement, never a result
NOISY_SPREAD = 0.25  # an interquartile range above a quarter of the median: the machine was busy
MIN_SECONDS_PER_CALL = 0.05  # small shapes repeat until each timed call runs this long (too short a call drifts)
DECODE_TOKENS, DECODE_REPEATS = 32, 5  # the setting's decode measurement, as the app and the CLI take it


def last_level_cache_bytes(device: str = "cpu") -> int:
    """Size of the last cache before memory: the GPU's L2, or the largest CPU cache (Linux sysfs; 64 MiB when it
    cannot be read)."""
    if device == "cuda":
        return torch.cuda.get_device_properties().L2_cache_size
    sizes = []
    for index in range(8):
        try:
            text = open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read().strip()
        except OSError:
            break
        sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
    return max(sizes, default=64 << 20)


BANDWIDTH_BYTES, BANDWIDTH_REPEATS = 1 << 30, 10  # the read-bandwidth probe: far beyond any last-level cache


def read_bandwidth_gbs(device: str = "cpu", repeats: int = BANDWIDTH_REPEATS) -> float:
    """The memory read bandwidth in GB/s now, the limit batch-1 decoding runs against (every weight byte is read once
    per token): the fastest of `repeats` reads of 1 GiB, on the CPU by the kernels' own vector loads on all threads
    (sparse_lab::stream_read), each time with the lines requested ahead and without, on a GPU by a sum. Measured in the sitting it bounds, never carried over from another:
    a shared machine's bandwidth moves by half between hours, so another sitting's figure is no limit for this one.
    A benchmark probes before and after its timings and keeps the faster; a rate above that is a broken measurement."""
    data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=device)
    reads = [torch.sum]
    if device == "cpu":
        from .kernels import cpu_native
        cpu_native.native()  # the probe's CPU implementation: the native kernel's, or torch's sum without a build
        reads = [lambda d: torch.ops.sparse_lab.stream_read(d, True), lambda d: torch.ops.sparse_lab.stream_read(d, False)]
    seconds = []
    for repeat in range(repeats + 1):
        for read in reads:
            synchronize(device)
            start = time.perf_counter()
            read(data)
            synchronize(device)
            if repeat:  # the first of each warms up
                seconds.append(time.perf_counter() - start)
    del data
    return round(BANDWIDTH_BYTES / min(seconds) / 1e9, 2)


def _sparse_input(width: int, sparsity: float, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, float]:
    """A random input and the threshold that skips exactly `sparsity` of it."""
    x = torch.randn(1, width, dtype=dtype, device=device)
    drop = int(round(sparsity * width))
    threshold = 0.0 if drop == 0 else float(x.abs().float().sort().values[0, drop - 1])
    return x, threshold


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repeated wall times of one call: the median and the interquartile range, in milliseconds."""
    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        q1, q3 = _quartiles(seconds)
        return cls(statistics.median(seconds) * 1e3, q1 * 1e3, q3 * 1e3)

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def _quartiles(values: list[float]) -> tuple[float, float]:
    """(first quartile, third quartile)."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return quartiles[0], quartiles[2]


def flag(speedup: float, bound: float, *timings: Timing, gbs: float = 0.0, limit: float | None = None) -> str | None:
    """Why a measured speedup must not be presented as a result, or None when it may: above its bound, a read rate
    `gbs` above the measured bandwidth `limit` (the probe or the measurement is wrong), or too wide a spread."""
    if speedup > BOUND_SLACK * bound:
        return f"invalid: x{speedup:.2f} is above the bound x{bound:.2f} (an unfair baseline or noise)"
    if limit and gbs > limit:  # the probe is the best read of the same sitting: nothing then read faster
        return (f"invalid: {gbs:.1f} GB/s is above the measured read bandwidth {limit:.1f} GB/s (weights from cache, "
                "or a wrong probe)")
    widest = max(t.spread for t in timings)
    if widest > NOISY_SPREAD:
        return f"noisy: interquartile range {widest:.0%} of the median (the machine was busy)"
    return None


def _timings(calls: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, Timing]:
    """Each call timed `repeats` times, interleaved so load from elsewhere hits them all alike, in an order shuffled
    every repeat (seeded), so that no call always follows the same one: what a call finds behind its predecessor
    moves its time (a twin's warm branch predictors; docs/PERFORMANCE.md has the measurement). A rotated order does
    not help there: it keeps every call's predecessor."""
    seconds = {name: [] for name in calls}
    names, order = list(calls), random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            call = calls[name]
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing.of(s) for name, s in seconds.items()}


def kernel_benchmark(shapes=None, dtypes=None, quick: bool = False, device: str = "cpu",
                     progress: Progress | None = None) -> list[dict]:
    """kernel_rows over the full run's sparsities and repeats, or the quick run's (every caller's two choices);
    every shape and dtype unless told."""
    return kernel_rows(shapes or SHAPES, dtypes or DTYPES, QUICK_SPARSITIES if quick else SPARSITIES,
                       QUICK_REPEATS if quick else FULL_REPEATS, device, progress)


def kernel_rows(shapes=SHAPES, dtypes=DTYPES, sparsities=SPARSITIES, repeats: int = FULL_REPEATS, device: str = "cpu",
                progress: Progress | None = None) -> list[dict]:
    """The sparse op against the fastest dense product at batch 1, for each shape, dtype and sparsity.

    Dense candidates, all on the same input: "hf" (F.linear on HF's (out, in) layout), "linear" (F.linear on the
    (in, out) rows a patched model stores) and "kernel" (the sparse op with nothing skipped on those rows)."""
    rows, timings, total = [], [], len(shapes) * len(dtypes) * len(sparsities)
    cache = last_level_cache_bytes(device)
    probed = read_bandwidth_gbs(device)
    for out_features, in_features in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            template = torch.randn(out_features, in_features, dtype=dtype, device=device)
            weight_bytes = template.numel() * template.element_size()
            read_bytes = weight_bytes * (1.0 - max(sparsities))  # the fewest bytes a call reads must still miss the cache
            copies = min(512, max(2, math.ceil(3 * cache / (2 * read_bytes))))
            plain = [template.clone() for _ in range(copies)]
            stored = [template.t().contiguous().t() for _ in range(copies)]
            with torch.inference_mode():
                for sparsity in sparsities:
                    x, threshold = _sparse_input(in_features, sparsity, dtype, device)
                    turn = iter(range(1 << 62))
                    calls = {"hf": lambda: F.linear(x, plain[next(turn) % copies]),
                             "linear": lambda: F.linear(x, stored[next(turn) % copies]),
                             "kernel": lambda: ops.sparse_linear(x, stored[next(turn) % copies], None, 0.0),
                             "sparse": lambda: ops.sparse_linear(x, stored[next(turn) % copies], None, threshold)}
                    warm = _timings(calls, copies + 2, device)  # warm-up, and the pace for the repeats below
                    slowest = max(t.median for t in warm.values()) / 1e3
                    timed = _timings(calls, max(repeats, math.ceil(MIN_SECONDS_PER_CALL / slowest)), device)
                    dense_path = min(DENSE_PATHS, key=lambda name: timed[name].median)
                    dense, sparse = timed[dense_path], timed["sparse"]
                    bound = 1.0 / (1.0 - sparsity)
                    speedup = dense.median / sparse.median
                    dense_gbs, sparse_gbs = weight_bytes / dense.median / 1e6, weight_bytes / bound / sparse.median / 1e6
                    rows.append(dict(out_features=out_features, in_features=in_features, dtype=dtype_name,
                                     sparsity=sparsity, **{f"{name}_dense_ms": round(timed[name].median, 4) for name in DENSE_PATHS},
                                     dense_path=dense_path, dense_ms=round(dense.median, 4),
                                     dense_iqr_ms=round(dense.q3 - dense.q1, 4), sparse_ms=round(sparse.median, 4),
                                     sparse_iqr_ms=round(sparse.q3 - sparse.q1, 4), speedup=round(speedup, 3),
                                     bound=round(bound, 3), dense_gbs=round(dense_gbs, 2), sparse_gbs=round(sparse_gbs, 2)))
                    timings.append((dense, sparse, speedup, bound, max(dense_gbs, sparse_gbs)))
                    if progress:
                        progress(len(rows), total)
            del plain, stored, template
    bandwidth = max(probed, read_bandwidth_gbs(device))  # the sitting's limit: probed before and after the timings
    for row, (dense, sparse, speedup, bound, gbs) in zip(rows, timings):
        row.update(bandwidth_gbs=bandwidth, dense_fraction_of_limit=round(row["dense_gbs"] / bandwidth, 3),
                   sparse_fraction_of_limit=round(row["sparse_gbs"] / bandwidth, 3),
                   flag=flag(speedup, bound, dense, sparse, gbs=gbs, limit=bandwidth))
    return rows


@dataclasses.dataclass(frozen=True)
class PairedRates:
    """Dense and sparse decode rates over the same steps of one generation: 1 / the median step time of each."""
    dense_steps: Timing
    sparse_steps: Timing
    steps: int

    @property
    def dense(self) -> float:
        return 1e3 / self.dense_steps.median

    @property
    def sparse(self) -> float:
        return 1e3 / self.sparse_steps.median

    @property
    def speedup(self) -> float:
        return self.dense_steps.median / self.sparse_steps.median

    def flag(self, bound: float) -> str | None:
        return flag(self.speedup, bound, self.dense_steps, self.sparse_steps)


def paired_rates(dense: list, sparse: list) -> PairedRates | None:
    """Compare like with like: the decode steps both runs made (each run's prefill step left out), median step
    times. None until both have made at least one decode step."""
    steps = min(len(dense), len(sparse)) - 1
    if steps < 1:
        return None
    timing = lambda tokens: Timing.of([t.seconds for t in tokens[1:steps + 1]])
    return PairedRates(timing(dense), timing(sparse), steps)


DENSE_PATHS = ("hf", "linear", "kernel")
_DECODES = DiskStore("decode", 4)  # v4: every method decodes through the native step on the CPU


def _decode_key(model, spec, compiled: bool) -> str:
    """A setting's speed measurement, with the compiled step or with HF's forward: two measurements."""
    return measurement_key(model, spec) + ("-compiled" if compiled else "")


def stored_decode(model, spec, compiled: bool = False) -> dict | None:
    """The setting's decode measurement on this machine, if one passed its flags (a flagged one is never the
    setting's result)."""
    found = _DECODES.load(_decode_key(model, spec, compiled))
    return found if found is not None and not found.get("flag") else None


def flagged_decode(model, spec, compiled: bool = False) -> dict | None:
    """The last decode measurement of this setting when it was flagged and is newer than any valid one: what the
    pages say instead of showing it."""
    return _DECODES.load(_decode_key(model, spec, compiled) + "-flagged")


def decode_steps(model, prompt, spec, new_tokens: int, dense_route: str | None = None, compiled: bool = False) -> list:
    """The prefill's token, then `new_tokens` decode steps' tokens, each with its wall time."""
    from . import generate
    return list(generate.stream(model, prompt, spec, max_new_tokens=new_tokens + 1, stop_at_eos=False,
                                dense_route=dense_route, compiled=compiled))


def decode_result(model, spec, new_tokens: int = DECODE_TOKENS, repeats: int = DECODE_REPEATS, plain=None,
                  progress: Progress | None = None, compiled: bool = False) -> dict:
    """Greedy decode tokens/s of `spec` against the fastest dense decode, equal steps, interleaved repeats; stored
    as this setting's measurement when it passes its flags, else kept aside as the last flagged attempt.

    Dense candidates: "hf" (`plain`, the same model loaded with HF's own layout, when given), and this model's dense
    path through F.linear ("linear") or through the kernel with nothing skipped ("kernel"). Rates are 1 / the
    median step time over all runs; the speedup is the median of the paired per-run ratios (each run against the
    dense run beside it, so drift in the machine's pace cancels) and its spread their interquartile range. With
    `compiled`, this model's runs (dense and sparse alike) use the compiled step (fast_decode) where it supports the
    model; plain HF stays HF's forward, the baseline the compiled step is measured against. A compiled measurement
    whose steps fell back to eager decoding is flagged: it did not measure the compiled step."""
    from . import fast_decode, generate
    from .trace import SparsityCounter

    model.check(spec)
    fast = fast_decode.covering(model, spec) if compiled else None
    compiled = fast is not None
    prompt = generate.encode_prompt(model, PROMPT)
    counter = SparsityCounter()  # measured in its own untimed run: observers cost time
    with torch.inference_mode():
        list(generate.stream(model, prompt, spec, max_new_tokens=new_tokens + 1, observers=[counter], stop_at_eos=False))
    runs = {"linear": lambda n: decode_steps(model, prompt, None, n, "linear", compiled)}
    if model.layout != "hf":
        runs["kernel"] = lambda n: decode_steps(model, prompt, None, n, "kernel", compiled)
    if plain is not None:
        runs["hf"] = lambda n: decode_steps(plain, generate.encode_prompt(plain, PROMPT), None, n)
    runs["sparse"] = lambda n: decode_steps(model, prompt, spec, n, compiled=compiled)
    fallbacks = []  # why a compiled run decoded uncompiled
    for run in runs.values():
        run(4)  # warm-up, and the compiles
    probed = read_bandwidth_gbs(model.device.type)
    steps = {name: [] for name in runs}
    per_repeat = {name: [] for name in runs}
    for done in range(repeats):
        for name, run in runs.items():
            tokens = run(new_tokens)
            seconds = [token.seconds for token in tokens[1:]]
            steps[name] += seconds
            per_repeat[name].append(statistics.median(seconds))
            note = next((token.note for token in tokens if token.note), None)  # a fast session fell back
            if compiled and name != "hf" and note:
                fallbacks.append(note)
        if progress:
            progress(done + 1, repeats)
    timed = {name: Timing.of(s) for name, s in steps.items()}
    candidates = [name for name in runs if name != "sparse"]
    dense_path = min(candidates, key=lambda name: timed[name].median)
    dense, sparse = timed[dense_path], timed["sparse"]
    rate = lambda t: round(1e3 / t.median, 2)
    ratios = [d / s for d, s in zip(per_repeat[dense_path], per_repeat["sparse"])]  # paired: each run with its twin
    cost = token_cost(model, counter.weighted(model.skippable_params(spec.method if spec else "dense")))
    speedup = statistics.median(ratios)
    bandwidth = max(probed, read_bandwidth_gbs(model.device.type))  # the sitting's limit: before and after the timings
    fraction = lambda t, weight_bytes: round(1e3 / t.median * weight_bytes / 1e9 / bandwidth, 3)
    why_not_compiled = fallbacks[0] if fallbacks else None
    result = dict(model=model.name, dtype=model.weights, layout=model.layout,
                  device=str(model.device), backend=ops.describe_backends(), method=spec.method if spec else "dense",
                  spec=spec.label if spec else "dense", new_tokens=new_tokens, repeats=repeats,
                  dense_path=dense_path, dense_tok_s=rate(dense), sparse_tok_s=rate(sparse),
                  dense_tok_s_iqr=[round(1e3 / dense.q3, 2), round(1e3 / dense.q1, 2)],
                  sparse_tok_s_iqr=[round(1e3 / sparse.q3, 2), round(1e3 / sparse.q1, 2)],
                  plain_hf_tok_s=rate(timed["hf"]) if "hf" in timed else None,
                  dense_candidates_tok_s={name: rate(timed[name]) for name in candidates},
                  speedup=round(speedup, 3),
                  speedup_iqr=[round(q, 3) for q in _quartiles(ratios)],
                  bound=round(cost.bound, 3), weight_reads_skipped=round(cost.reads_skipped, 4),
                  weight_bytes_per_token=cost.dense_bytes, sparse_weight_bytes_per_token=cost.sparse_bytes,
                  bandwidth_gbs=bandwidth, dense_fraction_of_limit=fraction(dense, cost.dense_bytes),
                  sparse_fraction_of_limit=fraction(sparse, cost.sparse_bytes),
                  decoder=fast_decode.step_name(model, spec) if compiled and not why_not_compiled else "HF forward" if not compiled
                  else "uncompiled fallback",
                  compile_seconds=fast_decode.compile_seconds_on_record(fast, spec, len(prompt.ids) + new_tokens + 1)
                  if compiled else None,
                  compile_failure=why_not_compiled,
                  flag=(f"not compiled: {why_not_compiled}" if why_not_compiled else None)
                  or flag(speedup, cost.bound, dense, sparse, limit=bandwidth,
                          gbs=max(1e3 / dense.median * cost.dense_bytes, 1e3 / sparse.median * cost.sparse_bytes) / 1e9))
    key = _decode_key(model, spec, compiled)
    if result["flag"]:
        return _DECODES.save(key + "-flagged", result)
    _DECODES.remove(key + "-flagged")
    return _DECODES.save(key, result)


# ---- command line ------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("what", choices=["kernels", "decode", "peer", "profile"])
    parser.add_argument("--json", action="store_true", help="machine-readable output (decode: one JSON object per line)")
    parser.add_argument("--quick", action="store_true", help="kernels: fewer sparsities and repeats (under a minute)")
    parser.add_argument("--method", default="teal", choices=["teal", "cats", "topk"], help="decode: sparsity method")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                        help="decode, profile: target sparsities (profile: beside dense)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                        help="decode, profile: model dtype (int8: int8 weights)")
    parser.add_argument("--layout", default="inputs", choices=["inputs", "cats"], help="decode: weight layout")
    parser.add_argument("--new-tokens", type=int, default=DECODE_TOKENS, help="decode: tokens generated per run")
    parser.add_argument("--repeats", type=int, default=DECODE_REPEATS, help="decode: interleaved runs of each")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode: the compiled decode step (default: on where the model supports it)")
    parser.add_argument("--rounds", type=int, default=3, help="peer: interleaved rounds of llama.cpp and the lab (peer.ROUNDS)")


def progress_bar(label: str) -> Progress:
    """A Progress callback that draws a tqdm bar on stderr (the CLI's; the app draws its own) from the first report
    until the last (done == total), when it clears: a command that fails before any work prints its error alone,
    and the next step's bar takes the same line."""
    from tqdm import tqdm
    bars = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=label, total=total, file=sys.stderr, leave=False))
        bars[0].total, bars[0].n = total, done
        bars[0].refresh()
        if done >= total:
            bars.pop().close()
    return update


def run(args) -> int:
    from . import models
    device = models.resolve_device(args.device)
    if args.what == "kernels":
        rows = kernel_benchmark(quick=args.quick, device=device, progress=progress_bar("kernels"))
        device = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
        if args.json:
            print(json.dumps({"backend": ops.describe_backends(), "device": device,
                              "bandwidth_gbs": rows[0]["bandwidth_gbs"], "rows": rows}))
            return 0
        print(f"backend: {ops.describe_backends()}\ndevice: {device}\nread bandwidth: {rows[0]['bandwidth_gbs']} GB/s")
        print(f"{'out x in':>12} {'dtype':>9} {'s':>5} {'dense':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} "
              f"{'bound':>6} {'dense GB/s':>10} {'sparse GB/s':>11}  flag")
        for r in rows:
            print(f"{r['out_features']:>5}x{r['in_features']:<6} {r['dtype']:>9} {r['sparsity']:>5} {r['dense_path']:>6} "
                  f"{r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} {r['speedup']:>8.2f} {r['bound']:>6.2f} "
                  f"{r['dense_gbs']:>10.1f} {r['sparse_gbs']:>11.1f}  {r['flag'] or ''}")
        return 0
    if args.what == "peer":
        from . import peer
        result = peer.run(rounds=args.rounds, tokens=args.new_tokens if args.new_tokens != DECODE_TOKENS else peer.TOKENS,
                          device=device, progress=progress_bar("peer"))
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"llama.cpp {result['llama_cpp']} on {result['machine']}, {result['tokens']} tokens, {result['rounds']} rounds")
        for r in result["rows"]:
            extra = f"  x{r['vs_llama_cpp']:.2f} llama.cpp" if "vs_llama_cpp" in r else ""
            if "vs_lab_dense" in r:
                extra += f"  x{r['vs_lab_dense']:.2f} lab dense (bound x{r['bound']:.2f})"
            print(f"{r['decoder']:>9} {r['precision']:>5} {r['setting']:>15} {r['tok_s']:>7.1f} tok/s "
                  f"[{r['q1']:.1f}-{r['q3']:.1f}]{extra}  {r.get('flag') or ''}")
        return 0
    from .lab import Lab
    held = Lab.load(dtype=args.dtype, layout=args.layout, device=device)
    if args.what == "profile":
        from . import token_profile
        specs = [None, *(held.spec_for("teal", target) for target in args.sparsity if target > 0)]
        results = [held.token_profile(spec, args.new_tokens, args.repeats) for spec in specs]
        print(json.dumps(results) if args.json else token_profile.table(results))
        return 0
    for target in args.sparsity:
        spec = held.spec_for(args.method, target)
        compiled = held.compiles_by_default if args.compile is None else args.compile
        result = held.measure_decode(spec, compiled, args.new_tokens, args.repeats,
                                     progress=progress_bar(f"decode {target:g}"))
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()) + "\n", flush=True)
    return 0
