"""CPU backend: the C++/OpenMP row-gather kernel (csrc/sparse_gemv.cpp), built once: by `make setup` into the
virtual environment, else on the first CPU call into the user's cache.

Without a working compiler the same op runs a pure-torch row gather, `F.embedding_bag` over the active rows of the
(in, out) weight, which also skips the inactive rows' reads, only with more overhead per call.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import quantize
from . import KERNEL_DTYPES, LIBRARY, UNION_TOKENS, check_call

CSRC = Path(__file__).parent / "csrc"
# The launcher, the one-call decode step, and the vector kernels once per instruction set (each file sets its own
# target; no -march, so the build runs on any x86-64 and picks its path at run time).
SOURCES = [CSRC / name for name in ("sparse_gemv.cpp", "decode_step.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp",
                                    "kernels_avx512.cpp", "kernels_avx512_bf16.cpp")]
VECTOR_PATHS = ("scalar", "avx2", "avx512", "avx512_bf16")  # narrowest first, as the C++ numbers them
DTYPES = KERNEL_DTYPES["cpu"]


def build_dir() -> Path:
    """Where the kernel is built and loaded from: inside the virtual environment when running in a writable one
    (the install step builds it there, so a fresh user cache does not wait for a compile), else the user's cache."""
    if sys.prefix != sys.base_prefix:
        folder = Path(sys.prefix) / "sparse-lab-kernels"
        if os.access(folder if folder.is_dir() else sys.prefix, os.W_OK):  # torch writes its lock file there
            return folder
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse-lab" / "torch_extensions"


def native() -> bool:
    """Build (first time) and load the kernel: True when it is loaded, else False, with the embedding_bag fallback
    registered in its place and the reason in `native_failure()`."""
    return _load() is None


def native_failure() -> str | None:
    """Why the native kernel is unavailable ("no compiler", "build failed: ..."), or None when it is loaded."""
    return _load()


def build() -> bool:
    """The install step (`make setup`): build the kernel into build_dir() now and say where, or why not (the app
    then runs the fallback; a missing compiler is not an install failure)."""
    if native():
        print(f"sparse_core: native CPU kernel ready in {build_dir()}")
    else:
        print(f"sparse_core: native CPU kernel unavailable ({native_failure()}); the app will use the fallback")
    return native()


@functools.cache
def _load() -> str | None:
    """Build (first time) and load the kernel, once per process: None when it works, else why not."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        reason = "no compiler"
    else:
        from torch.utils import cpp_extension
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            cpp_extension.load(name="sparse_lab_cpu", sources=[str(s) for s in SOURCES], build_directory=str(folder),
                               extra_cflags=["-O3", "-fopenmp", f"-DSPARSE_LAB_UNION_TOKENS={UNION_TOKENS['cpu']}",
                                             f"-DSPARSE_LAB_INT8_BLOCK={quantize.BLOCK}"],
                               extra_include_paths=[str(CSRC)],
                               extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
            return None
        except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
            reason = f"build failed: {type(err).__name__}"
    warnings.warn(f"sparse_core: the native CPU kernel is unavailable ({reason}); using the embedding_bag fallback.")
    LIBRARY.impl("sparse_linear", _embedding_bag_sparse_linear, "CPU")
    LIBRARY.impl("dot_linear", lambda x, weight: F.linear(x, weight), "CPU")
    LIBRARY.impl("stream_read", lambda data, prefetch=True: data.sum(), "CPU")
    return reason


def _embedding_bag_sparse_linear(x, weight, weight_t, bias, threshold, scalar_threshold):
    """Pure-torch row gather: one bag per token of its active rows of weight_t, weighted by their inputs."""
    per_token = check_call(x, weight_t, threshold)
    x2 = x.reshape(-1, x.shape[-1])
    limit = per_token.reshape(-1, 1) if per_token is not None else torch.tensor(scalar_threshold, dtype=x.dtype)
    keep = x2.abs() > limit
    if x2.shape[0] > UNION_TOKENS["cpu"]:
        return F.linear(x2 * keep, weight, bias).reshape(*x.shape[:-1], -1)
    rows, cols = keep.nonzero(as_tuple=True)
    offsets = torch.searchsorted(rows, torch.arange(x2.shape[0]))
    y = F.embedding_bag(cols, weight_t, offsets, mode="sum", per_sample_weights=x2[rows, cols])
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], -1)


def vector_path(want: str | None = None) -> str:
    """The vector path the native kernels run ("scalar" .. "avx512_bf16", the CPU's widest unless SPARSE_LAB_ISA
    narrows it), after switching to `want` when given (never wider than the CPU has); "torch" without the build."""
    if not native():
        return "torch"
    number = torch.ops.sparse_lab.vector_path(-1 if want is None else VECTOR_PATHS.index(want))
    return VECTOR_PATHS[number]


def supported_paths() -> tuple[str, ...]:
    """Every vector path this CPU can run, narrowest first."""
    current = vector_path()
    widest = vector_path(VECTOR_PATHS[-1])
    vector_path(current)
    return VECTOR_PATHS[:VECTOR_PATHS.index(widest) + 1]


def describe() -> str:
    if native():
        return f"native C++/OpenMP row gather (float32, bfloat16, int8 rows; {vector_path()} vector path)"
    return f"fallback ({native_failure()}): pure-torch embedding_bag row gather"
