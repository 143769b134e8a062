"""`python -m sparse_core selfcheck [--device cuda]`: one JSON that says whether this machine's kernels are right
and how fast they and the model decode, in a few minutes; the first thing to run on a new GPU.

    kernels  every kernel backend of the device against the float64 masked reference: float16, bfloat16 and
             float32, and int8 rows (on their dequantized weight), batch 1-8, s in {0, 0.5, 0.9} (on the CPU: the
             native kernels, and the Triton kernels in Triton's interpreter, which is what CI runs)
    bench    `bench kernels --quick`
    decode   SmolLM2 greedy decode: plain HF, the dense routes and the compiled step agree token for token, and
             TEAL 50 % against the fastest dense, eager and compiled
"""
from __future__ import annotations

import os
import time

import torch

SHAPES = {"cpu": ((96, 160), (200, 72)), "cuda": ((96, 160), (4096, 4096), (11008, 4096))}  # (out, in); ragged
BATCHES = tuple(range(1, 9))
SPARSITIES = (0.0, 0.5, 0.9)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # of the output's largest magnitude
PARTS = ("kernels", "bench", "decode")


def _backends(device: str) -> dict:
    """name -> (the op's implementation, the dtypes it takes, whether it reads int8 rows) for every kernel that
    serves `device`; on the CPU the Triton kernels run in Triton's interpreter, chosen before their kernels are
    defined (there is no GPU to compile for). An int8 kernel is called as (x, q, scales, bias, threshold)."""
    from .kernels import KERNEL_DTYPES, cpu_native
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .kernels import triton_sparse_gemv, triton_sparse_gemv_int8
    found = {}
    if device == "cuda" or triton_sparse_gemv.INTERPRET:
        name = "triton" if device == "cuda" else "triton-interpret"
        found[name] = (triton_sparse_gemv.sparse_linear, KERNEL_DTYPES["cuda"], False)
        found[f"{name}-int8"] = (triton_sparse_gemv_int8.sparse_linear_int8, (torch.float32,), True)
    if device == "cpu" and cpu_native.native():
        found["cpu-native"] = (torch.ops.sparse_lab.sparse_linear, KERNEL_DTYPES["cpu"], False)
        found["cpu-native-int8"] = (torch.ops.sparse_lab.sparse_linear_int8, (torch.float32,), True)
    return found


def check_kernels(device: str) -> dict:
    """Each backend on every (shape, dtype, batch, sparsity): the worst error relative to the output's scale, against
    float64 on the weight the kernel reads (an int8 kernel's: the dequantized rows)."""
    from . import quantize
    results = {}
    for name, (kernel, dtypes, int8) in _backends(device).items():
        worst, failures, cases = 0.0, [], 0
        for out_features, in_features in SHAPES[device]:
            for dtype in dtypes:
                generator = torch.Generator().manual_seed(out_features * 31 + in_features)
                weight_rows = (torch.randn(in_features, out_features, generator=generator) / in_features ** 0.5)
                weight_rows = weight_rows.to(device=device, dtype=dtype)  # (in, out): the kernels' layout
                bias = torch.randn(out_features, generator=generator).to(device=device, dtype=dtype)
                if int8:
                    q, scales = quantize.quantize(weight_rows.t())
                    weight_rows = quantize.dequantize(q, scales).t()
                    call = lambda x, threshold: kernel(x, q, scales, bias, None, threshold)
                else:
                    call = lambda x, threshold: kernel(x, weight_rows.t(), weight_rows, bias, None, threshold)
                for batch in BATCHES:
                    x = torch.randn(batch, in_features, generator=generator).to(device=device, dtype=dtype)
                    for sparsity in SPARSITIES:
                        threshold = float(x.abs().float().quantile(sparsity)) if sparsity else 0.0
                        y = call(x, threshold)
                        keep = x.abs() > threshold
                        expected = torch.nn.functional.linear((x * keep).double(), weight_rows.t().double(), bias.double())
                        error = ((y.double() - expected).abs().max() / (expected.abs().max() + 1.0)).item()
                        cases += 1
                        worst = max(worst, error / TOLERANCE[dtype])
                        if not error <= TOLERANCE[dtype]:
                            failures.append(dict(shape=[out_features, in_features], dtype=str(dtype)[6:], batch=batch,
                                                 sparsity=sparsity, relative_error=error))
        results[name] = dict(cases=cases, failures=failures[:20], failed=len(failures),
                             worst_error_over_tolerance=round(worst, 4))
    return results


def check_decode(device: str, dtype: str = "float32") -> dict:
    """Plain HF, both dense routes and the compiled step produce the same greedy tokens; TEAL 50 % decodes against
    the fastest dense, with HF's forward (eager) and with the compiled step."""
    from . import bench, fast_decode, generate
    from .lab import Lab
    held = Lab.load(dtype=dtype, device=device)
    model, plain = held.model, held.plain()
    prompt = generate.encode_prompt(model, bench.PROMPT)
    greedy = lambda m, p, **how: [t.id for t in generate.stream(m, p, None, 24, stop_at_eos=False, **how)]
    tokens = {"hf": greedy(plain, generate.encode_prompt(plain, bench.PROMPT)),
              "linear": greedy(model, prompt, dense_route="linear"), "kernel": greedy(model, prompt, dense_route="kernel")}
    if fast_decode.decoder(model) is not None:
        tokens["compiled"] = greedy(model, prompt, compiled=True)
    spec = held.spec_for("teal", 0.5)
    eager = held.measure_decode(spec, False, new_tokens=16, repeats=3)
    compiled = (held.measure_decode(spec, True, new_tokens=16, repeats=3)
                if "compiled" in tokens else dict(available=False, why=fast_decode.unsupported(model)))
    return dict(dtype=dtype, greedy_tokens_equal={run: ids == tokens["hf"] for run, ids in tokens.items()},
                eager=eager, compiled=compiled)


def run(device: str, parts: tuple[str, ...] = PARTS) -> dict:
    """The parts asked for, each timed; `ok` is False when a kernel failed a case or the routes disagree."""
    from . import bench, ops
    report: dict = dict(device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
                        torch=torch.__version__)
    started = time.perf_counter()
    if "kernels" in parts:
        report["kernels"] = check_kernels(device)
    if "bench" in parts:
        report["bench_kernels_quick"] = bench.kernel_benchmark(quick=True, device=device)
    if "decode" in parts:
        report["decode"] = check_decode(device)
    report["backend"] = ops.describe_backends()
    report["seconds"] = round(time.perf_counter() - started, 1)
    kernels_ok = all(not r["failed"] for r in report.get("kernels", {}).values())
    decode_ok = all(report["decode"]["greedy_tokens_equal"].values()) if "decode" in report else True
    report["ok"] = kernels_ok and decode_ok
    return report
